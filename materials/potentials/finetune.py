"""Fine-tune (or train) a MACE potential on DFT data with mace-torch's own training (``mace_run_train``).

Four steps, each a plain function so the pipeline (``pipelines/finetune_run.py``) can run the expensive ones as
Ray tasks:

1. **Data.** :func:`perturbed_structures` makes rattled and strained copies of a candidate (seeded);
   :func:`dft_frames` labels them with GPAW through :mod:`materials.dft.gpaw` (single points, or the ionic steps of a
   short DFT relaxation) as ASE ``Atoms`` carrying ``REF_energy`` (eV), ``REF_forces`` (eV/Å, shape (n, 3)) and
   ``REF_stress`` (eV/Å³, Voigt 6-vector), plus the DFT settings in ``atoms.info`` (keys ``dft_*``).
2. **Validation.** :func:`validate_training_set` refuses a set with missing labels, mixed functionals or mixed
   DFT settings, naming the structure and the fix (mixing them silently trains a model on two energy scales).
3. **Training.** :func:`train_mace` runs ``mace.cli.run_train`` in a subprocess (a clean process: mace-torch
   sets torch's default dtype and ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` process-wide) from a local foundation
   ``.model`` (fine-tuning) or from scratch.
4. **Evaluation.** :func:`evaluate_calculator`: force RMSE and energy errors of any ASE calculator on labelled
   frames. Energies of potentials trained on other DFT (CHGNet: MP/VASP) live on another scale, so the
   comparable energy metric is the *relative* energy within one composition (:func:`relative_energy_mae`).

**E0s (per-element reference energies MACE adds to its interaction energy).** We use the *elemental-solid*
references computed with the same DFT settings (:func:`materials.dft.gpaw.elemental_references`, cached), not
isolated atoms: (1) a plane-wave code needs a large vacuum box, spin polarisation and symmetry breaking for an
isolated atom — slow and fragile — while the elemental solids are already computed and cached for formation
energies; (2) with E0 = μ(element) the learnt interaction energy *is* the formation energy (small, ~0.1-1
eV/atom), so formation energies from the fine-tuned model use exactly the DFT reference and MACE's
scale/shift normalisation sees a narrow target. The price: the model's isolated-atom energy is the solid's,
irrelevant for screening crystals. ``e0s: average`` (mace's least-squares fit on the training set) remains for
data without references (tests, EMT).

Nothing here imports Ray or MLflow.
"""

from __future__ import annotations

import hashlib
import math
import os
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from ase import Atoms
from ase.units import GPa
from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass as config_dataclass
from pymatgen.core import Structure
from pymatgen.io.ase import AseAtomsAdaptor

from materials.dft import gpaw as dft
from materials.dft.gpaw import DFTResult, DFTSettings, settings_hash
from materials.errors import InputError, RunError

#: ``atoms.info`` / ``atoms.arrays`` keys of the labels (mace-torch's ``--energy_key`` etc.).
ENERGY_KEY = "REF_energy"
FORCES_KEY = "REF_forces"
STRESS_KEY = "REF_stress"
#: ``atoms.info`` keys that must agree across one training set (the functional is checked first, by name).
#: ``dft_kpts`` is per structure (one k-point density gives different grids) and is not compared.
SETTINGS_KEYS = (
    "dft_code",
    "dft_ecut",
    "dft_kpoint_density",
    "dft_kpoint_grid",
    "dft_smearing",
    "dft_spinpol",
    "dft_settings_hash",
)


#: eV/Å: below this training-force RMS, mace's ``rms_forces_scaling`` leaves a from-scratch model frozen at ~0.
MIN_RMS_FORCE = 1e-3


class TrainingSetError(InputError):
    """The training data cannot be used as one set; the message names the structure and the fix."""


class FinetuneError(RunError):
    """mace-torch training failed; the message carries the end of its log."""


@config_dataclass(config=ConfigDict(extra="forbid"))
class DataSettings:
    """How DFT training data is generated from each candidate structure.

    Attributes:
        n_rattled: rattled copies per structure (Gaussian displacements, ``rattle_std`` Å per component).
        rattle_std: Å; 0.02-0.05 gives forces of ~0.3-1.2 eV/Å in III-V semiconductors.
        n_strained: strained copies per structure (random symmetric strain, each component within
            ±``max_strain``, plus a small rattle of ``rattle_std / 2``).
        max_strain: fraction (0.03 = 3 %).
        relax_steps: ionic steps of a short GPAW relaxation recorded per structure (0: no relaxation data);
            the relaxation starts from a strained, rattled copy so its steps are informative.
        heldout_fraction: fraction of each structure's rattled/strained copies kept out of training for
            evaluation (at least one per structure when > 0). Relaxation steps always train.
        seed: RNG seed of the perturbations and the split.
    """

    n_rattled: int = Field(default=4, ge=0)
    rattle_std: float = Field(default=0.03, ge=0)
    n_strained: int = Field(default=2, ge=0)
    max_strain: float = Field(default=0.03, ge=0, lt=0.3)
    relax_steps: int = Field(default=3, ge=0)
    heldout_fraction: float = Field(default=0.34, ge=0, lt=1)
    seed: int = Field(default=0, ge=0)


@config_dataclass(config=ConfigDict(extra="forbid"))
class TrainSettings:
    """mace-torch training parameters (the names of ``mace_run_train``'s options).

    CPU-sized defaults (measured: 64 frames of 2-8 atoms, 150 epochs, ~4-10 min on one busy core). GPU-sized
    (documented, not measured here): ``num_channels: 128, max_L: 1, r_max: 6.0, num_interactions: 2,
    max_num_epochs: 200, batch_size: 16, device: cuda, dtype: float32``; fine-tuning a foundation model:
    ``lr: 0.001`` and fewer epochs (20-50).

    Attributes:
        foundation_model: path to a local MACE ``.model`` file to fine-tune (its architecture and r_max are
            kept; elements outside it are not supported by mace's naive fine-tuning); None trains a small MACE
            from scratch with the fields below. Foundation *names* need a download: give the cached file.
        e0s: ``elemental`` (per-element DFT elemental-solid energies, supplied by the caller, see module doc)
            or ``average`` (mace's least-squares E0s from the training set).
        r_max: cutoff, Å. num_channels, max_L, correlation, num_interactions, num_radial_basis, mlp_irreps:
            MACE architecture (from-scratch only).
        max_num_epochs, batch_size, lr, energy_weight, forces_weight, stress_weight: optimisation; the
            weights are mace's loss weights (``loss: weighted`` or ``stress`` when stress_weight > 0).
            Measured on the Ga-As-P-In benchmark data (64 frames, held-out relative-energy MAE / force RMSE):
            energy_weight 1, 80 epochs, stage two: 9.3 meV/atom / 22 meV/Å; energy_weight 10, 120 epochs, stage
            two: 2.8 / 22; energy_weight 50, 150 epochs, no stage two (the defaults): 1.4 / 21. Energies are few
            (one per frame) against 3n force components: they need the larger weight.
        stage_two, stage_two_energy_weight, stage_two_forces_weight: mace's "stage two" (``--stage_two``, once
            called SWA): for the last 25 % of the epochs a lower learning rate and these loss weights.
        scaling: mace's output scaling (``--scaling``), from-scratch only. ``rms_forces_scaling`` (mace's
            default) multiplies the model by the training forces' RMS: data of relaxed high-symmetry cells
            (forces ~0 by symmetry, e.g. a campaign's DFT relaxations) would freeze the model at ~0, so
            :func:`train_mace` refuses it there; ``std_scaling`` uses the spread of the per-atom energies.
        valid_fraction: part of the training set mace keeps for its own validation / checkpoint choice.
        seed, device, dtype, threads: reproducibility and placement (threads = OMP/torch threads).
    """

    foundation_model: str | None = None
    e0s: Literal["elemental", "average"] = "elemental"
    r_max: float = Field(default=5.0, gt=0)
    num_channels: int = Field(default=32, ge=1)
    max_L: int = Field(default=0, ge=0)
    correlation: int = Field(default=2, ge=1)
    num_interactions: int = Field(default=2, ge=1)
    num_radial_basis: int = Field(default=8, ge=1)
    mlp_irreps: str = "16x0e"
    max_num_epochs: int = Field(default=150, ge=1)
    batch_size: int = Field(default=4, ge=1)
    lr: float = Field(default=0.01, gt=0)
    energy_weight: float = Field(default=50.0, ge=0)
    forces_weight: float = Field(default=10.0, ge=0)
    stress_weight: float = Field(default=1.0, ge=0)
    stage_two: bool = False
    stage_two_energy_weight: float = Field(default=1000.0, ge=0)
    stage_two_forces_weight: float = Field(default=10.0, ge=0)
    scaling: Literal["rms_forces_scaling", "std_scaling", "no_scaling"] = "rms_forces_scaling"
    valid_fraction: float = Field(default=0.1, gt=0, lt=1)
    seed: int = Field(default=0, ge=0)
    device: str = "cpu"
    dtype: Literal["float32", "float64"] = "float64"
    threads: int = Field(default=1, ge=1)


# ---------------------------------------------------------------------------------------------------- data


def perturbed_structures(structure: Structure | Atoms, settings: DataSettings, name: str) -> list[tuple[str, Atoms]]:
    """Rattled and strained copies of ``structure`` as ``(id, atoms)``; ids ``<name>-rattle<i>``,
    ``<name>-strain<i>``. Deterministic for a given ``settings.seed`` and ``name``."""
    atoms = structure.copy() if isinstance(structure, Atoms) else AseAtomsAdaptor.get_atoms(structure)
    seed = int.from_bytes(hashlib.sha256(f"{settings.seed}:{name}".encode()).digest()[:4], "little")
    rng = np.random.default_rng(seed)
    out = []
    for i in range(settings.n_rattled):
        copy = atoms.copy()
        copy.positions = copy.positions + rng.normal(0.0, settings.rattle_std, size=copy.positions.shape)
        out.append((f"{name}-rattle{i}", copy))
    for i in range(settings.n_strained):
        out.append((f"{name}-strain{i}", _strained(atoms, settings.max_strain, settings.rattle_std / 2, rng)))
    return out


def relaxation_start(structure: Structure | Atoms, settings: DataSettings, name: str) -> Atoms:
    """A strained, rattled copy of ``structure`` from which a short DFT relaxation yields useful steps."""
    atoms = structure.copy() if isinstance(structure, Atoms) else AseAtomsAdaptor.get_atoms(structure)
    seed = int.from_bytes(hashlib.sha256(f"{settings.seed}:{name}:relax".encode()).digest()[:4], "little")
    return _strained(atoms, settings.max_strain, settings.rattle_std, np.random.default_rng(seed))


def _strained(atoms: Atoms, max_strain: float, rattle: float, rng: np.random.Generator) -> Atoms:
    eps = rng.uniform(-max_strain, max_strain, size=(3, 3))
    eps = 0.5 * (eps + eps.T)
    copy = atoms.copy()
    copy.set_cell(copy.cell.array @ (np.eye(3) + eps), scale_atoms=True)
    copy.positions = copy.positions + rng.normal(0.0, rattle, size=copy.positions.shape)
    return copy


def dft_metadata(settings: DFTSettings) -> dict[str, Any]:
    """The ``atoms.info`` entries recording how a frame was labelled (compared by :func:`validate_training_set`)."""
    return {
        "dft_code": "gpaw",
        "dft_xc": settings.xc,
        "dft_ecut": float(settings.ecut),
        "dft_kpoint_density": float(settings.kpoint_density) if settings.kpts is None else -1.0,
        "dft_kpoint_grid": settings.kpoint_grid if settings.kpts is None else "x".join(map(str, settings.kpts)),
        "dft_smearing": float(settings.smearing),
        "dft_spinpol": bool(settings.spinpol),
        "dft_settings_hash": settings_hash(settings),
    }


def labelled_frame(
    atoms: Atoms,
    energy: float,
    forces: np.ndarray | Sequence | None,
    stress: np.ndarray | Sequence | None,
    metadata: dict[str, Any],
    frame_id: str,
    config_type: str = "dft",
) -> Atoms:
    """A copy of ``atoms`` (no calculator) carrying the labels: energy eV, forces eV/Å (n, 3), stress eV/Å³
    (Voigt 6), plus ``metadata`` (``dft_*`` keys), ``id`` and mace's ``config_type`` in ``atoms.info``."""
    frame = Atoms(atoms.get_chemical_symbols(), positions=atoms.positions, cell=atoms.cell, pbc=True)
    frame.info.update(metadata)
    frame.info["id"] = frame_id
    frame.info["config_type"] = config_type
    frame.info[ENERGY_KEY] = float(energy)
    if stress is not None:
        frame.info[STRESS_KEY] = np.asarray(stress, dtype=float).reshape(6)
    if forces is not None:
        frame.arrays[FORCES_KEY] = np.asarray(forces, dtype=float).reshape(len(frame), 3)
    return frame


@dataclass
class LabelOutcome:
    """Frames labelled from one input, or why none were (``failure_reason``)."""

    id: str
    frames: list[Atoms] = field(default_factory=list)
    failure_reason: str | None = None
    seconds: float = 0.0


def dft_frames(
    atoms: Atoms,
    settings: DFTSettings,
    frame_id: str,
    relax_steps: int = 0,
    log_path: str | Path | None = None,
) -> LabelOutcome:
    """Label ``atoms`` with GPAW: one single point (``relax_steps == 0``) or every ionic step of a relaxation of
    at most ``relax_steps`` steps (positions + cell). A failed calculation gives no frames and its reason."""
    start = time.perf_counter()
    if relax_steps == 0:
        result = dft.single_point(atoms, settings, item_id=frame_id, log_path=log_path)
        if result.status != "ok":
            return LabelOutcome(frame_id, failure_reason=result.failure_reason, seconds=result.seconds)
        frames = result_frames(result, settings, frame_id, "rattled")
        return LabelOutcome(frame_id, frames, seconds=time.perf_counter() - start)
    recorder = RelaxRecorder(settings, frame_id)
    result = dft.relax(atoms, settings, item_id=frame_id, log_path=log_path, max_steps=relax_steps, on_step=recorder)
    if result.status != "ok" and not recorder.frames:
        return LabelOutcome(frame_id, failure_reason=result.failure_reason, seconds=result.seconds)
    return LabelOutcome(frame_id, recorder.frames, seconds=time.perf_counter() - start)


def result_frames(result: DFTResult, settings: DFTSettings, frame_id: str, config_type: str = "dft") -> list[Atoms]:
    """The labelled frame of a finished GPAW calculation's final geometry (``result.structure``): energy eV,
    forces eV/Å (n, 3) and, when the calculation computed it, stress (GPa in the result, eV/Å³ in the frame;
    a band-gap run has none and mace then gives the frame no stress weight). ``[]`` for a failed result or one
    without forces."""
    if result.status != "ok" or result.structure is None or result.forces is None or not math.isfinite(result.energy):
        return []
    stress = np.asarray(result.stress, dtype=float)
    stress = stress * GPa if stress.shape == (6,) and np.all(np.isfinite(stress)) else None
    atoms = AseAtomsAdaptor.get_atoms(result.structure)
    return [labelled_frame(atoms, result.energy, result.forces, stress, dft_metadata(settings), frame_id, config_type)]


class RelaxRecorder:
    """``on_step`` callback of :func:`materials.dft.gpaw.relax`: every ionic step (the start included) becomes a
    labelled frame with energy, forces and stress, id ``<frame_id>-step<i>``, kept in ``frames``."""

    def __init__(self, settings: DFTSettings, frame_id: str, config_type: str = "relax"):
        self.frames: list[Atoms] = []
        self._metadata = dft_metadata(settings)
        self._frame_id = frame_id
        self._config_type = config_type

    def __call__(self, atoms: Atoms) -> None:
        frame = labelled_frame(
            atoms,
            atoms.get_potential_energy(),
            atoms.get_forces(),
            atoms.get_stress(voigt=True),
            self._metadata,
            f"{self._frame_id}-step{len(self.frames)}",
            self._config_type,
        )
        self.frames.append(frame)


# ------------------------------------------------------------------------------------------------ validation


def _frame_name(frame: Atoms, index: int) -> str:
    return f"structure {index} ({frame.info.get('id', frame.get_chemical_formula())})"


def _setting(frame: Atoms, key: str) -> Any:
    """A recorded setting, normalised so that an extxyz round trip (``350.0`` read back as ``350``, a hex hash of
    digits read back as a number) compares equal."""
    value = frame.info.get(key)
    if value is None or isinstance(value, bool | np.bool_):
        return value
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


def validate_training_set(frames: Sequence[Atoms]) -> None:
    """Raise :class:`TrainingSetError` unless every frame has an energy and forces of the right shape and all
    frames share one functional (``dft_xc``) and one set of DFT settings (:data:`SETTINGS_KEYS`)."""
    if not frames:
        raise TrainingSetError("the training set is empty: no DFT frame was labelled (see the failures above)")
    first = frames[0]
    for index, frame in enumerate(frames):
        name = _frame_name(frame, index)
        energy = frame.info.get(ENERGY_KEY)
        if energy is None or not math.isfinite(float(energy)):
            raise TrainingSetError(
                f"{name} has no energy (info[{ENERGY_KEY!r}]): recompute it or drop it from the training set"
            )
        forces = frame.arrays.get(FORCES_KEY)
        if forces is None or np.shape(forces) != (len(frame), 3) or not np.all(np.isfinite(forces)):
            raise TrainingSetError(
                f"{name} has missing or invalid forces (arrays[{FORCES_KEY!r}], need shape ({len(frame)}, 3)): "
                "recompute it with forces (materials.potentials.finetune.dft_frames records them) or drop it"
            )
        if "dft_xc" not in frame.info:
            raise TrainingSetError(
                f"{name} does not record its functional (info['dft_xc']): label it with "
                "materials.potentials.finetune.dft_frames / dft_metadata so the set can be checked"
            )
        if str(frame.info["dft_xc"]) != str(first.info.get("dft_xc")):
            raise TrainingSetError(
                f"mixed functionals in one training set: {name} has xc={frame.info['dft_xc']!r} but "
                f"{_frame_name(first, 0)} has xc={first.info.get('dft_xc')!r}; energies of different functionals "
                "are not on one scale: recompute with one functional or train separate models"
            )
        for key in SETTINGS_KEYS:
            if _setting(frame, key) != _setting(first, key):
                raise TrainingSetError(
                    f"mixed DFT settings in one training set: {name} has {key}={frame.info.get(key)!r} but "
                    f"{_frame_name(first, 0)} has {key}={first.info.get(key)!r}; total energies are only "
                    "comparable at identical settings: recompute the odd structures with the set's settings "
                    "(or drop them)"
                )


def dataset_hash(frames: Sequence[Atoms]) -> str:
    """16 hex digits identifying the frames (species, positions, cell, labels, DFT settings), order included."""
    digest = hashlib.sha256()
    for frame in frames:
        digest.update(" ".join(frame.get_chemical_symbols()).encode())
        for array in (frame.positions, frame.cell.array, frame.arrays.get(FORCES_KEY, np.zeros(0))):
            digest.update(np.round(np.asarray(array, dtype=float), 8).tobytes())
        digest.update(repr(round(float(frame.info.get(ENERGY_KEY, math.nan)), 8)).encode())
        digest.update(repr(sorted((k, str(v)) for k, v in frame.info.items() if k.startswith("dft_"))).encode())
    return digest.hexdigest()[:16]


def write_frames(frames: Sequence[Atoms], path: str | Path) -> Path:
    """Write frames as extxyz (the format mace-torch reads); written to a temporary file and renamed, so a
    crash never leaves a truncated file at ``path``."""
    from ase.io import write

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    write(tmp, list(frames), format="extxyz")
    os.replace(tmp, path)
    return path


def read_frames(path: str | Path) -> list[Atoms]:
    from ase.io import read

    return list(read(path, index=":", format="extxyz"))


# -------------------------------------------------------------------------------------------------- training


@dataclass
class TrainResult:
    """A trained model: ``model_path`` (the non-compiled ``.model`` file), its mace log and the wall time (s)."""

    model_path: Path
    log_path: Path
    seconds: float
    argv: list[str]
    e0s: dict[str, float] | str

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["model_path"], out["log_path"] = str(self.model_path), str(self.log_path)
        return out


def mace_train_argv(
    settings: TrainSettings, train_file: Path, name: str, e0s: dict[str, float] | None, test_file: Path | None = None
) -> list[str]:
    """The ``mace_run_train`` arguments for ``settings`` (``e0s``: eV per atom by element symbol, or None for
    mace's ``average``)."""
    from ase.data import atomic_numbers

    if settings.e0s == "elemental" and e0s is None:
        raise ValueError("train.e0s=elemental needs the elemental reference energies (e0s=...)")
    e0s_arg = "average" if settings.e0s == "average" else repr({atomic_numbers[s]: float(v) for s, v in e0s.items()})
    stress = settings.stress_weight > 0
    argv = [
        "--name", name,
        "--seed", str(settings.seed),
        "--train_file", str(train_file),
        "--valid_fraction", str(settings.valid_fraction),
        "--energy_key", ENERGY_KEY,
        "--forces_key", FORCES_KEY,
        "--stress_key", STRESS_KEY,
        "--E0s", e0s_arg,
        "--loss", "stress" if stress else "weighted",
        "--energy_weight", str(settings.energy_weight),
        "--forces_weight", str(settings.forces_weight),
        "--batch_size", str(settings.batch_size),
        "--valid_batch_size", str(settings.batch_size),
        "--max_num_epochs", str(settings.max_num_epochs),
        "--lr", str(settings.lr),
        "--device", settings.device,
        "--default_dtype", settings.dtype,
        "--eval_interval", "1",
        "--compute_stress", str(stress),
        "--scaling", settings.scaling,
        "--model_dir", ".", "--checkpoints_dir", "checkpoints", "--results_dir", "results", "--log_dir", "logs",
    ]  # fmt: skip
    if stress:
        argv += ["--stress_weight", str(settings.stress_weight)]
    if settings.stage_two:
        argv += [
            "--stage_two",
            "--stage_two_energy_weight", str(settings.stage_two_energy_weight),
            "--stage_two_forces_weight", str(settings.stage_two_forces_weight),
        ]  # fmt: skip
        if stress:
            argv += ["--stage_two_stress_weight", str(settings.stress_weight)]
    if test_file is not None:
        argv += ["--test_file", str(test_file)]
    if settings.foundation_model:
        argv += ["--foundation_model", str(Path(settings.foundation_model).expanduser().resolve())]
        argv += ["--multiheads_finetuning", "False"]
    else:
        argv += [
            "--model", "MACE",
            "--r_max", str(settings.r_max),
            "--num_channels", str(settings.num_channels),
            "--max_L", str(settings.max_L),
            "--correlation", str(settings.correlation),
            "--num_interactions", str(settings.num_interactions),
            "--num_radial_basis", str(settings.num_radial_basis),
            "--MLP_irreps", settings.mlp_irreps,
        ]  # fmt: skip
    return argv


def train_mace(
    frames: Sequence[Atoms],
    settings: TrainSettings,
    workdir: str | Path,
    e0s: dict[str, float] | None = None,
    name: str = "finetuned",
) -> TrainResult:
    """Train with ``python -m mace.cli.run_train`` in ``workdir`` on ``frames`` (validated first) and return the
    non-compiled ``<workdir>/<name>.model``.

    Raises:
        TrainingSetError: bad frames (see :func:`validate_training_set`).
        ValueError: ``foundation_model`` is not a file, or elemental E0s are missing an element.
        FinetuneError: mace-torch exited with an error (the end of its log is in the message).
    """
    validate_training_set(frames)
    if settings.foundation_model and not Path(settings.foundation_model).expanduser().is_file():
        raise ValueError(
            f"train.foundation_model={settings.foundation_model!r} is not a file: give a local .model file "
            "(named foundation models need a download; cache one on a connected machine first)"
        )
    if not settings.foundation_model and settings.scaling == "rms_forces_scaling":
        forces = np.concatenate([f.arrays[FORCES_KEY].ravel() for f in frames])
        rms = float(np.sqrt(np.mean(forces**2)))
        if rms < MIN_RMS_FORCE:
            raise TrainingSetError(
                f"the training forces have an RMS of {rms:.2g} eV/Å (relaxed or high-symmetry structures): "
                "train.scaling: rms_forces_scaling would scale the new model by that and freeze it near zero; "
                "set train.scaling: std_scaling, or add off-equilibrium (rattled) frames"
            )
    if settings.e0s == "elemental":
        symbols = {s for f in frames for s in f.get_chemical_symbols()}
        missing = sorted(symbols - set(e0s or {}))
        if missing:
            raise ValueError(f"train.e0s=elemental: no elemental reference energy for {', '.join(missing)}")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    train_file = write_frames(frames, workdir / "train.xyz")
    argv = mace_train_argv(settings, train_file.resolve(), name, e0s)
    log_path = workdir / "mace_train.log"
    threads = str(settings.threads)
    env = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, OPENBLAS_NUM_THREADS=threads)
    start = time.perf_counter()
    with log_path.open("w") as log:
        proc = subprocess.run(
            [sys.executable, "-m", "mace.cli.run_train", *argv], cwd=workdir, env=env, stdout=log, stderr=log
        )
    seconds = time.perf_counter() - start
    model = workdir / f"{name}.model"
    if proc.returncode != 0 or not model.is_file():
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-25:])
        raise FinetuneError(f"mace_run_train failed (exit {proc.returncode}); log {log_path}, last lines:\n{tail}")
    return TrainResult(model, log_path, seconds, argv, dict(e0s) if e0s else "average")


# ------------------------------------------------------------------------------------------------ evaluation


def predict(calculator, frames: Sequence[Atoms]) -> list[tuple[float, np.ndarray]]:
    """(energy eV, forces eV/Å (n, 3)) of ``calculator`` for each frame."""
    out = []
    for frame in frames:
        atoms = Atoms(frame.get_chemical_symbols(), positions=frame.positions, cell=frame.cell, pbc=True)
        atoms.calc = calculator
        out.append((float(atoms.get_potential_energy()), np.asarray(atoms.get_forces(), dtype=float)))
    return out


def relative_energy_mae(
    compositions: Sequence[str], reference: Sequence[float], predicted: Sequence[float]
) -> tuple[float, int]:
    """MAE (eV/atom) of per-atom energies relative to each composition's mean (computed separately for reference
    and prediction, so any per-element constant offset — another DFT code's scale — cancels). Compositions
    with a single frame carry no relative information and are skipped. Returns (mae, frames used)."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, comp in enumerate(compositions):
        groups[comp].append(i)
    errors = []
    for indices in groups.values():
        if len(indices) < 2:
            continue
        ref = np.array([reference[i] for i in indices])
        pred = np.array([predicted[i] for i in indices])
        errors.extend(np.abs((pred - pred.mean()) - (ref - ref.mean())))
    return (float(np.mean(errors)) if errors else math.nan), len(errors)


def evaluate_calculator(calculator, frames: Sequence[Atoms]) -> dict[str, float]:
    """Errors of ``calculator`` against the frames' labels.

    Returns:
        ``force_rmse`` (eV/Å over all components), ``force_mae`` (eV/Å), ``energy_mae`` (eV/atom, absolute:
        meaningful only for a model on the labels' energy scale), ``relative_energy_mae`` (eV/atom, within
        composition, see :func:`relative_energy_mae`), ``n_frames``, ``n_relative``.
    """
    validate_training_set(frames)
    predictions = predict(calculator, frames)
    force_errors = np.concatenate(
        [(f - fr.arrays[FORCES_KEY]).ravel() for (_, f), fr in zip(predictions, frames, strict=True)]
    )
    n_atoms = np.array([len(fr) for fr in frames])
    ref = np.array([fr.info[ENERGY_KEY] for fr in frames]) / n_atoms
    pred = np.array([e for e, _ in predictions]) / n_atoms
    compositions = [fr.get_chemical_formula(mode="metal", empirical=True) for fr in frames]
    rel_mae, n_rel = relative_energy_mae(compositions, ref, pred)
    return {
        "force_rmse": float(np.sqrt(np.mean(force_errors**2))),
        "force_mae": float(np.mean(np.abs(force_errors))),
        "energy_mae": float(np.mean(np.abs(pred - ref))),
        "relative_energy_mae": rel_mae,
        "n_frames": float(len(frames)),
        "n_relative": float(n_rel),
    }
