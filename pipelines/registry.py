"""The MLflow model registry for fine-tuned potentials: register a run's ``.model`` artifact, resolve
``potential.model: mlflow:/<name>/<version>`` (or ``models:/<name>/<version>``, version may be ``latest``) to a
local file. ``materials/`` never sees a registry URI: the pipeline resolves it before building a potential.

Registration uses ``MlflowClient.create_model_version`` with the artifact folder of the run as source: it works
offline with the SQLite store and needs no pyfunc wrapper (the artifact is a plain mace-torch ``.model``).

A ``.model`` file is a pickle: loading it runs code. Registration records the SHA-256 of the stored file (model
version tags ``model_sha256`` and ``model_file``); :func:`resolve_potential` checks the downloaded or cached copy
against it on every resolve, before anything loads it, and refuses a file that differs (or a version without a
recorded hash).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

from materials.errors import InputError
from materials.potentials.calculators import PotentialSpec, file_sha256
from pipelines.tracking import redact_uri

REGISTRY_PREFIXES = ("mlflow:/", "models:/")
#: Model-version tags written at registration: the SHA-256 of the ``.model`` file and its name.
HASH_TAG = "model_sha256"
FILE_TAG = "model_file"


class RegistryError(InputError):
    """A registry URI cannot be resolved; the message says which part and how to fix it."""


class ModelHashError(RegistryError):
    """A registered model file differs from the one registered (or has no recorded hash): it is not loaded."""


def parse_registry_uri(model: str | None) -> tuple[str, str] | None:
    """``(name, version)`` for ``mlflow:/name/version`` or ``models:/name/version``; None for anything else."""
    if not model or not model.startswith(REGISTRY_PREFIXES):
        return None
    rest = model.split(":/", 1)[1].strip("/")
    parts = rest.split("/")
    if len(parts) != 2 or not all(parts):
        raise RegistryError(f"potential.model={model!r}: expected mlflow:/<name>/<version> (version or 'latest')")
    return parts[0], parts[1]


def _client(tracking_uri: str):
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def _stored_model_file(tracking_uri: str, source: str, label: str) -> tuple[str, str]:
    """``(file name, SHA-256)`` of the ``.model`` file in the artifact folder ``source`` as the store holds it now
    (downloaded to a temporary folder and hashed)."""
    import tempfile

    import mlflow.artifacts

    with tempfile.TemporaryDirectory(prefix="semidisc-hash-") as tmp:
        mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=tmp, tracking_uri=tracking_uri)
        found = sorted(Path(tmp).rglob("*.model"))
        if not found:
            raise RegistryError(f"{label}: no .model file in the artifact folder {redact_uri(source)}")
        return found[0].name, file_sha256(found[0])


def register_model_file(
    tracking_uri: str,
    run_id: str,
    artifact_path: str,
    name: str,
    tags: dict[str, Any] | None = None,
    description: str | None = None,
) -> str:
    """Register the run's artifact folder ``artifact_path`` (holding one ``.model`` file) as a new version of
    ``name`` (created if needed) with ``tags``, plus the file's name and SHA-256 as read back from the artifact
    store (tags ``model_file``, ``model_sha256``); returns the version number as a string.

    Raises:
        RegistryError: the artifact folder holds no ``.model`` file.
    """
    from mlflow.exceptions import MlflowException

    client = _client(tracking_uri)
    source = f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{artifact_path}"
    model_file, sha256 = _stored_model_file(tracking_uri, source, f"run {run_id} artifact {artifact_path!r}")
    try:
        client.create_registered_model(name, description="semidisc fine-tuned MACE potential")
    except MlflowException as exc:
        if "RESOURCE_ALREADY_EXISTS" not in str(exc.error_code):
            raise
    version = client.create_model_version(
        name,
        source=source,
        run_id=run_id,
        tags={k: str(v) for k, v in (tags or {}).items()} | {FILE_TAG: model_file, HASH_TAG: sha256},
        description=description,
    )
    return str(version.version)


def record_model_hash(tracking_uri: str, name: str, version: str) -> str:
    """Record the SHA-256 of registered version ``name/version`` as the store holds it now (for a version
    registered before hashes were recorded); returns the hash. Only for a model you trust: whatever the
    store holds becomes the reference."""
    client = _client(tracking_uri)
    model_version = client.get_model_version(name, version)
    model_file, sha256 = _stored_model_file(tracking_uri, model_version.source, f"registered model {name}/{version}")
    set_model_version_tags(tracking_uri, name, version, {FILE_TAG: model_file, HASH_TAG: sha256})
    return sha256


def verify_model_file(path: Path, name: str, version: str, version_tags: dict[str, str]) -> None:
    """Refuse ``path`` (the local copy of registered model ``name/version``) unless its SHA-256 equals the one
    recorded at registration: a ``.model`` file is a pickle and runs code when it is loaded.

    Raises:
        ModelHashError: no hash recorded for that version, or the file's hash differs; the message names the
            model, the file, both hashes and the fix.
    """
    expected = version_tags.get(HASH_TAG)
    if not expected:
        raise ModelHashError(
            f"registered model {name}/{version} has no recorded SHA-256 (tag {HASH_TAG!r}; registered before "
            "hashes were recorded?), so its file cannot be checked and is not loaded. If you trust the stored "
            f"file, record its hash: pipelines.registry.record_model_hash(tracking_uri, {name!r}, {version!r})"
        )
    actual = file_sha256(path)
    if actual != expected:
        raise ModelHashError(
            f"registered model {name}/{version}: {path} has SHA-256 {actual}, but {expected} was recorded at "
            "registration; refusing to load it (a .model file is a pickle and runs code when loaded). Delete "
            f"{path.parent} to download it again; if the fresh download differs too, the artifact store copy "
            "was changed after registration: register the model again from a file you trust"
        )


def set_model_version_tags(tracking_uri: str, name: str, version: str, tags: dict[str, Any]) -> None:
    """Add ``tags`` (values as strings) to a registered model version."""
    client = _client(tracking_uri)
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, str(value))


def default_cache_dir(tracking_uri: str) -> Path:
    """Where resolved models are kept: beside a SQLite store (``<db folder>/model_cache``), else
    ``~/.cache/semidisc/models``."""
    if tracking_uri.startswith("sqlite:///"):
        return Path(tracking_uri[len("sqlite:///") :]).resolve().parent / "model_cache"
    return Path.home() / ".cache" / "semidisc" / "models"


def resolve_potential(
    spec: PotentialSpec, tracking_uri: str, cache_dir: str | Path | None = None
) -> tuple[PotentialSpec, dict[str, str]]:
    """Return ``spec`` with a registry URI replaced by the downloaded local ``.model`` path, and tags recording
    the registry name, version, source run, file SHA-256 and training-data hash (empty dict when ``spec`` is not a
    registry URI: it is returned unchanged). A resolved model gets energy convention ``self`` unless ``spec``
    declares one. The local copy (fresh download or cache) is checked against the SHA-256 recorded at
    registration before it is returned (:func:`verify_model_file`).

    Raises:
        RegistryError: malformed URI, unknown model or version, or no ``.model`` file in the artifact.
        ModelHashError: the local copy differs from the registered file, or no hash was recorded.
    """
    parsed = parse_registry_uri(spec.model)
    if parsed is None:
        return spec, {}
    name, version = parsed
    from mlflow.exceptions import MlflowException

    client = _client(tracking_uri)
    try:
        if version == "latest":
            versions = client.search_model_versions(f"name = '{name}'")
            if not versions:
                raise RegistryError(
                    f"potential.model={spec.model!r}: no registered model {name!r} in {redact_uri(tracking_uri)}"
                )
            version = str(max(int(v.version) for v in versions))
        model_version = client.get_model_version(name, version)
    except MlflowException as exc:
        raise RegistryError(
            f"potential.model={spec.model!r}: not found in the registry at {redact_uri(tracking_uri)} "
            f"({redact_uri(exc.message)}); "
            "list versions with MlflowClient().search_model_versions or run `semidisc finetune` first"
        ) from None
    target = Path(cache_dir) if cache_dir else default_cache_dir(tracking_uri)
    target = target / name / version
    files = sorted(target.glob("*.model")) if target.is_dir() else []
    if not files:
        import mlflow.artifacts

        tmp = target.with_name(f"{version}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        mlflow.artifacts.download_artifacts(
            artifact_uri=model_version.source, dst_path=str(tmp), tracking_uri=tracking_uri
        )
        found = sorted(tmp.rglob("*.model"))
        if not found:
            shutil.rmtree(tmp, ignore_errors=True)
            raise RegistryError(
                f"registered model {name}/{version} (source {redact_uri(model_version.source)}) has no .model file"
            )
        target.mkdir(parents=True, exist_ok=True)
        for path in found:
            os.replace(path, target / path.name)
        shutil.rmtree(tmp, ignore_errors=True)
        files = sorted(target.glob("*.model"))
    recorded_name = model_version.tags.get(FILE_TAG)
    model_file = next((f for f in files if f.name == recorded_name), files[0])
    verify_model_file(model_file, name, version, model_version.tags)
    tags = {
        "potential_registry_uri": spec.model,
        "potential_registry_name": name,
        "potential_registry_version": version,
        "potential_registry_run_id": model_version.run_id or "",
        "potential_model_sha256": model_version.tags[HASH_TAG],
    }
    if "training_data_hash" in model_version.tags:
        tags["potential_training_data_hash"] = model_version.tags["training_data_hash"]
    # a registered model was fine-tuned on this project's DFT: its energies sit on that DFT's scale, so its
    # elemental references come from the model itself unless the config declares otherwise
    return replace(spec, model=str(model_file), energy_convention=spec.energy_convention or "self"), tags
