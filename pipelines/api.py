"""The Python API for notebooks: a screen, its results and band-gap predictions as pandas DataFrames.

    from pipelines.api import screen, load_results, predict_gaps

    results = screen([si, gaas], "configs/quickstart.yaml", out_dir="runs/my-screen")
    results[["id", "formula", "e_form_per_atom", "e_above_hull"]]     # eV/atom
    results.loc[0, "structure"]                                       # the relaxed pymatgen Structure
    predict_gaps(["GaAs", si, Composition("ZnO")])                    # eV, one row per input

:func:`screen` runs the same screen as ``semidisc screen`` (:func:`pipelines.screen.run_screen`: checks, MLIP
relaxation on local Ray workers, stability, the result store, MLflow) and returns ``results.csv`` with the relaxed
structures attached. Structures given in memory are written to ``<out_dir>/inputs/`` (pymatgen JSON, lossless)
and screened as a folder, so ``resume=True`` continues an interrupted screen exactly as ``--resume`` does.
"""

from __future__ import annotations

import json
import sqlite3
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
from pymatgen.core import Composition, Structure

from materials.datasets.sustainability import SUSTAINABILITY_COLUMNS, sustainability_rows
from materials.errors import InputError
from materials.structures.inputs import read_structure
from pipelines.store import RESULT_COLUMNS, ResultStore

if TYPE_CHECKING:
    from pipelines.config import ScreenConfig

#: Subfolder of a screen's output that holds the structures given to :func:`screen` in memory.
INPUTS_DIR = "inputs"
#: Column of the frames of :func:`screen` / :func:`load_results` holding the relaxed structure (None if failed).
STRUCTURE_COLUMN = "structure"
#: Characters an id may not contain: it names the input file ``<id>.json``.
_ID_FORBIDDEN = ("/", "\\", "\0")


class NotAScreenError(InputError):
    """A folder given to :func:`load_results` holds no screen's result store."""


def screen(
    structures: Sequence[Structure] | Structure | str | Path | None,
    config: ScreenConfig | Mapping[str, Any] | str | Path,
    out_dir: str | Path | None = None,
    limit: int | None = None,
    resume: bool = False,
    progress: bool = False,
    ids: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Screen structures with the config's potential and return the results, relaxed structures attached.

    Args:
        structures: pymatgen Structures (a list, or one); a folder of CIF/POSCAR/extxyz/JSON files, or one such
            file (ids are the file stems); or None for the config's candidates (``candidates.prototypes``).
        config: a :class:`~pipelines.config.ScreenConfig`, a YAML file (:func:`pipelines.config.load_config`) or
            the YAML's contents as a dict.
        out_dir: the output folder; default the config's ``output_dir``. In-memory structures are written to
            ``<out_dir>/inputs/<id>.json``.
        limit: screen only the first ``limit`` items (>= 1; items in id order); None for all.
        resume: continue the screen already in ``out_dir`` (finished items are not relaxed again). Without it a
            folder holding results is refused; either way a folder holding another screen, or other in-memory
            structures, is refused.
        progress: show a progress bar of relaxations.
        ids: names of in-memory structures, unique, usable as file names; default ``000-Si``, ``001-GaAs``, ...
            (input position + reduced formula, so the rows keep the input order).

    Returns:
        One row per item as in ``results.csv`` (see :func:`load_results`): energies eV/atom, volumes Å³/atom,
        forces eV/Å, ``seconds`` s, band-gap columns eV; plus ``structure``, the relaxed pymatgen Structure (cell
        in Å), None for a failed item.

    Raises:
        InputError: a bad ``structures``, ``ids`` or ``limit``; an invalid config (``ConfigError``); ``out_dir``
            holding another screen or, without ``resume``, this one (``ResumeError``).
        PotentialError: the potential cannot be loaded.
    """
    from pipelines.screen import ResumeError, run_screen

    screen_config = _as_config(config)
    out = Path(out_dir if out_dir is not None else screen_config.output_dir)
    folder: str | None
    if structures is None:
        if ids is not None:
            raise InputError("ids= names in-memory structures; the config's candidates carry their own ids")
        folder = None
    elif isinstance(structures, (str, Path)) and Path(structures).is_dir():
        if ids is not None:
            raise InputError(f"ids= names in-memory structures; the files in {structures} are named by their stems")
        folder = str(structures)
    elif isinstance(structures, (str, Path)):
        path = Path(structures)
        if not path.is_file():
            raise InputError(f"structures={str(path)!r}: no such file or folder; give Structures, a folder or a file")
        folder = str(write_inputs(out, [read_structure(path)], ids or [path.stem]).resolve())
    else:
        items = [structures] if isinstance(structures, Structure) else list(structures)
        # resolved: the screen's fingerprint holds this path, so "out" and "./out" must resume the same screen
        folder = str(write_inputs(out, items, ids).resolve())
    try:
        run_screen(screen_config, structures=folder, limit=limit, out_dir=out, resume=resume, progress=progress)
    except ResumeError as exc:
        raise ResumeError(
            f"{exc} (from Python: screen(..., resume=True) continues it, load_results({str(out)!r}) reads it, "
            "out_dir= chooses another folder)"
        ) from None
    return load_results(out)


def write_inputs(out_dir: str | Path, structures: Sequence[Structure], ids: Sequence[str] | None = None) -> Path:
    """Write in-memory structures to ``<out_dir>/inputs/<id>.json`` (pymatgen JSON) and return that folder.

    The same structures again leave the folder untouched (a resumed screen reads what it read before). Other
    structures replace the files only while the screen's store holds no result: the screen's fingerprint names the
    folder, not its contents, so replacing them under stored results would mix two screens.

    Raises:
        InputError: no structures, an item that is not a Structure, bad or repeated ids, or other structures than
            those of the results already stored in ``out_dir``.
    """
    out = Path(out_dir)
    if not structures:
        raise InputError("structures: the list is empty; give at least one pymatgen Structure")
    for i, item in enumerate(structures):
        if not isinstance(item, Structure):
            hint = " (convert ASE Atoms with pymatgen.io.ase.AseAtomsAdaptor.get_structure)" if _is_atoms(item) else ""
            raise InputError(f"structures[{i}]: {type(item).__name__} is not a pymatgen Structure{hint}")
    names = list(ids) if ids is not None else _default_ids(structures)
    _check_ids(names, len(structures))
    payload = {
        f"{name}.json": json.dumps(s.as_dict(), sort_keys=True) for name, s in zip(names, structures, strict=True)
    }
    inputs = out / INPUTS_DIR
    existing = {p.name: p.read_text() for p in sorted(inputs.glob("*.json"))} if inputs.is_dir() else {}
    if existing == payload:
        return inputs
    n_stored = _count_results(out / "results.sqlite")
    if n_stored:
        raise InputError(
            f"{out} holds {n_stored} results of a screen of other inputs than these structures; "
            "give another out_dir, or load them with load_results"
        )
    inputs.mkdir(parents=True, exist_ok=True)
    for stale in set(existing) - set(payload):
        (inputs / stale).unlink()
    for name, text in payload.items():
        (inputs / name).write_text(text)
    return inputs


def load_results(out_dir: str | Path) -> pd.DataFrame:
    """The results of a finished or interrupted screen folder as a DataFrame, relaxed structures attached.

    Rows are the items in id order, columns those of ``results.csv``: ``id, formula, prototype, source, status,
    failure_reason, n_atoms, energy_per_atom`` (eV/atom), ``e_form_per_atom``, ``e_above_hull`` (signed),
    ``e_above_hull_screen`` (eV/atom), ``warning, energy_convention, volume_per_atom, initial_volume_per_atom``
    (Å³/atom), ``max_force`` (eV/Å), ``relax_steps, converged, potential, seconds`` (s), then the band-gap
    columns (``gap_pbe``, ``gap_expt``, ... eV; ``p_metal``), and ``structure``: the relaxed pymatgen Structure,
    None for a failed item. Empty cells are NaN.

    A screen that did not finish has no up-to-date ``results.csv``: the rows then come from its store
    (``results.sqlite``), formation energies and hull distances only where a finished run computed them and no
    band-gap columns; ``frame.attrs["finished"]`` is False (True otherwise) and ``frame.attrs["out_dir"]`` is the
    folder.

    Raises:
        NotAScreenError: ``out_dir`` is missing or holds no screen result store.
    """
    out = Path(out_dir)
    store_path = out / "results.sqlite"
    if not out.is_dir():
        raise NotAScreenError(f"{out}: no such folder; give the out_dir of screen() or the --out of semidisc screen")
    if not store_path.is_file():
        raise NotAScreenError(
            f"{out} is not a screen output folder (no results.sqlite with screen results in it); give the out_dir "
            "of screen() or the --out of semidisc screen"
        )
    _count_results(store_path)  # a file that is not a result store is named with the reason
    with ResultStore(store_path) as store:
        records = list(store.records(with_structures=True))
    structures = {r["id"]: Structure.from_dict(r["structure"]) if r["structure"] else None for r in records}
    csv_path = out / "results.csv"
    frame = pd.read_csv(csv_path, dtype={"id": str}) if csv_path.is_file() else None
    finished = frame is not None and list(frame["id"]) == [r["id"] for r in records]
    if not finished:
        warnings.warn(
            f"{out}: the screen has not finished (results.csv missing or older than results.sqlite); rows come from "
            "the store, without band gaps and with E_form/E_hull only where computed. Finish it with "
            "screen(..., resume=True) or semidisc screen --resume",
            stacklevel=2,
        )
        frame = pd.DataFrame.from_records(
            [{k: r[k] for k in RESULT_COLUMNS} for r in records], columns=list(RESULT_COLUMNS)
        )
    frame[STRUCTURE_COLUMN] = [structures[i] for i in frame["id"]]
    frame.attrs["out_dir"] = str(out)
    frame.attrs["finished"] = finished
    return frame


def predict_gaps(
    inputs: Iterable[str | Structure | Composition] | str | Structure | Composition,
    model_path: str | Path | None = None,
) -> pd.DataFrame:
    """Band gaps from composition with the shipped GNN ensemble (:func:`materials.ml.bandgap.predict_gaps`).

    Args:
        inputs: formula strings, pymatgen Structures or Compositions (a list, or one). A Structure or Composition
            is predicted from its reduced formula: the model sees composition only, so polymorphs share the numbers.
        model_path: another ensemble file (``semidisc train-gap``); default the shipped one.

    Returns:
        One row per input, in input order: ``input`` (as given), ``formula`` (the formula predicted),
        ``reduced_formula``, ``gap_pbe``, ``gap_pbe_std``, ``gap_expt``, ``gap_expt_std``, ``gap_expt_lo``,
        ``gap_expt_hi``, ``gap_expt_nonmetal`` (eV), ``p_metal``, ``p_metal_pbe``, ``metal_prior``, ``gap_source``
        and ``error``: missing (``frame["error"].isna()``) when predicted, else why there is no prediction (the
        row's numbers are then NaN). A bad input does not stop the others. Then the supply-chain columns of
        :mod:`materials.datasets.sustainability` (``hhi_production``, ``hhi_reserve``, ``cost_per_kg``,
        ``scarcest_element``, ``scarcest_abundance_ppm``, ``toxic_elements``, ``critical_raw_materials``;
        ``"unknown"`` where the data lacks an element).

    Raises:
        BandGapError: the model file is missing or unusable.
    """
    from materials.ml.bandgap import PREDICTION_COLUMNS
    from materials.ml.bandgap import predict_gaps as predict_formulas

    items = [inputs] if isinstance(inputs, (str, Structure, Composition)) else list(inputs)
    formulas: list[str | None] = []
    for item in items:
        if isinstance(item, str):
            formulas.append(item)
        elif isinstance(item, Structure):
            formulas.append(item.composition.reduced_formula)
        elif isinstance(item, Composition):
            formulas.append(item.reduced_formula)
        else:
            formulas.append(None)
    readable = [f for f in formulas if f is not None]
    predicted = iter(predict_formulas(readable, model_path=model_path) if readable else [])
    rows: list[dict[str, Any]] = []
    for item, formula in zip(items, formulas, strict=True):
        if formula is not None:
            rows.append({"input": item, **next(predicted)})
        else:  # its numbers are left missing (NaN)
            reason = f"{type(item).__name__} is not a formula string, pymatgen Structure or Composition"
            rows.append({"input": item, "formula": None, "reduced_formula": None, "error": reason})
    # the model's own keys, in its order; the fallback names them when no input could be read
    keys = next((list(r) for r in rows if r["formula"] is not None), None) or [
        "input",
        "formula",
        "reduced_formula",
        *PREDICTION_COLUMNS,
        "p_metal_pbe",
        "metal_prior",
        "error",
    ]
    frame = pd.DataFrame(rows, columns=keys)
    supply = pd.DataFrame(sustainability_rows([r["formula"] for r in rows]), columns=list(SUSTAINABILITY_COLUMNS))
    return pd.concat([frame, supply], axis=1)


def _as_config(config: ScreenConfig | Mapping[str, Any] | str | Path) -> ScreenConfig:
    from pipelines.config import ScreenConfig, load_config, parse_config

    if isinstance(config, ScreenConfig):
        return config
    if isinstance(config, (str, Path)):
        return load_config(config)
    if isinstance(config, Mapping):
        return parse_config(dict(config))
    raise InputError(f"config: {type(config).__name__} is not a ScreenConfig, a YAML path or a dict")


def _default_ids(structures: Sequence[Structure]) -> list[str]:
    width = max(3, len(str(len(structures) - 1)))
    return [f"{i:0{width}d}-{s.composition.reduced_formula}" for i, s in enumerate(structures)]


def _check_ids(ids: Sequence[str], n_structures: int) -> None:
    if len(ids) != n_structures:
        raise InputError(f"{len(ids)=} != {n_structures=}: give one id per structure")
    bad = [
        name
        for name in ids
        if not isinstance(name, str) or not name.strip() or name in (".", "..") or any(c in name for c in _ID_FORBIDDEN)
    ]
    if bad:
        raise InputError(f"ids {bad!r}: an id names a file, so it must be a non-empty string without / or \\")
    seen: dict[str, str] = {}
    for name in ids:
        if name.lower() in seen:  # case-insensitive file systems would merge the two files
            raise InputError(f"ids {seen[name.lower()]!r} and {name!r} repeat; give each structure its own id")
        seen[name.lower()] = name


def _count_results(store_path: Path) -> int:
    """Rows in a screen's result store; 0 when there is no store yet (read-only: creates nothing).

    Raises:
        NotAScreenError: ``store_path`` exists but is not a screen's result store (the SQLite error says why).
    """
    if not store_path.is_file():
        return 0
    try:
        db = sqlite3.connect(f"{store_path.resolve().as_uri()}?mode=ro", uri=True)
        try:
            return int(db.execute("SELECT COUNT(*) FROM results").fetchone()[0])
        finally:
            db.close()
    except sqlite3.DatabaseError as exc:  # not SQLite, or no results table
        raise NotAScreenError(
            f"{store_path} is not a screen's result store ({exc}); give the out_dir of screen() or the --out of "
            "semidisc screen"
        ) from None


def _is_atoms(item: object) -> bool:
    from ase import Atoms

    return isinstance(item, Atoms)


__all__ = [
    "INPUTS_DIR",
    "STRUCTURE_COLUMN",
    "NotAScreenError",
    "load_results",
    "predict_gaps",
    "screen",
    "write_inputs",
]
