"""One factory from a potential spec to an ASE calculator.

``chgnet`` (default; pretrained MPtrj weights ship in the chgnet wheel, fully offline), ``mace`` (a foundation
model name that mace-torch downloads and caches, or a local ``.model`` file), ``sevennet`` (SevenNet checkpoints
shipped in the sevenn wheel, offline; it needs e3nn>=0.5 while mace-torch pins 0.4.4, so it lives in its own
environment: see :data:`ENVIRONMENTS`), and ``emt`` (ASE's effective medium theory, for fast tests of the
machinery; not for semiconductors).

A ``.model`` file or a CHGNet checkpoint is a pickle: loading it runs code, so it must be trusted like code
(registered models are checked against the SHA-256 recorded at registration, see ``pipelines.registry``).
mace is imported lazily, only when a MACE model is asked for: importing it sets
``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` (torch may then unpickle anything), so the import and the load run inside
:func:`mace_unpickling` and the variable is restored afterwards.

Every potential declares an energy convention (how its energies relate to Materials Project's; see
:mod:`materials.thermo.stability`): CHGNet ``mp2020``, MACE and SevenNet ``uncorrected``, EMT ``self``, unless the spec
says otherwise.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

from ase.calculators.calculator import Calculator
from pydantic import ConfigDict
from pydantic.dataclasses import dataclass as config_dataclass

from materials.errors import SemidiscError
from materials.thermo.stability import mp_elemental_energies

#: Elements ASE's EMT has parameters for.
EMT_ELEMENTS = frozenset({"Al", "Cu", "Ag", "Au", "Ni", "Pd", "Pt", "H", "C", "N", "O"})
#: MACE foundation names mace-torch's ``mace_mp`` accepts (downloaded on first use into ~/.cache/mace).
MACE_FOUNDATION_NAMES = (
    "small",
    "medium",
    "large",
    "medium-mpa-0",
    "medium-omat-0",
    "small-0b",
    "medium-0b",
    "small-0b2",
    "medium-0b2",
    "large-0b2",
    "medium-0b3",
    "mh-0",
    "mh-1",
)
#: SevenNet checkpoints inside the sevenn wheel (offline). ``7net-mf-0`` is multi-fidelity: its PBE head is used
#: (the MP-compatible one).
SEVENNET_BUNDLED = ("7net-0", "7net-0_22may2024", "7net-l3i5", "7net-mf-0")
#: SevenNet checkpoints sevenn knows but downloads from GitHub on first use (not available offline).
SEVENNET_DOWNLOADED = ("7net-mf-ompa", "7net-omat", "7net-omni", "7net-omni-i8", "7net-omni-i12")
#: Potentials that cannot share the main environment, and the environment each needs (a name the pipeline maps to a
#: Python interpreter; ``make setup-<name>`` builds it). The others run in the main environment.
ENVIRONMENTS = {"sevennet": "sevennet"}


class PotentialError(SemidiscError, RuntimeError):
    """A potential cannot be loaded; the message says what to change (a user error: exit code 2)."""

    exit_code = 2


@config_dataclass(config=ConfigDict(extra="forbid"))
class PotentialSpec:
    """Which interatomic potential to use.

    Attributes:
        name: ``chgnet`` | ``mace`` | ``sevennet`` | ``emt``.
        model: for ``mace``: a foundation name (e.g. ``medium-mpa-0``) or a path to a ``.model`` file;
            for ``chgnet``: a CHGNet version (``0.3.0`` default) or a path to a checkpoint; for ``sevennet``: a
            checkpoint shipped in the sevenn wheel (``7net-0`` default, ``7net-l3i5``, ``7net-0_22may2024``,
            ``7net-mf-0``) or a path to a checkpoint; unused for ``emt``.
        device: ``cpu`` or ``cuda`` (``cuda:N``).
        dtype: float precision for MACE (``float64`` for relaxations, ``float32`` is faster on GPU); SevenNet and
            CHGNet run in float32 whatever this says.
        energy_convention: ``mp2020`` (energies already on the MP2020-corrected scale), ``uncorrected`` (raw
            GGA/GGA+U energies: MP2020 corrections are added) or ``self`` (elemental references from the model
            itself); None: the default of the model (:meth:`convention`).
    """

    name: Literal["chgnet", "mace", "sevennet", "emt"] = "chgnet"
    model: str | None = None
    device: str = "cpu"
    dtype: Literal["float32", "float64"] = "float64"
    energy_convention: Literal["mp2020", "uncorrected", "self"] | None = None

    def convention(self) -> str:
        """The energy convention: the declared one, else the model's default. CHGNet 0.2.0/0.3.0 (and CHGNet
        checkpoints, usually fine-tuned from them) were trained on MPtrj's MP2020-corrected energies:
        ``mp2020``. MACE-MP foundation models and other MPtrj-trained MACE files predict raw GGA/GGA+U energies:
        ``uncorrected``; so do SevenNet's (trained on MPtrj's raw energies; measured: ZnO E_form -1.45 eV/atom raw,
        -1.79 with MP2020, MP -1.79). EMT's energies have no relation to MP's: ``self``. A MACE fine-tuned on this
        project's DFT is declared ``self`` when the pipeline resolves it from the registry."""
        if self.energy_convention is not None:
            return self.energy_convention
        return {"chgnet": "mp2020", "mace": "uncorrected", "sevennet": "uncorrected", "emt": "self"}[self.name]

    def environment(self) -> str | None:
        """The environment this potential must run in (a key of :data:`ENVIRONMENTS`), or None for the main one."""
        return ENVIRONMENTS.get(self.name)

    def label(self) -> str:
        """Short human-readable name, e.g. ``chgnet-0.3.0`` or ``mace-tiny_mace.model``."""
        if self.name == "emt":
            return "emt"
        if self.model is None:
            return {"chgnet": "chgnet-0.3.0", "sevennet": "sevennet-7net-0"}.get(self.name, self.name)
        return f"{self.name}-{Path(self.model).name}"


#: Set by mace-torch at import; makes every ``torch.load`` without ``weights_only=`` unpickle arbitrary objects.
NO_WEIGHTS_ONLY_VAR = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"


@contextmanager
def mace_unpickling() -> Iterator[None]:
    """Allow torch to unpickle a whole MACE model for the duration of the block (mace-torch's calculator calls
    ``torch.load`` without ``weights_only``, and importing mace sets ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1``
    process-wide); afterwards the variable is as it was before (unset if it was unset), so later
    ``torch.load`` calls elsewhere keep torch's safe ``weights_only`` default."""
    previous = os.environ.get(NO_WEIGHTS_ONLY_VAR)
    os.environ[NO_WEIGHTS_ONLY_VAR] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(NO_WEIGHTS_ONLY_VAR, None)
        else:
            os.environ[NO_WEIGHTS_ONLY_VAR] = previous


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes, as 64 hex digits."""
    digest = hashlib.sha256()
    path = Path(path)
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _chgnet_weights_path(spec: PotentialSpec) -> Path:
    if spec.model and Path(spec.model).is_file():
        return Path(spec.model)
    import chgnet

    version = spec.model or "0.3.0"
    folder = Path(chgnet.__file__).parent / "pretrained" / version
    files = sorted(folder.glob("*.pth.tar"))
    if not files:
        raise PotentialError(
            f"potential.model={spec.model!r}: no CHGNet weights for that version or path; "
            "use 0.3.0, 0.2.0 or a path to a CHGNet checkpoint"
        )
    return files[0]


def sevennet_checkpoint_path(spec: PotentialSpec) -> Path:
    """The checkpoint file of a SevenNet spec (needs the SevenNet environment for a bundled name)."""
    model = spec.model or "7net-0"
    if Path(model).expanduser().is_file():
        return Path(model).expanduser()
    from sevenn.util import pretrained_name_to_path

    return Path(pretrained_name_to_path(model))


def weights_hash(spec: PotentialSpec) -> str:
    """First 16 hex digits of the SHA-256 of the weights file (``"builtin"`` for EMT, the name for
    a MACE foundation model that is not on disk). For SevenNet, call it in SevenNet's environment."""
    if spec.name == "emt":
        return "builtin"
    if spec.name == "chgnet":
        return file_sha256(_chgnet_weights_path(spec))[:16]
    if spec.name == "sevennet":
        return file_sha256(sevennet_checkpoint_path(spec))[:16]
    path = Path(spec.model) if spec.model else None
    if path is not None and path.is_file():
        return file_sha256(path)[:16]
    return f"foundation:{spec.model or 'medium-mpa-0'}"


def load_potential(spec: PotentialSpec | str | None = None) -> Calculator:
    """Return an ASE calculator for ``spec`` (a :class:`PotentialSpec`, a name, or None for CHGNet).

    Raises:
        PotentialError: unknown name, missing model file, or MACE foundation weights that cannot be
            downloaded (offline) — the message says how to pass a local ``.model`` file instead.
    """
    if spec is None:
        spec = PotentialSpec()
    elif isinstance(spec, str):
        spec = PotentialSpec(name=spec)  # type: ignore[arg-type]
    if spec.model and spec.model.startswith(("mlflow:/", "models:/")):
        raise PotentialError(
            f"potential.model={spec.model!r} is an MLflow registry URI, which this library does not resolve: run "
            "it through the pipeline (semidisc screen/campaign resolve it) or call "
            "pipelines.registry.resolve_potential(spec, tracking_uri) first to get a local .model path"
        )
    if spec.name == "emt":
        from ase.calculators.emt import EMT

        return EMT()
    if spec.name == "chgnet":
        from chgnet.model import CHGNet
        from chgnet.model.dynamics import CHGNetCalculator

        if spec.model and Path(spec.model).is_file():
            model = CHGNet.from_file(spec.model)
        else:
            _chgnet_weights_path(spec)  # clear error for an unknown version
            model = CHGNet.load(model_name=spec.model or "0.3.0", verbose=False)
        return CHGNetCalculator(model=model, use_device=spec.device, on_isolated_atoms="ignore")
    if spec.name == "mace":
        return _load_mace(spec)
    if spec.name == "sevennet":
        return _load_sevennet(spec)
    raise PotentialError(f"potential.name={spec.name!r} is not known; use chgnet, mace, sevennet or emt")


def _load_sevennet(spec: PotentialSpec) -> Calculator:
    model = spec.model or "7net-0"
    try:
        import sevenn  # noqa: F401
    except ImportError as exc:
        raise PotentialError(
            f"potential.name=sevennet needs SevenNet's own environment (sevenn needs e3nn>=0.5, mace-torch pins "
            f"e3nn 0.4.4), and this Python has no sevenn ({exc}): build it with `make setup-sevennet`; the pipeline "
            "(semidisc screen) runs SevenNet's Ray actors there by itself"
        ) from exc
    path = Path(model).expanduser()
    looks_like_path = "/" in model or model.endswith((".pth", ".pt")) or path.exists()
    if looks_like_path and not path.is_file():
        raise PotentialError(
            f"potential.model={model!r}: SevenNet checkpoint not found; give the path to a checkpoint file or a "
            f"checkpoint shipped in the sevenn wheel ({', '.join(SEVENNET_BUNDLED)})"
        )
    if not looks_like_path and model not in SEVENNET_BUNDLED:
        if model in SEVENNET_DOWNLOADED:
            raise PotentialError(
                f"potential.model={model!r} is not in the sevenn wheel: sevenn downloads it from GitHub on first "
                f"use, which this machine cannot. Use a shipped checkpoint ({', '.join(SEVENNET_BUNDLED)}), or "
                "download the checkpoint where there is network and set potential.model: /path/to/checkpoint.pth"
            )
        raise PotentialError(
            f"potential.model={model!r} is not a SevenNet checkpoint shipped in the sevenn wheel "
            f"({', '.join(SEVENNET_BUNDLED)}) nor an existing checkpoint file"
        )
    import warnings

    from sevenn.calculator import SevenNetCalculator

    modal = "PBE" if model == "7net-mf-0" else None  # the multi-fidelity model's MP-compatible (PBE/PBE+U) head
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*tensor product accelerator.*")
        # a checkpoint is a pickle (torch.load with weights_only=False inside sevenn): trusted like code
        return SevenNetCalculator(model=str(path) if looks_like_path else model, device=spec.device, modal=modal)


def _load_mace(spec: PotentialSpec) -> Calculator:
    model = spec.model or "medium-mpa-0"
    looks_like_path = model.endswith(".model") or "/" in model or Path(model).exists()
    if looks_like_path:
        path = Path(model).expanduser()
        if not path.is_file():
            raise PotentialError(
                f"potential.model={model!r}: MACE model file not found; give the path to a .model file "
                f"or a foundation name ({', '.join(MACE_FOUNDATION_NAMES[:5])}, ...)"
            )
        with mace_unpickling():
            from mace.calculators import MACECalculator

            return MACECalculator(model_paths=str(path), device=spec.device, default_dtype=spec.dtype)
    if model not in MACE_FOUNDATION_NAMES:
        raise PotentialError(
            f"potential.model={model!r} is neither a MACE foundation name ({', '.join(MACE_FOUNDATION_NAMES)}) "
            "nor an existing .model file"
        )
    with mace_unpickling():
        from mace.calculators import mace_mp

        try:
            return mace_mp(model=model, device=spec.device, default_dtype=spec.dtype)
        except Exception as exc:  # mace-torch raises a bare Exception("Model download failed ...") offline
            raise PotentialError(
                f"MACE foundation model {model!r} is not cached and could not be downloaded "
                f"({type(exc).__name__}: {exc}). On a machine with network, run once: "
                f"python -c \"from mace.calculators import mace_mp; mace_mp(model='{model}')\" to cache it in "
                "~/.cache/mace, or download the .model file and set potential.model: /path/to/file.model"
            ) from exc


def training_elements(spec: PotentialSpec, calculator: Calculator | None = None) -> frozenset[str]:
    """Chemical symbols the potential was trained on, for coverage warnings: CHGNet's MPtrj (the 89 elements
    of MP's elemental references; CHGNet runs on Z 1-94 but Po, At, Rn, Fr and Ra never occur in MPtrj);
    otherwise what :func:`supported_elements` says."""
    if spec.name == "chgnet":
        return frozenset(mp_elemental_energies())
    return supported_elements(spec, calculator)


def supported_elements(spec: PotentialSpec, calculator: Calculator | None = None) -> frozenset[str]:
    """Chemical symbols the potential has been trained on (EMT: its parameter set; CHGNet: Z 1-94;
    MACE: the model's atomic-number table; SevenNet: the checkpoint's type map)."""
    from ase.data import chemical_symbols

    if spec.name == "emt":
        return EMT_ELEMENTS
    if spec.name == "chgnet":
        return frozenset(chemical_symbols[1:95])
    if calculator is None:
        calculator = load_potential(spec)
    if spec.name == "sevennet":
        return frozenset(chemical_symbols[int(z)] for z in calculator.type_map)
    numbers = [int(z) for z in calculator.models[0].atomic_numbers]
    return frozenset(chemical_symbols[z] for z in numbers)
