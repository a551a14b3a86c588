"""Import DFT that was computed elsewhere: VASP ``vasprun.xml`` (read with pymatgen) and extended XYZ with energies.

A validation engineer often has DFT already (a group's VASP runs, a dataset in extxyz). This module reads it into
one record form, :class:`ImportedCalculation`, that the rest of semidisc uses like its own GPAW results: as a
reference set for ``semidisc validate`` (:func:`to_reference_set`), as rows of ``dft_results.csv``
(:func:`as_result_rows`), or as labelled structures (energies, forces, stress) for training a potential.

Rules, so that nothing is compared across incompatible calculations:

* Every record keeps the functional and the settings it was computed with (``functional``, ``settings``).
  Formation energies (:func:`formation_energies`) are only formed from records that share functional, code and
  settings with their elemental references; anything else raises :class:`DFTImportError` naming the records.
* A file that cannot be read, or a frame without an energy, is a failure with its reason; the rest of the batch
  is still imported (:class:`ImportResult` keeps both). Reading nothing at all is an error.

Units: energies eV (``energy`` is the calculation's total energy on its code's own scale: VASP and GPAW total
energies are not comparable), forces eV/Å, stress GPa in ASE's sign convention (Voigt xx yy zz yz xz xy;
VASP's kBar pressure-positive values are converted), gaps eV.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms
from ase.units import GPa
from pymatgen.core import Structure
from pymatgen.io.ase import AseAtomsAdaptor

from materials.composition import reduced_formula
from materials.datasets.records import ReferenceRow, ReferenceSet, canonical_property, finite_float
from materials.errors import InputError

#: File names recognised when a folder is imported (searched recursively).
VASPRUN_PATTERNS = ("vasprun.xml", "vasprun.xml.gz", "vasprun*.xml", "vasprun*.xml.gz")
EXTXYZ_SUFFIXES = (".extxyz", ".xyz")
#: atoms.info keys read from extxyz frames (first one present wins).
EXTXYZ_ENERGY_KEYS = ("energy", "dft_energy", "REF_energy", "free_energy", "total_energy")
EXTXYZ_GAP_KEYS = ("band_gap", "gap", "bandgap")
EXTXYZ_FUNCTIONAL_KEYS = ("functional", "xc", "method")
#: atoms.info keys that are DFT settings (compared for consistency before energies are combined).
EXTXYZ_SETTING_KEYS = ("cutoff", "encut", "ecut", "kpoint_density", "smearing", "pseudopotentials")
#: atoms.info keys kept as details (recorded, not compared: they differ legitimately between cells).
EXTXYZ_DETAIL_KEYS = ("kpts",)
#: VASP's run types that all mean PBE with PBE PAW potentials (pymatgen reports "GGA" when the GGA tag is unset).
_PBE_ALIASES = {"GGA": "PBE", "PE": "PBE", "PBE": "PBE"}


class DFTImportError(InputError):
    """Imported DFT cannot be used as asked; the message names the files/records and what to change."""


@dataclass
class ImportedCalculation:
    """One DFT result read from a file.

    Attributes:
        id: ``<file stem>`` for a vasprun (``<folder>/vasprun`` when several share a stem), ``<file>:<frame>`` or
            the frame's ``id`` info for extxyz.
        source: path of the file it came from.
        code: ``vasp`` or what the extxyz frame says (``code`` info, else ``unknown``).
        functional: ``PBE``, ``PBEsol``, ``HSE06``, ``r2SCAN``, ... (VASP run type; extxyz ``functional``/``xc``
            info); ``unknown`` when not stated.
        settings: what else fixes the energy scale (cutoff, +U, spin, ...), compared before combining.
        details: recorded but not compared (k-point grid, which differs between cells; VASP POTCAR per element,
            checked element by element in :func:`check_consistent`).
        energy: total energy, eV (VASP: energy extrapolated to zero smearing).
        forces: (n, 3) eV/Å, or None.
        stress: 6 Voigt components in GPa (ASE sign), or None.
        band_gap / gap_direct / vbm / cbm: when the file has eigenvalues (vasprun) or a ``band_gap`` info.
        converged: electronic and ionic convergence as the file reports it (None: not stated).
        e_form_per_atom: filled by :func:`formation_energies`, or read from an extxyz ``e_form_per_atom`` info.
    """

    id: str
    source: str
    code: str
    functional: str
    structure: Structure
    energy: float
    forces: np.ndarray | None = None
    stress: list[float] | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    band_gap: float | None = None
    gap_direct: bool | None = None
    vbm: float | None = None
    cbm: float | None = None
    converged: bool | None = None
    e_form_per_atom: float | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def formula(self) -> str:
        return self.structure.composition.reduced_formula

    @property
    def n_atoms(self) -> int:
        return len(self.structure)

    @property
    def energy_per_atom(self) -> float:
        return self.energy / len(self.structure)

    @property
    def elements(self) -> frozenset[str]:
        return frozenset(el.symbol for el in self.structure.composition.elements)

    def settings_key(self) -> str:
        """Code, functional and settings as one comparable string (records combine only when theirs agree)."""
        return json.dumps({"code": self.code, "functional": self.functional, **self.settings}, sort_keys=True)

    def to_atoms(self) -> Atoms:
        """ASE Atoms with the energy, forces and stress attached (for training data or writing extxyz)."""
        from ase.calculators.singlepoint import SinglePointCalculator

        atoms = AseAtomsAdaptor.get_atoms(self.structure)
        results: dict[str, Any] = {"energy": self.energy}
        if self.forces is not None:
            results["forces"] = np.asarray(self.forces)
        if self.stress is not None:
            results["stress"] = np.asarray(self.stress) * GPa
        atoms.calc = SinglePointCalculator(atoms, **results)
        atoms.info.update({"id": self.id, "code": self.code, "functional": self.functional, **self.settings})
        atoms.info.update({k: v for k, v in self.details.items() if k in EXTXYZ_DETAIL_KEYS})
        return atoms


@dataclass
class ImportResult:
    """What an import read (``records``) and what it could not, ``(path or id, reason)`` (``failures``)."""

    records: list[ImportedCalculation]
    failures: list[tuple[str, str]]


def read_vasprun(path: str | Path, item_id: str | None = None) -> ImportedCalculation:
    """The final ionic step of a VASP run (``vasprun.xml`` or ``.xml.gz``).

    Raises:
        DFTImportError: unreadable or truncated file (pymatgen's message is included).
    """
    import warnings

    from pymatgen.io.vasp import Vasprun

    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # POTCAR-not-found and similar chatter; the facts we need are in the xml
            run = Vasprun(str(path), parse_potcar_file=False, parse_dos=False, parse_eigen=True)
    except Exception as exc:  # pymatgen raises many types for a broken file
        raise DFTImportError(f"{path}: not a readable vasprun.xml ({type(exc).__name__}: {exc})") from exc
    step = run.ionic_steps[-1]
    energy = finite_float(step.get("e_0_energy", run.final_energy))
    if energy is None:
        raise DFTImportError(f"{path}: the last ionic step has no energy (a run that died before its first step?)")
    run_type = str(run.run_type)
    gga_tag = str(run.incar.get("GGA", "") or "").strip().upper()
    if run_type.upper() == "GGA" and not gga_tag and run.potcar_symbols:
        # no GGA tag: VASP takes the functional of the POTCARs (LDA ones are named "PAW X", PBE ones "PAW_PBE X")
        functional = "PBE" if all("PBE" in sym for sym in run.potcar_symbols) else "LDA"
    else:
        functional = _PBE_ALIASES.get(run_type.upper(), run_type)
    params = run.parameters
    settings = {
        "encut": finite_float(params.get("ENCUT")) or finite_float(params.get("ENMAX")),
        "ispin": int(params.get("ISPIN", 1)),
        "ldau": bool(params.get("LDAU", False)),
    }
    details = {
        "kpts": [list(map(int, k)) for k in run.kpoints.kpts] if run.kpoints is not None else None,
        "potcars": {sym.split()[1].split("_")[0]: sym for sym in run.potcar_symbols if len(sym.split()) > 1},
    }
    forces = np.asarray(step["forces"], dtype=float) if step.get("forces") is not None else None
    stress = None
    if step.get("stress") is not None:
        s = -0.1 * np.asarray(step["stress"], dtype=float)  # kBar, pressure-positive -> GPa, ASE sign
        stress = [s[0, 0], s[1, 1], s[2, 2], s[1, 2], s[0, 2], s[0, 1]]
    record = ImportedCalculation(
        id=item_id or path.name.split(".")[0],
        source=str(path),
        code="vasp",
        functional=functional,
        structure=run.final_structure,
        energy=energy,
        forces=forces,
        stress=[float(x) for x in stress] if stress is not None else None,
        settings=settings,
        details=details,
        converged=bool(run.converged),
    )
    if not run.converged:
        parts = [n for n, ok in (("electronic", run.converged_electronic), ("ionic", run.converged_ionic)) if not ok]
        record.notes.append(f"VASP reports the run not converged ({', '.join(parts)})")
    try:
        gap, cbm, vbm, direct = run.eigenvalue_band_properties
        record.band_gap, record.cbm, record.vbm = float(gap), float(cbm), float(vbm)
        record.gap_direct = bool(direct) if gap > 0 else None
        if len(run.actual_kpoints) < 8:
            record.notes.append(f"band gap from only {len(run.actual_kpoints)} k-points: an upper bound at best")
    except Exception as exc:  # no eigenvalues written (e.g. LORBIT/NWRITE settings)
        record.notes.append(f"no band gap: {type(exc).__name__}: {exc}")
    return record


def read_extxyz(path: str | Path) -> ImportResult:
    """Every frame of an extended-XYZ file; frames without an energy are failures naming the frame.

    Energy: the frame's calculator energy (ASE stores ``energy=`` there) or one of ``EXTXYZ_ENERGY_KEYS`` in its
    info; forces from the ``forces`` array; stress (eV/Å³, ASE sign) converted to GPa. ``functional``/``xc``,
    ``band_gap`` and the settings in ``EXTXYZ_SETTING_KEYS`` are read from the info when present.
    """
    from ase.io import read

    path = Path(path)
    try:
        frames = read(str(path), index=":", format="extxyz")
    except Exception as exc:
        raise DFTImportError(f"{path}: not a readable extended-XYZ file ({type(exc).__name__}: {exc})") from exc
    records: list[ImportedCalculation] = []
    failures: list[tuple[str, str]] = []
    for index, atoms in enumerate(frames):
        info = dict(atoms.info)
        item_id = str(info.get("id", f"{path.stem}:{index}"))
        energy, forces, stress = None, None, None
        if atoms.calc is not None:
            results = getattr(atoms.calc, "results", {})
            energy = finite_float(results.get("energy", results.get("free_energy")))
            forces = results.get("forces")
            if results.get("stress") is not None:
                stress = [float(x) for x in np.asarray(results["stress"]).reshape(-1)[:6] / GPa]
        if energy is None:
            energy = next((finite_float(info[k]) for k in EXTXYZ_ENERGY_KEYS if k in info), None)
        if forces is None and "forces" in atoms.arrays:
            forces = atoms.arrays["forces"]
        if energy is None:
            failures.append(
                (
                    f"{path}:{index}",
                    f"frame {index} ({atoms.get_chemical_formula()}) has no energy: write it with "
                    f"ase.io.write (energy from the calculator) or as one of the info keys {EXTXYZ_ENERGY_KEYS}",
                )
            )
            continue
        functional = next((str(info[k]) for k in EXTXYZ_FUNCTIONAL_KEYS if k in info), "unknown")
        gap = next((finite_float(info[k]) for k in EXTXYZ_GAP_KEYS if k in info), None)
        settings = {k: _jsonable(info[k]) for k in EXTXYZ_SETTING_KEYS if k in info}
        details = {k: _jsonable(info[k]) for k in EXTXYZ_DETAIL_KEYS if k in info}
        record = ImportedCalculation(
            id=item_id,
            source=str(path),
            code=str(info.get("code", "unknown")),
            functional=_PBE_ALIASES.get(functional.upper(), functional),
            structure=AseAtomsAdaptor.get_structure(atoms),
            energy=energy,
            forces=np.asarray(forces, dtype=float) if forces is not None else None,
            stress=stress,
            settings=settings,
            details=details,
            band_gap=gap,
            converged=bool(info["converged"]) if "converged" in info else None,
            e_form_per_atom=finite_float(info.get("e_form_per_atom")),
        )
        if functional == "unknown":
            record.notes.append("functional not stated (add a 'functional' info key)")
        records.append(record)
    return ImportResult(records, failures)


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _files_under(folder: Path) -> list[Path]:
    found: set[Path] = set()
    for pattern in VASPRUN_PATTERNS:
        found.update(p for p in folder.rglob(pattern) if p.is_file())
    for suffix in EXTXYZ_SUFFIXES:
        found.update(p for p in folder.rglob(f"*{suffix}") if p.is_file())
    return sorted(found)


def is_dft_path(path: str | Path) -> bool:
    """True for what :func:`import_dft` reads: a vasprun, an extxyz/xyz file, or a folder holding any."""
    path = Path(path)
    if path.is_dir():
        return bool(_files_under(path))
    name = path.name.lower()
    return name.startswith("vasprun") or name.endswith(EXTXYZ_SUFFIXES)


def import_dft(paths: str | Path | Iterable[str | Path]) -> ImportResult:
    """Read every vasprun.xml(.gz) and extxyz given, or found (recursively) in the folders given.

    Ids are the file stems (vasprun: the parent folder's name, as a VASP run is one folder per calculation) and
    must be unique: a repeated id gets ``-2``, ``-3`` appended and a note.

    Raises:
        DFTImportError: a path does not exist, or nothing at all could be read (every failure is listed).
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    files: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise DFTImportError(f"{p}: no such file or folder")
        files.extend(_files_under(p) if p.is_dir() else [p])
    if not files:
        raise DFTImportError(
            f"no vasprun.xml or .extxyz files under {', '.join(map(str, paths))}; give files or folders holding them"
        )
    records: list[ImportedCalculation] = []
    failures: list[tuple[str, str]] = []
    for path in files:
        try:
            if path.name.lower().startswith("vasprun"):
                default_id = path.parent.name if path.name.split(".")[0] == "vasprun" else path.name.split(".")[0]
                records.append(read_vasprun(path, item_id=default_id or "vasprun"))
            else:
                result = read_extxyz(path)
                records.extend(result.records)
                failures.extend(result.failures)
        except DFTImportError as exc:
            failures.append((str(path), str(exc)))
    seen: dict[str, int] = defaultdict(int)
    for rec in records:
        seen[rec.id] += 1
        if seen[rec.id] > 1:
            new_id = f"{rec.id}-{seen[rec.id]}"
            rec.notes.append(f"id {rec.id!r} repeated; renamed {new_id!r}")
            rec.id = new_id
    if not records:
        listing = "\n".join(f"  {where}: {why}" for where, why in failures)
        raise DFTImportError(f"nothing could be imported:\n{listing}")
    return ImportResult(records, failures)


def check_consistent(records: Sequence[ImportedCalculation], purpose: str) -> str:
    """The one settings key all ``records`` share; else :class:`DFTImportError` listing each group's ids.

    Also checks that an element has the same VASP POTCAR in every record that names one."""
    groups: dict[str, list[str]] = defaultdict(list)
    potcars: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for rec in records:
        groups[rec.settings_key()].append(rec.id)
        for element, potcar in (rec.details.get("potcars") or {}).items():
            potcars[element][potcar].append(rec.id)
    for element, used in potcars.items():
        if len(used) > 1:
            listing = "; ".join(f"{p}: {', '.join(ids[:6])}" for p, ids in used.items())
            raise DFTImportError(f"{purpose} needs one POTCAR per element; {element} has several ({listing})")
    if len(groups) > 1:
        lines = [f"  {key}: {', '.join(ids[:6])}{' ...' if len(ids) > 6 else ''}" for key, ids in groups.items()]
        raise DFTImportError(
            f"{purpose} needs calculations with one code, functional and settings; these differ:\n"
            + "\n".join(lines)
            + "\nimport each group separately (or drop the odd ones)"
        )
    return next(iter(groups))


def formation_energies(records: Sequence[ImportedCalculation]) -> dict[str, float]:
    """Formation energy (eV/atom) of every record against elemental references from the same import.

    The reference of an element is its lowest energy per atom among the single-element records; all records
    must share code, functional and settings (:func:`check_consistent`). Fills ``e_form_per_atom`` in place
    and returns ``{id: e_form}``.

    Raises:
        DFTImportError: mixed settings, or an element with no single-element record (the message lists them and
            says to import an elemental calculation done with the same settings).
    """
    check_consistent(records, "a formation energy")
    mu: dict[str, float] = {}
    for rec in records:
        if len(rec.elements) == 1:
            (symbol,) = rec.elements
            mu[symbol] = min(mu.get(symbol, math.inf), rec.energy_per_atom)
    missing = sorted({el for rec in records for el in rec.elements} - set(mu))
    if missing:
        raise DFTImportError(
            f"no elemental reference for {', '.join(missing)}: import a calculation of each pure element done with "
            "the same code, functional and settings (or give e_form_per_atom in the extxyz info)"
        )
    out = {}
    for rec in records:
        comp = rec.structure.composition
        ref = sum(amount * mu[el.symbol] for el, amount in comp.items())
        rec.e_form_per_atom = (rec.energy - ref) / comp.num_atoms
        out[rec.id] = rec.e_form_per_atom
    return out


def data_hash(records: Sequence[ImportedCalculation]) -> str:
    """First 16 hex digits of a SHA-256 over ids, settings, structures and energies (a training-data identity)."""
    digest = hashlib.sha256()
    for rec in sorted(records, key=lambda r: r.id):
        digest.update(rec.id.encode())
        digest.update(rec.settings_key().encode())
        digest.update(np.round(rec.structure.cart_coords, 6).tobytes())
        digest.update(np.round(rec.structure.lattice.matrix, 6).tobytes())
        digest.update(f"{rec.energy:.6f}".encode())
    return digest.hexdigest()[:16]


def to_reference_set(result: ImportResult | Sequence[ImportedCalculation], property: str, name: str) -> ReferenceSet:
    """The imported values of ``property`` as a :class:`ReferenceSet` (with structures, for structure matching).

    ``band_gap``: records with a gap. ``formation_energy``: given ``e_form_per_atom`` values, else computed by
    :func:`formation_energies` (which needs elemental references in the import). Records without the property
    are counted in the set's notes, never silently dropped.
    """
    records = list(result.records if isinstance(result, ImportResult) else result)
    prop = canonical_property(property)
    notes = []
    if isinstance(result, ImportResult) and result.failures:
        notes.append(
            f"{len(result.failures)} file(s)/frame(s) could not be read: "
            + "; ".join(f"{w} ({r.splitlines()[0][:120]})" for w, r in result.failures[:5])
        )
    if prop == "formation_energy" and any(r.e_form_per_atom is None for r in records):
        formation_energies(records)
    rows = []
    skipped = []
    for rec in records:
        value = rec.band_gap if prop == "band_gap" else rec.e_form_per_atom
        if value is None or not math.isfinite(value):
            skipped.append(rec.id)
            continue
        rows.append(
            ReferenceRow(
                id=rec.id,
                formula=reduced_formula(rec.formula),
                value=float(value),
                uncertainty=None,
                method=rec.functional,
                source=rec.source,
                structure=rec.structure,
                e_form_per_atom=rec.e_form_per_atom,
            )
        )
    if skipped:
        notes.append(f"{len(skipped)} record(s) without {prop}: {', '.join(skipped[:10])}")
    if prop == "formation_energy":
        notes.append("formation energies against the lowest-energy elemental records of the same import")
    if not rows:
        raise DFTImportError(f"{name}: none of the {len(records)} imported record(s) has {prop}")
    return ReferenceSet(name, prop, rows, "ground_state" if prop == "formation_energy" else "mean", name, notes)


def as_result_rows(records: Sequence[ImportedCalculation]) -> list[dict[str, Any]]:
    """Rows with the columns of semidisc's ``dft_results.csv`` (plus ``functional``, ``code``, ``source``)."""
    rows = []
    for rec in records:
        lattice = rec.structure.lattice
        max_force = (
            float(np.linalg.norm(rec.forces, axis=1).max()) if rec.forces is not None and len(rec.forces) else None
        )
        rows.append(
            {
                "id": rec.id,
                "formula": rec.formula,
                "task": "imported",
                "status": "ok",
                "failure_reason": None,
                "n_atoms": rec.n_atoms,
                "energy_per_atom": rec.energy_per_atom,
                "e_form_per_atom": rec.e_form_per_atom,
                "a": lattice.a,
                "b": lattice.b,
                "c": lattice.c,
                "volume_per_atom": rec.structure.volume / rec.n_atoms,
                "band_gap": rec.band_gap,
                "gap_direct": rec.gap_direct,
                "vbm": rec.vbm,
                "cbm": rec.cbm,
                "converged": rec.converged,
                "max_force": max_force,
                "functional": rec.functional,
                "code": rec.code,
                "source": rec.source,
                "notes": "; ".join(rec.notes),
            }
        )
    return rows
