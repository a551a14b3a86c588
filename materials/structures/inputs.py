"""Loading user structures and checking them before any simulation.

Checks are cheap and run before a potential is evaluated, so a bad item is rejected with a reason
instead of crashing a worker or producing a meaningless energy.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass as config_dataclass
from pymatgen.core import Structure
from pymatgen.io.ase import AseAtomsAdaptor

from materials.errors import InputError

#: File suffixes read by :func:`load_structure_dir` (case-insensitive); POSCAR/CONTCAR match by name.
STRUCTURE_SUFFIXES = (".cif", ".vasp", ".poscar", ".extxyz", ".xyz", ".json")


class StructureCheckError(InputError):
    """A structure failed a pre-simulation check; the message names the item and the fix."""


@config_dataclass(config=ConfigDict(extra="forbid"))
class CheckSettings:
    """Thresholds for :func:`check_structure`.

    Attributes:
        min_distance: smallest allowed interatomic distance, Å (periodic images included).
        min_volume_per_atom: smallest allowed cell volume per atom, Å^3/atom.
        max_volume_per_atom: largest allowed cell volume per atom, Å^3/atom.
        max_atoms: largest cell accepted, atoms.
    """

    min_distance: float = Field(default=0.7, gt=0)
    min_volume_per_atom: float = Field(default=2.0, gt=0)
    max_volume_per_atom: float = Field(default=150.0, gt=0)
    max_atoms: int = Field(default=200, ge=1)

    def __post_init__(self) -> None:
        if self.max_volume_per_atom <= self.min_volume_per_atom:
            raise InputError(
                f"checks: max_volume_per_atom={self.max_volume_per_atom} must exceed "
                f"min_volume_per_atom={self.min_volume_per_atom} (Å^3/atom)"
            )


@dataclass
class LoadedStructure:
    """A structure read from a file, or the reason it could not be read (``structure`` is None)."""

    id: str
    source: str
    structure: Structure | None
    error: str | None = None


def read_structure(path: str | Path) -> Structure:
    """Read one CIF/POSCAR/extxyz/pymatgen-JSON file into a pymatgen Structure.

    Raises:
        StructureCheckError: the file cannot be parsed, naming the file and the formats accepted.
    """
    path = Path(path)
    try:
        if path.suffix.lower() in (".extxyz", ".xyz"):
            from ase.io import read

            return AseAtomsAdaptor.get_structure(read(path, index=0))
        return Structure.from_file(path)
    except Exception as exc:  # any parser error becomes one message naming the file
        raise StructureCheckError(
            f"{path}: unreadable structure file ({type(exc).__name__}: {exc}). "
            f"Give a CIF, POSCAR/CONTCAR, extxyz or pymatgen JSON file with a periodic cell."
        ) from exc


def is_structure_file(path: Path) -> bool:
    name = path.name.upper()
    return path.is_file() and (path.suffix.lower() in STRUCTURE_SUFFIXES or name.startswith(("POSCAR", "CONTCAR")))


def load_structure_dir(directory: str | Path) -> list[LoadedStructure]:
    """Read every structure file in ``directory`` (sorted by name; not recursive).

    Unreadable files are returned with ``structure=None`` and the reason, so a batch keeps going.
    Ids are the file stems; a repeated stem gets the suffix appended to stay unique.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"--structures {directory}: not a directory; give a folder of CIF/POSCAR/extxyz files")
    files = sorted(p for p in directory.iterdir() if is_structure_file(p))
    if not files:
        raise FileNotFoundError(
            f"{directory}: no structure files found (looked for {', '.join(STRUCTURE_SUFFIXES)}, POSCAR*, CONTCAR*)"
        )
    out: list[LoadedStructure] = []
    seen: set[str] = set()
    for path in files:
        item_id = path.stem if path.stem not in seen else path.name
        seen.add(item_id)
        try:
            out.append(LoadedStructure(item_id, str(path), read_structure(path)))
        except StructureCheckError as exc:
            out.append(LoadedStructure(item_id, str(path), None, str(exc)))
    return out


def min_interatomic_distance(structure: Structure) -> float:
    """Smallest distance between two atoms including periodic images, Å (inf for one atom in a huge cell)."""
    if len(structure) == 1:
        lengths = structure.lattice.abc
        return float(min(lengths))
    dm = structure.distance_matrix
    np.fill_diagonal(dm, np.inf)
    best = float(dm.min())
    # self-images: an atom and its own periodic copy
    return min(best, float(min(structure.lattice.abc)))


def check_structure(
    structure: Structure,
    settings: CheckSettings | None = None,
    supported_elements: Iterable[str] | None = None,
    name: str = "structure",
) -> None:
    """Raise :class:`StructureCheckError` naming ``name``, the value and the fix if a check fails.

    Checks, in order: empty or non-finite cell, too many atoms, volume per atom out of range,
    atoms closer than ``settings.min_distance`` Å, elements the potential does not support.
    """
    settings = settings or CheckSettings()
    if len(structure) == 0:
        raise StructureCheckError(f"{name}: no atoms in the structure; give a cell with at least one site")
    matrix = np.asarray(structure.lattice.matrix, dtype=float)
    if not np.all(np.isfinite(matrix)) or not np.all(np.isfinite(structure.frac_coords)):
        raise StructureCheckError(f"{name}: the cell or coordinates contain NaN/inf; fix the input file")
    volume = abs(float(np.linalg.det(matrix)))
    if volume < 1e-6 or not math.isfinite(volume):
        raise StructureCheckError(f"{name}: the cell is empty or degenerate (volume {volume:.3g} Å^3)")
    if len(structure) > settings.max_atoms:
        raise StructureCheckError(
            f"{name}: {len(structure)} atoms > checks.max_atoms={settings.max_atoms}; "
            "raise the limit or use a primitive cell"
        )
    vpa = volume / len(structure)
    if not settings.min_volume_per_atom <= vpa <= settings.max_volume_per_atom:
        raise StructureCheckError(
            f"{name}: volume per atom {vpa:.2f} Å^3 is outside [{settings.min_volume_per_atom}, "
            f"{settings.max_volume_per_atom}] Å^3/atom; check the lattice units (Å) or the checks settings"
        )
    dmin = min_interatomic_distance(structure)
    if dmin < settings.min_distance:
        raise StructureCheckError(
            f"{name}: atoms {dmin:.3f} Å apart, closer than checks.min_distance={settings.min_distance} Å; "
            "fix overlapping sites in the input"
        )
    if supported_elements is not None:
        allowed = set(supported_elements)
        missing = sorted({el.symbol for el in structure.composition.elements} - allowed)
        if missing:
            raise StructureCheckError(
                f"{name}: element(s) {', '.join(missing)} not supported by the chosen potential; "
                "choose a potential trained on them (e.g. potential.name: chgnet) or drop the structure"
            )
