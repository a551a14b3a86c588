"""The MLflow model registry for fine-tuned potentials: register a run's ``.model`` artifact, resolve
``potential.model: mlflow:/<name>/<version>`` (or ``models:/<name>/<version>``, version may be ``latest``) to a
local file. ``materials/`` never sees a registry URI: the pipeline resolves it before building a potential.

Registration uses ``MlflowClient.create_model_version`` with the artifact folder of the run as source: it works
offline with the SQLite store and needs no pyfunc wrapper (the artifact is a plain mace-torch ``.model``).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

from materials.potentials import PotentialSpec

REGISTRY_PREFIXES = ("mlflow:/", "models:/")


class RegistryError(ValueError):
    """A registry URI cannot be resolved; the message says which part and how to fix it."""


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


def register_model_file(
    tracking_uri: str,
    run_id: str,
    artifact_path: str,
    name: str,
    tags: dict[str, Any] | None = None,
    description: str | None = None,
) -> str:
    """Register the run's artifact folder ``artifact_path`` (holding one ``.model`` file) as a new version of
    ``name`` (created if needed) with ``tags``; returns the version number as a string."""
    from mlflow.exceptions import MlflowException

    client = _client(tracking_uri)
    try:
        client.create_registered_model(name, description="semidisc fine-tuned MACE potential")
    except MlflowException as exc:
        if "RESOURCE_ALREADY_EXISTS" not in str(exc.error_code):
            raise
    source = f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{artifact_path}"
    version = client.create_model_version(
        name,
        source=source,
        run_id=run_id,
        tags={k: str(v) for k, v in (tags or {}).items()},
        description=description,
    )
    return str(version.version)


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
    the registry name, version, source run and training-data hash (empty dict when ``spec`` is not a registry
    URI: it is returned unchanged). A resolved model gets energy convention ``self`` unless ``spec`` declares one.

    Raises:
        RegistryError: malformed URI, unknown model or version, or no ``.model`` file in the artifact.
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
                raise RegistryError(f"potential.model={spec.model!r}: no registered model {name!r} in {tracking_uri}")
            version = str(max(int(v.version) for v in versions))
        model_version = client.get_model_version(name, version)
    except MlflowException as exc:
        raise RegistryError(
            f"potential.model={spec.model!r}: not found in the registry at {tracking_uri} ({exc.message}); "
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
            raise RegistryError(f"registered model {name}/{version} (source {model_version.source}) has no .model file")
        target.mkdir(parents=True, exist_ok=True)
        for path in found:
            os.replace(path, target / path.name)
        shutil.rmtree(tmp, ignore_errors=True)
        files = sorted(target.glob("*.model"))
    tags = {
        "potential_registry_uri": spec.model,
        "potential_registry_name": name,
        "potential_registry_version": version,
        "potential_registry_run_id": model_version.run_id or "",
    }
    if "training_data_hash" in model_version.tags:
        tags["potential_training_data_hash"] = model_version.tags["training_data_hash"]
    # a registered model was fine-tuned on this project's DFT: its energies sit on that DFT's scale, so its
    # elemental references come from the model itself unless the config declares otherwise
    return replace(spec, model=str(files[0]), energy_convention=spec.energy_convention or "self"), tags
