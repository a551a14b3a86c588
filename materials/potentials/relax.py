"""Relaxation of positions and cell with an ASE calculator (FrechetCellFilter + FIRE), with blow-up detection.

A relaxation that ends in an unphysical state (energy far below anything physical, atoms collapsing onto each
other, the volume changing by a large factor, NaN) is a *failure with a reason*, never a silently bad number.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
from ase import Atoms
from ase.calculators.calculator import Calculator
from ase.filters import FrechetCellFilter
from ase.optimize import FIRE
from ase.units import GPa
from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass as config_dataclass
from pymatgen.core import Structure
from pymatgen.io.ase import AseAtomsAdaptor

from materials.serialise import Record


@config_dataclass(config=ConfigDict(extra="forbid"))
class RelaxSettings:
    """Parameters of one relaxation.

    Attributes:
        fmax: force convergence criterion, eV/Å (the cell filter turns stress into the same units).
        max_steps: FIRE step limit; reaching it gives ``converged=False`` (status still ``ok``).
        relax_cell: relax the cell (FrechetCellFilter) as well as positions.
        max_volume_factor: failure if the final volume differs from the initial by more than this factor.
        min_energy_per_atom: failure if the energy falls below this, eV/atom (no solid is below ~-15).
        min_distance: failure if two atoms end closer than this, Å (collapse).
        batched: relax many structures together with torch-sim (FIRE + Frechet cell filter, batched on the
            model; :mod:`materials.potentials.batched`) instead of one ASE relaxation after another. chgnet and mace
            only.
        batch_max_atoms: the autobatcher's memory limit for ``batched``: at most this many atoms in one model
            call (a structure larger than that is relaxed alone); ``None``: torch-sim estimates it from free GPU
            memory (CUDA only).
    """

    fmax: float = Field(default=0.05, gt=0)
    max_steps: int = Field(default=300, ge=1)
    relax_cell: bool = True
    max_volume_factor: float = Field(default=3.0, gt=1)
    min_energy_per_atom: float = -25.0
    min_distance: float = Field(default=0.6, ge=0)
    batched: bool = False
    batch_max_atoms: int | None = Field(default=512, ge=1)


@dataclass
class RelaxResult(Record):
    """Outcome of one relaxation. Energies in eV, forces eV/Å, stress GPa (Voigt xx yy zz yz xz xy), volumes Å^3/atom.

    ``status`` is ``ok`` or ``failed`` (then ``failure_reason`` says why and the numbers may be NaN).
    """

    id: str
    formula: str
    status: str
    failure_reason: str | None = None
    n_atoms: int = 0
    energy: float = math.nan
    energy_per_atom: float = math.nan
    max_force: float = math.nan
    stress: list[float] = field(default_factory=lambda: [math.nan] * 6)
    steps: int = 0
    converged: bool = False
    initial_volume_per_atom: float = math.nan
    volume_per_atom: float = math.nan
    seconds: float = 0.0
    structure: Structure | None = None


def _min_distance(atoms: Atoms) -> float:
    if len(atoms) < 2:
        return math.inf
    distances = atoms.get_all_distances(mic=True)
    np.fill_diagonal(distances, np.inf)
    return float(distances.min())


def blow_up_reason(atoms: Atoms, energy: float, v0: float, settings: RelaxSettings) -> str | None:
    n = len(atoms)
    if not math.isfinite(energy):
        return f"energy is {energy} (NaN/inf) after relaxation"
    if energy / n < settings.min_energy_per_atom:
        return (
            f"blow-up: energy {energy / n:.2f} eV/atom below relax.min_energy_per_atom="
            f"{settings.min_energy_per_atom} (unphysical; the potential is extrapolating)"
        )
    volume = atoms.get_volume()
    factor = max(volume / v0, v0 / volume)
    if factor > settings.max_volume_factor:
        return (
            f"blow-up: volume changed by a factor {factor:.2f} ({v0 / n:.2f} -> {volume / n:.2f} Å^3/atom), "
            f"beyond relax.max_volume_factor={settings.max_volume_factor}"
        )
    dmin = _min_distance(atoms)
    if dmin < settings.min_distance:
        return f"blow-up: atoms collapsed to {dmin:.3f} Å apart (< relax.min_distance={settings.min_distance} Å)"
    return None


def relax_structure(
    structure: Structure | Atoms,
    calculator: Calculator,
    settings: RelaxSettings | None = None,
    item_id: str = "structure",
) -> RelaxResult:
    """Relax one structure; never raises for a calculation failure — it returns ``status='failed'`` with the reason.

    Args:
        structure: starting structure (pymatgen or ASE, periodic).
        calculator: an ASE calculator (see :func:`materials.potentials.calculators.load_potential`); reused across
            calls.
        settings: convergence and blow-up thresholds.
        item_id: name used in the result and in messages.
    """
    settings = settings or RelaxSettings()
    start = time.perf_counter()
    if isinstance(structure, Structure):
        formula = structure.composition.reduced_formula
        atoms = AseAtomsAdaptor.get_atoms(structure)
    else:
        atoms = structure.copy()
        formula = AseAtomsAdaptor.get_structure(atoms).composition.reduced_formula
    atoms.calc = calculator
    n = len(atoms)
    v0 = atoms.get_volume()
    result = RelaxResult(id=item_id, formula=formula, status="failed", n_atoms=n, initial_volume_per_atom=v0 / n)
    try:
        target = FrechetCellFilter(atoms) if settings.relax_cell else atoms
        optimizer = FIRE(target, logfile=None)
        converged = bool(optimizer.run(fmax=settings.fmax, steps=settings.max_steps))
        energy = float(atoms.get_potential_energy())
        forces = atoms.get_forces()
        stress = atoms.get_stress(voigt=True) / GPa if settings.relax_cell else np.full(6, math.nan)
    except Exception as exc:  # a calculator error on one item is that item's failure, recorded with its reason
        result.failure_reason = f"calculation failed: {type(exc).__name__}: {exc}"
        result.seconds = time.perf_counter() - start
        return result
    result.steps = int(optimizer.nsteps)
    result.converged = converged
    result.energy = energy
    result.energy_per_atom = energy / n
    result.max_force = float(np.linalg.norm(forces, axis=1).max()) if n else 0.0
    result.stress = [float(s) for s in stress]
    result.volume_per_atom = atoms.get_volume() / n
    result.seconds = time.perf_counter() - start
    reason = blow_up_reason(atoms, energy, v0, settings)
    if reason is not None:
        result.failure_reason = reason
        return result
    atoms.calc = None
    result.structure = AseAtomsAdaptor.get_structure(atoms)
    result.status = "ok"
    return result
