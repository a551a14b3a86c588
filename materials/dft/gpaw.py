"""DFT with GPAW (plane waves, PBE by default) through its ASE calculator.

Four operations, each returning a :class:`DFTResult` and never raising for a calculation failure:
:func:`single_point`, :func:`relax` (positions + cell), :func:`band_gap` (self-consistent run, then a
non-self-consistent band path) and, on top of them, formation energies against elemental references computed
with the same settings and cached on disk (:func:`elemental_reference_energy`,
:func:`gpaw_formation_energy_per_atom`).

Materials Project's methodology by default: compounds with magnetic elements (``MAGNETIC_ELEMENTS``) run
spin-polarised from MP's initial moments, and :func:`magnetic_ground_state` picks the lowest of the ferromagnetic
and simplest antiferromagnetic orderings (:func:`magnetic_orderings` builds the supercells); oxides and fluorides
of the U metals run GGA+U with MP's U values (:func:`hubbard_u_values`); formation energies carry the MP2020
correction (:func:`mp2020_correction_per_atom`), so they share the scale of the MLIP screen. ``dft.spinpol``,
``dft.magnetic_order``, ``dft.hubbard_u`` and ``dft.mp2020`` override each part.

GPAW total energies are relative to the isolated atoms of its PAW setups: they are not comparable with VASP or
Materials Project total energies, and only differences at identical settings mean anything. Eigenvalues (VBM,
CBM, Fermi level) are on GPAW's absolute scale, not referenced to a vacuum level.

Errors split by phase (as ASE does): bad settings, or GPAW not installed, raise ``ValueError``/``ImportError``
before any work; everything that goes wrong per structure (no PAW setup for an element, a disordered structure,
SCF not converged, any GPAW error) is a ``status="failed"`` result whose ``failure_reason`` says why.

GPAW runs serially in the calling process (no MPI), with ``settings.threads`` BLAS/OpenMP threads; parallelism
belongs to the caller (one Ray task per calculation).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

import numpy as np
from ase import Atoms
from ase.calculators.calculator import kptdensity2monkhorstpack
from ase.units import GPa
from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass as config_dataclass
from pymatgen.core import Composition, Structure
from pymatgen.io.ase import AseAtomsAdaptor

from materials.errors import InputError, RunError
from materials.serialise import Record
from materials.thermo import stability

#: Initial moment (μB/atom) of an element MP's MAGMOM table does not list in a spin-polarised run of a structure
#: that carries no ``magmom`` site property (Materials Project's default, MPRelaxSet).
DEFAULT_INITIAL_MAGMOM = 0.6
#: Elements whose compounds are computed spin-polarised when ``dft.spinpol`` is left ``null`` (automatic): the
#: 3d metals V-Ni, the elements of the magnetic oxides, fluorides, etc. among semiconductor candidates (MP runs
#: every compound spin-polarised; most other elements' compounds end non-magnetic, at twice the cost). Mo and W
#: (U metals in MP) and Cu (Cu+ compounds are non-magnetic, CuO is not) are left out, the lanthanides as well
#: (f-electron magnetism is beyond plain GGA/GGA+U here); force ``spinpol: true`` for those.
MAGNETIC_ELEMENTS = frozenset({"V", "Cr", "Mn", "Fe", "Co", "Ni"})
#: Magnetic orderings of a cell with one magnetic site that :func:`magnetic_orderings` tries: the 7 index-2
#: sublattices of the cell's translations, each magnetic site's moment signed by the parity of k·n (n: the
#: lattice translation of the site's image). In a primitive rocksalt cell (NiO, MnO) k = (1,1,1) and its 3
#: equivalents alternate (111) planes (AFM-II, the ground state) and k = (1,1,0) alternates (001) planes (AFM-I).
AFM_PARITY_VECTORS = ((1, 1, 1), (1, 1, 0), (1, 0, 1), (0, 1, 1), (1, 0, 0), (0, 1, 0), (0, 0, 1))
#: In-cell antiferromagnetic sign patterns are enumerated only up to this many magnetic sites (2^(n-1) patterns).
MAX_MAGNETIC_SITES = 8
#: A fundamental gap within this of the smallest direct gap (eV) counts as direct.
DIRECT_GAP_TOLERANCE = 1e-3
#: GPAW's name of the GLLB-SC functional and of its PAW setups (``<symbol>.GLLBSC.gz`` in gpaw-data).
GLLBSC_XC = "GLLBSC"
#: Elements whose reference is a molecular crystal: positions relaxed, cell kept at the Delta-test PBE volume.
#: (A PBE cell relaxation of these has no real minimum to find and, with plane-wave Pulay stress, collapsed
#: O2 and N2 crystals to ~4 Å^3/atom at 350 eV.)
MOLECULAR_REFERENCES = stability.MOLECULAR_REFERENCES
#: Version of how references are built (structures, what is relaxed); a cache of another version is recomputed.
REFERENCE_RECIPE = 1
#: A reference relaxation changing the volume by more than this fraction is rejected (collapse, blow-up).
REFERENCE_MAX_VOLUME_CHANGE = 0.25
#: A spin-polarised GGA+U ground state whose k-grid gap is below this (eV) is metallic: the magnetic search then
#: retries its ordering with the orbital symmetry broken (:func:`single_point` ``break_symmetry``).
METALLIC_SCF_GAP = 0.05
#: A later SCF at the magnetic ground state's geometry (the band-gap run) that ends more than this above the ground
#: state's energy (eV/atom) has fallen into another, metastable state (FeO: a metal 0.45 eV/atom higher): it is
#: redone from a symmetry-broken start (``pipelines.dft_run``).
SCF_STATE_TOLERANCE = 0.01
#: Random displacement (Å, per Cartesian component, seeded) of the start that breaks the orbital symmetry; the
#: energy is then converged back at the input geometry.
SYMMETRY_BREAKING_RATTLE = 0.02
#: Unconverged bands kept above the converged ones in band-gap runs (they help the eigensolver converge the top
#: converged band).
BUFFER_BANDS = 4
#: File in a reference cache folder listing every reference computation (JSON lines: symbol, settings_hash,
#: seconds, pid); cache hits add nothing.
REFERENCE_LEDGER = "computed.jsonl"


class DFTReferenceError(RunError):
    """An elemental reference energy could not be computed; the message names the element and the reason."""


@config_dataclass(config=ConfigDict(extra="forbid"))
class DFTSettings:
    """Science parameters of a GPAW calculation (plane-wave mode, Fermi-Dirac smearing).

    Attributes:
        xc: exchange-correlation functional GPAW knows (``PBE``); PAW setups for it must be installed.
        ecut: plane-wave cutoff, eV. Si's relaxed lattice constant agrees to 0.0001 Å at 400-600 eV; 500 eV
            leaves room for the harder first-row setups (C, N, O, F).
        kpoint_density: k-points per Å⁻¹ of reciprocal-lattice-vector length (2π included; ASE's ``density``
            convention): ``n_i = ceil(kpoint_density * |b_i|)``. 3.5 gives 7×7×7 for Si/GaAs primitive cells
            (~700 k-points per reciprocal atom), 1 along non-periodic directions.
        kpts: explicit Monkhorst-Pack sizes overriding ``kpoint_density`` (an E(V) curve needs one grid for all
            volumes; density-derived grids jump between volumes); ``kpoint_grid`` parity rules do not apply.
        kpoint_grid: ``odd`` (default): Monkhorst-Pack sizes rounded up to odd (Γ-centred, symmetric; the
            grid to use for energies); ``monkhorst-pack``: the sizes as computed, even ones shifted off Γ;
            ``gamma``: Γ-centred whatever the parity.
        smearing: Fermi-Dirac width, eV. Reported energies are extrapolated to zero width.
        scf_energy_tol: SCF convergence of the total energy, eV per valence electron (GPAW's default 5e-4).
        scf_density_tol: SCF convergence of the density, electrons per valence electron (GPAW's default 1e-4).
        maxiter: SCF iteration limit; reaching it is a failure ("SCF did not converge").
        spinpol: spin-polarised run. ``null`` (default): spin-polarised when the structure contains one of
            ``MAGNETIC_ELEMENTS`` or carries non-zero ``magmom`` site properties, else not (non-magnetic compounds
            stay at the cost of one spin channel). Initial moments come from the structure's ``magmom`` site
            property, else Materials Project's (:func:`mp_initial_magmom`).
        magnetic_order: for a spin-polarised structure without ``magmom`` site properties, what the DFT task
            (``pipelines.dft_run``) tries before its calculation: ``lowest`` (default): the ferromagnetic and the
            simplest antiferromagnetic orderings (:func:`magnetic_orderings`, in the smallest supercell that
            admits them), each a single point, keeping the lowest energy per atom; ``ferro``: ferromagnetic only.
        hubbard_u: ``mp`` (default): GGA+U as Materials Project runs it (Dudarev, U on the d shell, J = 0; U from
            pymatgen's ``MPRelaxSet`` ``LDAUU``: Co 3.32, Cr 3.7, Fe 5.3, Mn 3.9, Mo 4.38, Ni 6.2, V 3.25, W 6.2 eV)
            for compounds whose most electronegative element is O or F, through GPAW's Hubbard setups
            (``setups={"Ni": ":d,6.2"}``); elements and other compounds stay GGA. ``off``: GGA everywhere.
        mp2020: formation energies get pymatgen's ``MaterialsProject2020Compatibility`` correction (anion
            corrections; GGA/GGA+U mixing for U-metal oxides and fluorides) of the compound, so they are on the
            scale of MP2020-corrected Materials Project data and of the MLIP screen. A GGA run of a compound MP
            computes with +U (``hubbard_u: off``) is refused then: the correction would mix schemes. Leaves
            energies unchanged (not in :func:`settings_hash`).
        u_corrections: which GGA/GGA+U mixing terms (eV per U-metal atom) the MP2020 correction uses for the U
            metals. ``gpaw`` (default): terms fitted to GPAW's own GGA+U energies (:func:`gpaw_u_corrections`,
            fitted like MP's own on binary compounds: the rutile difluorides MnF2, FeF2, CoF2, NiF2 against
            their MP2020-scale formation energies) for Mn, Fe, Co, Ni, MP's VASP-fitted terms for the other U
            metals (a note says so). ``vasp``: MP2020's terms as published, fitted to VASP's GGA+U energies, which
            GPAW's Hubbard energies do not reproduce (measured, benchmarks/dft_magnetic.py at 400 eV: NiO -0.64,
            CoO -0.19, MnO -0.18 eV/atom from the MP2020-scale values with these). Only formation energies change
            (not in :func:`settings_hash`).
        relax_fmax: relaxation convergence, eV/Å (stress enters through FrechetCellFilter in the same units).
        relax_max_steps: BFGS step limit; reaching it gives ``converged=False`` (status still ``ok``).
        band_npoints: k-points along the band path (ASE's special-point path for the cell's Bravais lattice).
        band_extra: empty bands converged on the band path above the occupied ones.
        gap_functional: how :func:`band_gap` computes the gap. ``ks`` (default): the Kohn-Sham gap of ``xc``
            (PBE: ~50 % below experiment). ``gllbsc``: GLLB-SC (Kuisma et al., PRB 82, 115106 (2010)), the
            Kohn-Sham gap of a GLLB-SC ground state plus its derivative discontinuity Δxc, at about the cost of
            PBE (GPAW's GLLBSC PAW setups, shipped with gpaw-data for 68 elements, no lanthanides); needs
            ``spinpol: false``. Energies, forces and relaxations always use ``xc``, so this field leaves
            :func:`settings_hash` (and the elemental-reference cache) unchanged.
        threads: BLAS/OpenMP threads for the calculation (no MPI).
    """

    xc: str = "PBE"
    ecut: float = Field(default=500.0, gt=0)
    kpoint_density: float = Field(default=3.5, gt=0)
    kpts: tuple[int, int, int] | None = None
    kpoint_grid: Literal["odd", "monkhorst-pack", "gamma"] = "odd"
    smearing: float = Field(default=0.05, ge=0)
    scf_energy_tol: float = Field(default=5e-4, gt=0)
    scf_density_tol: float = Field(default=1e-4, gt=0)
    maxiter: int = Field(default=200, ge=1)
    spinpol: bool | None = None
    magnetic_order: Literal["lowest", "ferro"] = "lowest"
    hubbard_u: Literal["mp", "off"] = "mp"
    mp2020: bool = True
    u_corrections: Literal["gpaw", "vasp"] = "gpaw"
    relax_fmax: float = Field(default=0.02, gt=0)
    relax_max_steps: int = Field(default=60, ge=1)
    band_npoints: int = Field(default=60, ge=1)
    band_extra: int = Field(default=4, ge=1)  # the CBM needs one empty band
    gap_functional: Literal["ks", "gllbsc"] = "ks"
    threads: int = Field(default=1, ge=1)

    def __post_init__(self) -> None:
        if self.kpts is not None and min(self.kpts) < 1:
            raise InputError(f"dft.kpts={self.kpts} must be three integers >= 1")
        if self.xc.upper().startswith("GLLB"):
            # energies of a GLLB ground state are not on the PBE scale of the references: GLLB-SC is a gap method here
            raise InputError(
                f"dft.xc={self.xc!r}: GLLB functionals are for band gaps only; keep xc (energies, forces, relaxations) "
                "and set dft.gap_functional: gllbsc"
            )


#: Fields that change total energies; they (plus the GPAW and setup versions) key the reference cache.
_ENERGY_FIELDS = (
    "xc",
    "ecut",
    "kpoint_density",
    "kpts",
    "kpoint_grid",
    "smearing",
    "scf_energy_tol",
    "scf_density_tol",
    "spinpol",
    "hubbard_u",
    "relax_fmax",
)


def settings_hash(settings: DFTSettings) -> str:
    """16 hex digits identifying the energy-relevant settings and the GPAW + gpaw-data versions."""
    values = asdict(settings)
    key = {name: values[name] for name in _ENERGY_FIELDS}
    key["gpaw"] = _package_version("gpaw")
    key["gpaw-data"] = _package_version("gpaw-data")
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def _package_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "missing"


@dataclass
class DFTResult(Record):
    """Outcome of one GPAW calculation. Energies eV (GPAW's scale: relative to the setups' atoms), eV/atom for
    ``*_per_atom``; forces eV/Å; stress GPa (Voigt xx yy zz yz xz xy, NaN if not computed); lengths Å of the
    computed cell; volumes Å³/atom; band energies eV on GPAW's absolute eigenvalue scale.

    ``status`` is ``ok`` or ``failed`` (then ``failure_reason`` says why and the numbers may be NaN).
    ``task`` is ``single_point``, ``relax`` or ``band_gap``. ``converged``: the SCF (single point, band gap)
    or the relaxation (relax) converged. ``n_scf_iterations`` sums over all ionic steps. ``gap_direct`` is None
    when no gap was computed or the system is metallic (``band_gap`` 0). ``notes`` records non-fatal issues.
    ``forces`` (eV/Å, n_atoms × 3, of the final geometry) are kept as training data for fine-tuning.

    ``magnetic_moment`` (μB per cell, NaN when not spin-polarised) and ``site_magmoms`` (μB per site, in the PAW
    spheres) are those of the computed (possibly super-) cell; ``magnetic_ordering`` names the ordering chosen by
    :func:`magnetic_ground_state` (``FM``, ``AFM-k111``, ...; ``NM`` when every moment vanished; empty when none
    was searched).

    ``run_type`` is ``GGA`` or ``GGA+U`` (Materials Project's names; ``hubbard_u``: element -> U, eV, on d), and
    ``mp2020_correction_per_atom`` (eV/atom) the MP2020 correction included in ``e_form_per_atom`` (NaN when
    none was applied).

    ``functional`` is the functional of the energies and forces (``settings.xc``); ``gap_functional`` that of
    ``band_gap`` (``PBE``, ``GLLBSC``; empty when no gap was computed). ``band_gap = gap_ks +
    gap_discontinuity``: ``gap_ks`` is the Kohn-Sham gap (eV) and ``gap_discontinuity`` the derivative
    discontinuity Δxc (eV, GLLB-SC only; NaN for a Kohn-Sham gap, 0 for a metal).
    """

    id: str
    formula: str
    status: str
    task: str
    failure_reason: str | None = None
    n_atoms: int = 0
    energy: float = math.nan
    energy_per_atom: float = math.nan
    e_form_per_atom: float = math.nan
    max_force: float = math.nan
    stress: list[float] = field(default_factory=lambda: [math.nan] * 6)
    a: float = math.nan
    b: float = math.nan
    c: float = math.nan
    volume_per_atom: float = math.nan
    magnetic_moment: float = math.nan
    site_magmoms: list[float] | None = None
    magnetic_ordering: str = ""
    run_type: str = ""
    hubbard_u: dict[str, float] = field(default_factory=dict)
    mp2020_correction_per_atom: float = math.nan
    fermi_level: float = math.nan
    band_gap: float = math.nan
    scf_gap: float = math.nan
    symmetry_broken: bool = False
    direct_gap: float = math.nan
    gap_direct: bool | None = None
    vbm: float = math.nan
    cbm: float = math.nan
    gap_ks: float = math.nan
    gap_discontinuity: float = math.nan
    functional: str = ""
    gap_functional: str = ""
    converged: bool = False
    n_scf_iterations: int = 0
    ionic_steps: int = 0
    kpts: list[int] = field(default_factory=list)
    seconds: float = 0.0
    log_path: str | None = None
    settings_hash: str = ""
    notes: list[str] = field(default_factory=list)
    structure: Structure | None = None
    forces: list[list[float]] | None = None


# ---------------------------------------------------------------------------------------------- setup checks


def _require_gpaw() -> None:
    try:
        import gpaw  # noqa: F401
    except ImportError as exc:
        raise ImportError("GPAW is not installed: pip install 'semidisc[dft]' (see README, DFT section)") from exc


def _setup_name(xc: str) -> str:
    from gpaw.xc import XC

    try:
        return XC(xc).get_setup_name()
    except (NameError, KeyError, ValueError) as exc:
        raise InputError(f"dft.xc={xc!r} is not a functional GPAW knows ({exc})") from exc


def _check_settings(settings: DFTSettings) -> str:
    """Setup-phase checks (raise); returns the PAW setup name for the functional."""
    _require_gpaw()
    return _setup_name(settings.xc)


def installed_setup_elements(xc: str = "PBE") -> frozenset[str]:
    """Chemical symbols that have a PAW setup for ``xc`` in GPAW's setup paths (``gpaw.setup_paths``)."""
    from ase.data import chemical_symbols
    from gpaw import setup_paths

    name = _setup_name(xc)
    files: set[str] = set()
    for folder in map(Path, setup_paths):
        if folder.is_dir():
            files.update(p.name for p in folder.iterdir())
    # GPAW looks for exactly "<symbol>.<setup name>" or that + ".gz" (gpaw.setup_data.search_for_file)
    return frozenset(s for s in chemical_symbols[1:] if f"{s}.{name}" in files or f"{s}.{name}.gz" in files)


def missing_setups(symbols: Iterable[str], xc: str = "PBE") -> list[str]:
    """The symbols among ``symbols`` with no PAW setup for ``xc`` (sorted)."""
    available = installed_setup_elements(xc)
    return sorted({s for s in symbols if s not in available})


def _unsupported_reason(structure: Structure, settings: DFTSettings) -> str | None:
    if not structure.is_ordered:
        return "disordered structure (partial occupancies): GPAW needs an ordered cell"
    return _missing_setups_reason({el.symbol for el in structure.composition.elements}, settings.xc)


def _missing_setups_reason(symbols: Iterable[str], xc: str) -> str | None:
    missing = missing_setups(symbols, xc)
    if missing:
        from gpaw import setup_paths

        folders = ", ".join(str(p) for p in setup_paths) or "none"
        return (
            f"unsupported element(s) {', '.join(missing)}: no {xc} PAW setup installed "
            f"(searched gpaw.setup_paths: {folders}; GPAW_SETUP_PATH adds folders)"
        )
    return None


# ----------------------------------------------------------------------------------------------- calculator


def kpoint_grid(atoms: Atoms, settings: DFTSettings) -> tuple[int, int, int]:
    """Monkhorst-Pack sizes for ``atoms``: ASE's ``kptdensity2monkhorstpack`` (``ceil(kpoint_density * |b_i|)``,
    reciprocal vector lengths with 2π) per periodic direction, made odd when ``settings.kpoint_grid == 'odd'``; 1 along
    non-periodic directions. ``settings.kpts`` is returned as is when given."""
    if settings.kpts is not None:
        return settings.kpts
    sizes = [int(n) for n in kptdensity2monkhorstpack(atoms, settings.kpoint_density, even=False)]
    if settings.kpoint_grid == "odd":
        sizes = [n + 1 if n % 2 == 0 else n for n in sizes]  # 1 along non-periodic directions stays 1
    return sizes[0], sizes[1], sizes[2]


def _calculator(
    settings: DFTSettings,
    size: tuple[int, int, int],
    spinpol: bool,
    log_path: Path | None,
    xc: str | None = None,
    empty_bands: int = 0,
    hubbard: dict[str, float] | None = None,
    symmetry_off: bool = False,
):
    """GPAW calculator for ``settings`` with functional ``xc`` (default ``settings.xc``). GPAW 26 hands GLLB
    functionals to its legacy calculator (``gpaw.old``), which takes the same plane-wave parameters.

    ``empty_bands > 0`` (a band-gap SCF): GPAW's default converges only the occupied bands, leaving conduction
    bands unconverged; then ``empty_bands`` bands above the highest occupied one are converged too, with
    ``BUFFER_BANDS`` more unconverged ones on top (negative ``nbands``/``bands`` are GPAW's "occupied + n" and
    "all but the top n"). ``hubbard``: element -> U (eV) on its d shell (GPAW Hubbard setups ``":d,U"``, Dudarev)."""
    from gpaw import GPAW, PW, FermiDirac
    from gpaw.mpi import serial_comm

    kpts: dict[str, Any] = {"size": size}
    if settings.kpoint_grid == "gamma":
        kpts["gamma"] = True
    convergence: dict[str, Any] = {"energy": settings.scf_energy_tol, "density": settings.scf_density_tol}
    bands: dict[str, Any] = {}
    if empty_bands > 0:
        bands["nbands"] = -(empty_bands + BUFFER_BANDS)
        convergence["bands"] = -BUFFER_BANDS
    return GPAW(
        mode=PW(settings.ecut),
        xc=settings.xc if xc is None else xc,
        kpts=kpts,
        occupations=FermiDirac(settings.smearing),
        convergence=convergence,
        maxiter=settings.maxiter,
        spinpol=spinpol,
        txt=str(log_path) if log_path is not None else None,
        communicator=serial_comm,
        setups={symbol: f":d,{u}" for symbol, u in sorted((hubbard or {}).items())} or "paw",
        **bands,
        **({"symmetry": "off"} if symmetry_off else {}),
    )


@contextmanager
def _thread_limit(threads: int) -> Iterator[None]:
    try:
        from threadpoolctl import threadpool_limits  # installed with botorch and scikit-learn
    except ImportError:  # then OMP_NUM_THREADS / OPENBLAS_NUM_THREADS decide
        yield
        return
    with threadpool_limits(limits=threads):
        yield


def _prepare(structure: Structure | Atoms, settings: DFTSettings) -> tuple[Structure, Atoms, bool]:
    """Pymatgen and ASE views of the input, and whether to spin-polarise."""
    if isinstance(structure, Atoms):
        structure = AseAtomsAdaptor.get_structure(structure)
    atoms = AseAtomsAdaptor.get_atoms(structure)
    atoms.pbc = True
    spinpol = is_spin_polarised(structure, settings)
    if spinpol and not np.any(atoms.get_initial_magnetic_moments()):
        atoms.set_initial_magnetic_moments(initial_magmoms(structure))
    elif not spinpol:
        atoms.set_initial_magnetic_moments(None)
    return structure, atoms, spinpol


# ---------------------------------------------------------------------------------------------------- GGA+U


@functools.cache
def _mp_u_table() -> dict[str, dict[str, float]]:
    from pymatgen.io.vasp.sets import MPRelaxSet

    return {
        anion: {k: float(v) for k, v in table.items()} for anion, table in MPRelaxSet.CONFIG["INCAR"]["LDAUU"].items()
    }


def hubbard_u_values(composition: Composition | str, settings: DFTSettings) -> dict[str, float]:
    """U (eV, on the d shell) per element of ``composition`` as Materials Project applies it (MPRelaxSet): when
    the most electronegative element is O or F, each U metal present gets that anion's ``LDAUU`` value; empty
    for ``settings.hubbard_u == "off"``, elements, and every other compound."""
    if settings.hubbard_u == "off":
        return {}
    elements = Composition(composition).elements
    if len(elements) < 2:
        return {}
    anion = max(elements, key=lambda el: el.X)  # MPRelaxSet: the last of the elements sorted by electronegativity
    table = _mp_u_table().get(anion.symbol, {})
    return {el.symbol: table[el.symbol] for el in elements if table.get(el.symbol)}


def run_type(settings: DFTSettings, hubbard: dict[str, float]) -> str:
    """Materials Project's name of the calculation type: ``GGA`` or ``GGA+U`` for PBE, else the functional."""
    base = "GGA" if settings.xc.upper() == "PBE" else settings.xc
    return f"{base}+U" if hubbard else base


def mp2020_correction_per_atom(
    composition: Composition | str, settings: DFTSettings, hubbard: dict[str, float]
) -> float:
    """MP2020 correction, eV/atom, of an uncorrected energy of ``composition`` computed with ``settings`` and U
    values ``hubbard`` (:func:`materials.thermo.stability.mp2020_correction`, which assumes MP's run type).

    Raises:
        InputError: the run is not what the correction was fitted to: a functional other than PBE, or U values
            other than MP's for this composition (e.g. ``hubbard_u: off`` for NiO).
    """
    composition = Composition(composition)
    if settings.xc.upper() != "PBE":
        raise InputError(
            f"dft.mp2020 corrects PBE (GGA/GGA+U) energies, not dft.xc={settings.xc!r}; set dft.mp2020: false"
        )
    expected = hubbard_u_values(composition, replace(settings, hubbard_u="mp"))
    if hubbard != expected:
        raise InputError(
            f"{composition.reduced_formula} was computed as {run_type(settings, hubbard)} with U={hubbard or 'none'}, "
            f"but MP2020 corrects it as {run_type(settings, expected)} with U={expected or 'none'}: mixing the two "
            "is refused; set dft.hubbard_u: mp, or dft.mp2020: false for uncorrected formation energies"
        )
    total = stability.mp2020_correction(composition)
    for symbol, (fitted, published, _source) in mp2020_u_terms(composition, settings, hubbard).items():
        total += composition[symbol] * (fitted - published)
    return total / composition.num_atoms


#: The GPAW-specific GGA/GGA+U mixing terms (:func:`gpaw_u_corrections`), written by
#: ``benchmarks/dft_magnetic.py --fit-u``.
GPAW_U_CORRECTIONS_FILE = Path(__file__).parent.parent / "data" / "gpaw_u_corrections.json"


@functools.cache
def gpaw_u_corrections() -> dict[str, Any]:
    """GGA/GGA+U mixing corrections for GPAW, eV per U-metal atom, and how they were fitted: ``corrections``
    (element -> eV), ``settings`` (the DFT settings of the fit), ``compounds`` (per fitted compound: its GPAW
    formation energy with MP's VASP terms, the MP2020-scale value, the resulting term), ``command``.

    MP2020's recipe: with E_form(MX) the GPAW GGA+U formation energy plus the anion correction, the metal's term
    is [E_form^MP2020(MX) - E_form(MX)] * N / n_M. Fitted on fluorides and used for oxides too (as MP2020 uses one
    term for both), so the oxides in ``benchmarks/dft_magnetic.py`` are a held-out check."""
    return json.loads(GPAW_U_CORRECTIONS_FILE.read_text())


@functools.cache
def _mp2020_published_u_terms() -> dict[str, dict[str, float]]:
    from pymatgen.entries.compatibility import MaterialsProject2020Compatibility

    return {anion: dict(terms) for anion, terms in MaterialsProject2020Compatibility().u_corrections.items()}


def mp2020_u_terms(
    composition: Composition | str, settings: DFTSettings, hubbard: dict[str, float]
) -> dict[str, tuple[float, float, str]]:
    """Per U metal of a GGA+U ``composition``: (the term used, MP2020's published VASP term, where the used one
    comes from: ``gpaw-fit`` or ``mp2020-vasp``), eV per metal atom. Empty for GGA runs and without MP2020."""
    composition = Composition(composition)
    if not hubbard or not settings.mp2020:
        return {}
    anion = max(composition.elements, key=lambda el: el.X).symbol
    published = _mp2020_published_u_terms().get(anion, {})
    fitted = gpaw_u_corrections()["corrections"] if settings.u_corrections == "gpaw" else {}
    terms = {}
    for symbol in sorted(hubbard):
        if symbol not in published:
            continue
        if symbol in fitted:
            terms[symbol] = (float(fitted[symbol]), published[symbol], "gpaw-fit")
        else:
            terms[symbol] = (published[symbol], published[symbol], "mp2020-vasp")
    return terms


def u_correction_notes(composition: Composition | str, settings: DFTSettings, hubbard: dict[str, float]) -> list[str]:
    """What a row should say about the U terms in its MP2020 correction: which are GPAW-fitted (and at which
    settings, when they differ from the run's), which are MP's VASP ones."""
    terms = mp2020_u_terms(composition, settings, hubbard)
    if not terms:
        return []
    parts = [f"{el} {used:+.3f} eV ({source})" for el, (used, _pub, source) in terms.items()]
    notes = [f"MP2020 U terms per metal atom: {', '.join(parts)}"]
    if any(source == "gpaw-fit" for _u, _p, source in terms.values()):
        fit = gpaw_u_corrections()["settings"]
        differing = {k: v for k, v in fit.items() if k in ("ecut", "kpoint_density") and getattr(settings, k) != v}
        if differing:
            notes.append(
                f"GPAW U terms were fitted at {', '.join(f'{k}={v}' for k, v in fit.items())}; this run differs in "
                f"{', '.join(differing)}: refit with benchmarks/dft_magnetic.py --fit-u for the best transfer"
            )
    if any(source == "mp2020-vasp" for _u, _p, source in terms.values()):
        notes.append("MP2020 U terms marked mp2020-vasp are VASP-fitted (no GPAW fit for that metal yet)")
    return notes


# ------------------------------------------------------------------------------------------------- magnetism


@functools.cache
def _mp_magmoms() -> dict[str, float]:
    from pymatgen.io.vasp.sets import MPRelaxSet

    return {k: float(v) for k, v in MPRelaxSet.CONFIG["INCAR"]["MAGMOM"].items()}


def mp_initial_magmom(symbol: str) -> float:
    """Materials Project's initial moment (μB) for an element: MPRelaxSet's ``MAGMOM`` table (5 for V, Cr, Mn, Fe,
    Ni, Mo, W; 0.6 for Co), ``DEFAULT_INITIAL_MAGMOM`` (0.6) for the rest."""
    return _mp_magmoms().get(symbol, DEFAULT_INITIAL_MAGMOM)


def initial_magmoms(structure: Structure) -> list[float]:
    """Ferromagnetic initial moments (μB per site) as MP seeds them (:func:`mp_initial_magmom`)."""
    return [mp_initial_magmom(site.specie.symbol) for site in structure]


def given_magmoms(structure: Structure) -> list[float] | None:
    """The ``magmom`` site property (μB per site; a vector's components summed) when present and not all zero."""
    magmoms = structure.site_properties.get("magmom")
    if magmoms is None or not any(abs(float(np.sum(m))) > 0 for m in magmoms):
        return None
    return [float(np.sum(m)) for m in magmoms]


def is_spin_polarised(structure: Structure, settings: DFTSettings) -> bool:
    """``settings.spinpol`` when set; automatic (``None``): True when ``structure`` contains one of
    ``MAGNETIC_ELEMENTS`` or carries non-zero ``magmom`` site properties."""
    if settings.spinpol is not None:
        return settings.spinpol
    symbols = {el.symbol for el in structure.composition.elements}
    return bool(symbols & MAGNETIC_ELEMENTS) or given_magmoms(structure) is not None


def magnetic_orderings(structure: Structure) -> list[tuple[str, Structure]]:
    """Collinear orderings to try for ``structure``: ``(name, structure with a magmom site property)``, the
    ferromagnetic one (``FM``, the cell as given) first, then the symmetry-distinct antiferromagnetic ones.

    Magnetic sites are those of ``MAGNETIC_ELEMENTS`` (with MP's initial moment, :func:`mp_initial_magmom`; other
    sites start at 0). Antiferromagnetic orderings come from the smallest cell that admits them: with 2 to
    ``MAX_MAGNETIC_SITES`` magnetic sites, the cell as given with every up/down pattern of zero net moment per
    element (``AFM[+-..]``, magnetic sites in order); with one magnetic site (a primitive rocksalt NiO, MnO), the
    7 supercells of twice the volume, moments signed by ``AFM_PARITY_VECTORS`` (``AFM-k110``: the parity of
    n1 + n2 of the image's lattice translation). Patterns equivalent by symmetry or by a global spin flip are
    merged (pymatgen ``StructureMatcher`` with ``SpinComparator``): a primitive rocksalt cell gives FM, AFM-k111
    (AFM-II: alternating (111) planes) and AFM-k110 (AFM-I: alternating (001) planes).

    pymatgen's ``MagneticStructureEnumerator`` would be the general tool, but it needs enumlib's executables,
    which pip does not install. Without magnetic sites the list holds ``FM`` only.
    """
    import itertools

    structure = structure.copy()
    if "magmom" in structure.site_properties:
        structure.remove_site_property("magmom")
    moments = [
        mp_initial_magmom(site.specie.symbol) if site.specie.symbol in MAGNETIC_ELEMENTS else 0.0 for site in structure
    ]
    magnetic = [i for i, m in enumerate(moments) if m]
    ferro = structure.copy(site_properties={"magmom": moments})
    candidates: list[tuple[str, Structure]] = []
    if 2 <= len(magnetic) <= MAX_MAGNETIC_SITES:
        for signs in itertools.product((1, -1), repeat=len(magnetic) - 1):
            signs = (1, *signs)
            net: dict[str, int] = {}
            for i, sign in zip(magnetic, signs, strict=True):
                net[structure[i].specie.symbol] = net.get(structure[i].specie.symbol, 0) + sign
            if any(net.values()):
                continue
            flipped = list(moments)
            for i, sign in zip(magnetic, signs, strict=True):
                flipped[i] *= sign
            pattern = "".join("+" if sign > 0 else "-" for sign in signs)
            candidates.append((f"AFM[{pattern}]", structure.copy(site_properties={"magmom": flipped})))
    elif len(magnetic) == 1:
        for k in AFM_PARITY_VECTORS:
            candidates.append((f"AFM-k{''.join(map(str, k))}", _parity_supercell(structure, moments, np.array(k))))
    return [("FM", ferro), *_distinct_orderings(candidates)]


def _parity_supercell(structure: Structure, moments: list[float], k: np.ndarray) -> Structure:
    """The supercell of ``structure`` holding the translations n with k·n even (twice the volume, Niggli-reduced),
    the moment of each image of site j set to ``moments[j] * (-1)^(k·n)``."""
    i = int(np.argmax(k))
    matrix = np.eye(3, dtype=int)
    matrix[i, i] = 2
    for j in range(3):
        if j != i:
            matrix[j, i] = k[j]  # k·(e_j + k_j e_i) = 2 k_j: even
    supercell = structure.copy()
    supercell.make_supercell(matrix)
    frac = structure.lattice.get_fractional_coords(supercell.cart_coords)
    signed = []
    for site, f in zip(supercell, frac, strict=True):
        for j, original in enumerate(structure):
            shift = f - original.frac_coords
            if original.species == site.species and np.allclose(shift, np.round(shift), atol=1e-4):
                signed.append(moments[j] * (-1) ** int(k @ np.round(shift).astype(int)))
                break
        else:  # cannot happen for a supercell; kept loud rather than silently unsigned
            raise RunError(f"supercell site {site} has no image in the input cell")
    supercell.add_site_property("magmom", signed)
    # Niggli-reduced: the raw supercell of an fcc primitive cell has 30-degree angles, which GPAW warns about
    return supercell.get_reduced_structure()


def _distinct_orderings(candidates: list[tuple[str, Structure]]) -> list[tuple[str, Structure]]:
    """``candidates`` less those equivalent to an earlier one by symmetry or a global spin flip."""
    from pymatgen.analysis.structure_matcher import SpinComparator, StructureMatcher
    from pymatgen.core import Species

    def with_spins(structure: Structure) -> Structure:
        species = [
            Species(site.specie.symbol, spin=1 if m > 0 else -1) if m else site.specie.symbol
            for site, m in zip(structure, structure.site_properties["magmom"], strict=True)
        ]
        return Structure(structure.lattice, species, structure.frac_coords)

    matcher = StructureMatcher(comparator=SpinComparator(), primitive_cell=False)
    kept: list[tuple[str, Structure, Structure]] = []
    for name, structure in candidates:
        spins = with_spins(structure)
        if not any(len(spins) == len(other) and matcher.fit(spins, other) for _, _, other in kept):
            kept.append((name, structure, spins))
    return [(name, structure) for name, structure, _ in kept]


def _failure_reason(exc: Exception, settings: DFTSettings) -> str:
    from gpaw import ConvergenceError

    if isinstance(exc, ConvergenceError):
        return (
            f"SCF did not converge within dft.maxiter={settings.maxiter} iterations "
            f"({type(exc).__name__}{': ' + str(exc) if str(exc) else ''}); "
            "raise maxiter, increase smearing, or check the structure/spin state"
        )
    if isinstance(exc, FileNotFoundError) and "PAW dataset" in str(exc):
        return f"unsupported element: {str(exc).splitlines()[0]}"
    return f"calculation failed: {type(exc).__name__}: {exc}"


def _new_result(structure: Structure, task: str, item_id: str, settings: DFTSettings, log_path) -> DFTResult:
    return DFTResult(
        id=item_id,
        formula=structure.composition.reduced_formula,
        status="failed",
        task=task,
        n_atoms=len(structure),
        log_path=str(log_path) if log_path is not None else None,
        settings_hash=settings_hash(settings),
        functional=settings.xc,
    )


def _symmetry_broken_start(job: _Job, calc) -> int:
    """Converge ``calc`` (GPAW symmetry off) once from ``job.atoms`` displaced by ``SYMMETRY_BREAKING_RATTLE``
    (seeded) and put the atoms back: the next SCF at the input geometry starts from that symmetry-broken density.
    Returns the SCF iterations spent; records a note and ``symmetry_broken``."""
    given = job.atoms.positions.copy()
    job.atoms.positions = given + np.random.default_rng(0).normal(scale=SYMMETRY_BREAKING_RATTLE, size=given.shape)
    job.atoms.get_potential_energy()
    iterations = int(calc.get_number_of_iterations())
    job.atoms.positions = given
    job.result.symmetry_broken = True
    job.result.notes.append(
        f"orbital symmetry broken: SCF started from atoms displaced by {SYMMETRY_BREAKING_RATTLE} Å (seeded), "
        "symmetry off, then converged at the input geometry"
    )
    return iterations


def _scf_gap(calc) -> float:
    """Gap (eV) of a converged calculator's k-grid eigenvalues around its Fermi level, both spin channels
    together (ASE's ``bandgap``); 0 when a band crosses the Fermi level."""
    from ase.dft.bandgap import bandgap

    return float(bandgap(calc, output=None)[0])


def _fill_state(
    result: DFTResult, atoms: Atoms, calc, spinpol: bool, with_stress: bool, with_energy: bool = True
) -> None:
    """Run the SCF if needed and copy the converged state into ``result``; without ``with_energy``, energy and
    forces stay NaN/None (a GLLB-SC ground state: its energy is not on the scale of ``settings.xc``)."""
    n = len(atoms)
    energy = float(atoms.get_potential_energy())
    if with_energy:
        result.energy = energy
        result.energy_per_atom = energy / n
        forces = atoms.get_forces()
        result.forces = forces.tolist()
        result.max_force = float(np.linalg.norm(forces, axis=1).max())
    if with_stress:
        result.stress = [float(s) for s in atoms.get_stress(voigt=True) / GPa]
    lengths = atoms.cell.lengths()
    result.a, result.b, result.c = (float(x) for x in lengths)
    result.volume_per_atom = float(atoms.get_volume() / n)
    result.fermi_level = float(calc.get_fermi_level())
    if spinpol:
        result.magnetic_moment = float(calc.get_magnetic_moment())
        result.site_magmoms = [round(float(m), 4) for m in calc.get_magnetic_moments()]
    final = atoms.copy()
    final.calc = None
    result.structure = AseAtomsAdaptor.get_structure(final)


def _log_path(log_path: str | Path | None) -> Path | None:
    if log_path is None:
        return None
    path = Path(log_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


# ------------------------------------------------------------------------------------------------ operations


@dataclass
class _Job:
    """What every operation needs before GPAW runs."""

    settings: DFTSettings
    atoms: Atoms
    spinpol: bool
    log: Path | None
    size: tuple[int, int, int]
    result: DFTResult
    start: float

    def calculator(self, xc: str | None = None, empty_bands: int = 0, symmetry_off: bool = False):
        return _calculator(
            self.settings, self.size, self.spinpol, self.log, xc, empty_bands, self.result.hubbard_u, symmetry_off
        )

    def failed(self, exc: Exception) -> DFTResult:
        self.result.failure_reason = _failure_reason(exc, self.settings)
        return self.finish()

    def finish(self) -> DFTResult:
        self.result.seconds = time.perf_counter() - self.start
        return self.result


def _begin(
    structure: Structure | Atoms, settings: DFTSettings | None, task: str, item_id: str, log_path: str | Path | None
) -> _Job:
    """Setup-phase checks (raise on bad settings), then a job whose result already holds any per-structure
    reason not to run (``result.failure_reason``)."""
    settings = settings or DFTSettings()
    _check_settings(settings)
    structure, atoms, spinpol = _prepare(structure, settings)
    log = _log_path(log_path)
    result = _new_result(structure, task, item_id, settings, log)
    result.failure_reason = _unsupported_reason(structure, settings)
    result.hubbard_u = hubbard_u_values(structure.composition, settings)
    result.run_type = run_type(settings, result.hubbard_u)
    size = kpoint_grid(atoms, settings)
    result.kpts = list(size)
    return _Job(settings, atoms, spinpol, log, size, result, time.perf_counter())


def single_point(
    structure: Structure | Atoms,
    settings: DFTSettings | None = None,
    item_id: str = "structure",
    log_path: str | Path | None = None,
    *,
    break_symmetry: bool = False,
) -> DFTResult:
    """Self-consistent energy, forces and stress of ``structure`` as given.

    Args:
        structure: periodic structure (pymatgen or ASE); a ``magmom`` site property seeds spin-polarised runs.
        settings: GPAW settings (defaults: PBE, 500 eV, odd 3.5 Å k-grid, 0.05 eV Fermi-Dirac).
        item_id: name used in the result.
        log_path: GPAW text log (overwritten); None for no log.
        break_symmetry: converge first from atoms displaced by ``SYMMETRY_BREAKING_RATTLE`` (seeded), with GPAW's
            symmetry off, then at the input geometry from that density: a GGA+U state with a partly filled
            degenerate d shell (Fe2+ in rocksalt FeO) can then order its orbitals and open its gap, which a
            symmetric start may miss (measured at 400 eV: a symmetric FeO AFM-II start has ended in a metal 0.46
            eV/atom above the insulator this finds, and in another run in the insulator itself). The result is for
            the input geometry; a note says what was done.

    ``scf_gap`` (eV) is the gap of the SCF's own k-grid eigenvalues at the Fermi level (0: metallic occupation).

    Raises:
        ValueError: unknown functional. ImportError: GPAW missing. Anything per-structure is a failed result.
    """
    job = _begin(structure, settings, "single_point", item_id, log_path)
    if job.result.failure_reason is not None:
        return job.finish()
    with _thread_limit(job.settings.threads):
        try:
            calc = job.calculator(symmetry_off=break_symmetry)
            job.atoms.calc = calc
            iterations = _symmetry_broken_start(job, calc) if break_symmetry else 0
            _fill_state(job.result, job.atoms, calc, job.spinpol, with_stress=True)
            job.result.n_scf_iterations = iterations + int(calc.get_number_of_iterations())
            job.result.scf_gap = _scf_gap(calc)
        except Exception as exc:  # per-structure failure, recorded with its reason
            return job.failed(exc)
    job.result.converged = True
    job.result.status = "ok"
    return job.finish()


def relax(
    structure: Structure | Atoms,
    settings: DFTSettings | None = None,
    item_id: str = "structure",
    log_path: str | Path | None = None,
    *,
    fmax: float | None = None,
    max_steps: int | None = None,
    relax_cell: bool = True,
    on_step: Callable[[Atoms], None] | None = None,
    break_symmetry: bool = False,
) -> DFTResult:
    """Relax positions (and the cell: ASE FrechetCellFilter) with BFGS on GPAW forces and stress.

    Args:
        structure, settings, item_id, log_path: as in :func:`single_point`; one GPAW log for all ionic steps.
        fmax: force criterion, eV/Å; None uses ``settings.relax_fmax``.
        max_steps: BFGS step limit; None uses ``settings.relax_max_steps``. Hitting it leaves ``status='ok'``,
            ``converged=False`` and a note.
        relax_cell: relax the cell shape and volume as well as positions.
        on_step: called with the atoms (GPAW calculator attached, results of that geometry cached) after every
            ionic step, e.g. to record the trajectory as training data (:mod:`materials.potentials.finetune`).
        break_symmetry: start from a symmetry-broken density, as in :func:`single_point` (symmetry off throughout).

    The returned energy, forces, stress and structure are those of the final geometry. The k-grid is chosen
    for the starting cell and kept. Plane-wave stress at a fixed cutoff carries a Pulay error: converge
    ``ecut`` for lattice constants (Si: 400-600 eV agree to 0.0001 Å).
    """
    from ase.filters import FrechetCellFilter
    from ase.optimize import BFGS

    job = _begin(structure, settings, "relax", item_id, log_path)
    if job.result.failure_reason is not None:
        return job.finish()
    fmax = job.settings.relax_fmax if fmax is None else fmax
    max_steps = job.settings.relax_max_steps if max_steps is None else max_steps
    result = job.result
    scf_iterations: list[int] = []
    with _thread_limit(job.settings.threads):
        try:
            calc = job.calculator(symmetry_off=break_symmetry)
            job.atoms.calc = calc
            if break_symmetry:
                scf_iterations.append(_symmetry_broken_start(job, calc))
            target = FrechetCellFilter(job.atoms) if relax_cell else job.atoms
            optimizer = BFGS(target, logfile=None)
            optimizer.attach(lambda: scf_iterations.append(int(calc.get_number_of_iterations())))
            if on_step is not None:
                optimizer.attach(lambda: on_step(job.atoms))
            converged = bool(optimizer.run(fmax=fmax, steps=max_steps))
            _fill_state(result, job.atoms, calc, job.spinpol, with_stress=relax_cell)
        except Exception as exc:  # per-structure failure, recorded with its reason
            result.n_scf_iterations = sum(scf_iterations)
            return job.failed(exc)
    result.ionic_steps = int(optimizer.nsteps)
    result.n_scf_iterations = sum(scf_iterations)
    result.converged = converged
    if not converged:
        result.notes.append(f"relaxation stopped at max_steps={max_steps} above fmax={fmax} eV/Å")
    final_size = kpoint_grid(job.atoms, job.settings)
    if final_size != job.size:
        result.notes.append(
            f"k-grid {list(job.size)} kept from the start; the relaxed cell would get {list(final_size)}"
        )
    result.status = "ok"
    return job.finish()


def magnetic_ground_state(
    structure: Structure,
    settings: DFTSettings,
    item_id: str = "structure",
    log_dir: str | Path | None = None,
) -> tuple[str, DFTResult, list[str]]:
    """The lowest-energy collinear ordering of ``structure`` at its geometry (``settings.spinpol`` not False):
    a spin-polarised single point of each of :func:`magnetic_orderings` (all of them with
    ``settings.magnetic_order == "lowest"``, the ferromagnetic one only with ``"ferro"``), compared per atom.

    Returns the chosen ordering's name (``NM`` when its moments all vanished: below 0.05 μB per site), its single
    point (``magnetic_ordering`` set; its ``structure`` is the computed cell with the final moments as ``magmom``
    site property, ready to relax or to take a band gap from) and notes listing every ordering's energy
    relative to the lowest (eV/atom) or its failure. Logs: ``<log_dir>/<item_id>_<ordering>.txt``. A failed
    result is returned (reasons joined) when every ordering failed.
    """
    orderings = magnetic_orderings(structure)
    if settings.magnetic_order == "ferro":
        orderings = orderings[:1]
    results: list[tuple[str, DFTResult]] = []
    for name, ordered in orderings:
        log = Path(log_dir) / f"{item_id}_{name.replace('[', '_').replace(']', '')}.txt" if log_dir else None
        results.append((name, single_point(ordered, settings, item_id=item_id, log_path=log)))
    ok = [(name, r) for name, r in results if r.status == "ok"]
    if not ok:
        failed = results[0][1]
        failed.failure_reason = "every magnetic ordering failed: " + "; ".join(
            f"{name}: {r.failure_reason}" for name, r in results
        )
        return "", failed, []
    name, best = min(ok, key=lambda item: item[1].energy_per_atom)
    notes = [
        "magnetic orderings, eV/atom above the lowest: "
        + ", ".join(
            f"{n} {r.energy_per_atom - best.energy_per_atom:+.4f}" if r.status == "ok" else f"{n} failed"
            for n, r in results
        )
    ]
    if best.hubbard_u and best.scf_gap < METALLIC_SCF_GAP:
        # a metallic GGA+U state is most often a symmetric start that cannot order the orbitals of a partly
        # filled degenerate d shell: retry the lowest ordering with the symmetry broken, keep the lower energy
        ordered = dict(orderings)[name]
        log = Path(log_dir) / f"{item_id}_{name.replace('[', '_').replace(']', '')}_broken.txt" if log_dir else None
        broken = single_point(ordered, settings, item_id=item_id, log_path=log, break_symmetry=True)
        if broken.status != "ok":
            notes.append(f"metallic GGA+U state; the symmetry-broken retry failed: {broken.failure_reason}")
        elif broken.energy_per_atom < best.energy_per_atom:
            notes.append(
                f"metallic GGA+U state (k-grid gap {best.scf_gap:.2f} eV) replaced by a symmetry-broken one "
                f"{broken.energy_per_atom - best.energy_per_atom:+.4f} eV/atom lower "
                f"(k-grid gap {broken.scf_gap:.2f} eV)"
            )
            broken.notes = [*best.notes, *broken.notes]
            best = broken
        else:
            notes.append(
                f"metallic GGA+U state kept: the symmetry-broken retry was "
                f"{broken.energy_per_atom - best.energy_per_atom:+.4f} eV/atom higher"
            )
    moments = best.site_magmoms or []
    if all(abs(m) < 0.05 for m in moments):
        name = "NM"
    best.magnetic_ordering = name
    best.structure.add_site_property("magmom", moments or [0.0] * len(best.structure))
    return name, best, notes


def band_gap(
    structure: Structure | Atoms,
    settings: DFTSettings | None = None,
    item_id: str = "structure",
    log_path: str | Path | None = None,
    *,
    break_symmetry: bool = False,
) -> DFTResult:
    """Band gap of ``structure`` as given: a self-consistent run on the k-grid, then a non-self-consistent run
    (fixed density, symmetry off) along ASE's band path for the cell's Bravais lattice
    (``settings.band_npoints`` points). Both runs converge ``settings.band_extra`` empty bands above the highest
    occupied one (GPAW's SCF default converges occupied bands only, which leaves the grid's conduction-band
    energies unconverged); a note records the SCF's band count.

    VBM, CBM, gap and direct/indirect come from the eigenvalues of both k-sets together, with the number of
    occupied bands fixed by the electron count (per spin channel from the magnetic moment when spin-polarised),
    so the result does not depend on where smearing puts the Fermi level. A gap is direct when it equals the
    smallest same-k gap within ``DIRECT_GAP_TOLERANCE``. Metals (or an odd electron count without spin
    polarisation) give ``band_gap=0``, ``gap_direct=None``. The band-path log is ``<log stem>_bandpath<suffix>``.
    Extrema off both the grid and the path are missed (low-symmetry cells).

    ``settings.gap_functional == "gllbsc"``: both runs use GLLB-SC and ``band_gap = gap_ks + gap_discontinuity``
    (eV). ``gap_ks`` is the Kohn-Sham gap of the GLLB-SC potential as above; the derivative discontinuity Δxc is
    GPAW's first-order expression (Kuisma et al. 2010, Eqs. 24-25): the discontinuity potential built from the
    grid+path VBM and CBM, its expectation value in the lowest conduction band at every grid and path k-point,
    Δxc = min_k [ε_c(k) + <Δv_xc>_c(k)] - CBM. ``vbm`` is the Kohn-Sham VBM, ``cbm = vbm + band_gap``, and
    ``direct_gap`` the Kohn-Sham direct gap + Δxc (a rigid shift). Energy and forces are left NaN (a GLLB-SC
    total energy is not on the scale of ``settings.xc``; use :func:`single_point` for those). A metal (or
    overlapping GLLB-SC bands) gives ``band_gap = gap_ks = gap_discontinuity = 0``. With the default ``ks``,
    ``gap_ks = band_gap`` and ``gap_discontinuity`` is NaN.

    Raises:
        ValueError: unknown functional, or ``gap_functional="gllbsc"`` with ``spinpol`` (GPAW's discontinuity
            takes both spin channels with half the electrons each). ImportError: GPAW missing.
    """
    settings = settings or DFTSettings()
    gllbsc = settings.gap_functional == "gllbsc"
    if gllbsc and settings.spinpol:
        raise InputError(
            "dft.gap_functional='gllbsc' needs dft.spinpol: false (GPAW's GLLB-SC discontinuity assumes "
            "equally filled spin channels); use gap_functional: ks for spin-polarised band gaps"
        )
    job = _begin(structure, settings, "band_gap", item_id, log_path)
    xc = GLLBSC_XC if gllbsc else settings.xc
    job.result.gap_functional = xc
    if job.result.failure_reason is None and gllbsc and job.spinpol:
        job.result.failure_reason = (
            "GLLB-SC gap of a spin-polarised (magnetic) structure: GPAW's discontinuity assumes equally filled "
            "spin channels; use dft.gap_functional: ks for it"
        )
    if job.result.failure_reason is None and gllbsc:
        job.result.failure_reason = _missing_setups_reason(set(job.atoms.get_chemical_symbols()), xc)
    if job.result.failure_reason is not None:
        return job.finish()
    settings, atoms, log, result = job.settings, job.atoms, job.log, job.result
    with _thread_limit(settings.threads):
        try:
            calc = job.calculator(xc, empty_bands=settings.band_extra, symmetry_off=break_symmetry)
            atoms.calc = calc
            iterations = _symmetry_broken_start(job, calc) if break_symmetry else 0
            _fill_state(result, atoms, calc, job.spinpol, with_stress=False, with_energy=not gllbsc)
            result.n_scf_iterations = iterations + int(calc.get_number_of_iterations())
            result.scf_gap = _scf_gap(calc)
            nocc = _occupied_bands(calc, job.spinpol)
            n_scf_bands = int(calc.get_number_of_bands())
            result.notes.append(
                f"SCF: {n_scf_bands} bands, the lowest {n_scf_bands - BUFFER_BANDS} converged"
                + (f" (highest occupied: {max(nocc)})" if nocc is not None else "")
            )
            calcs = [calc]
            eigenvalues = [_eigenvalues(calc)]
            if nocc is not None:
                path = atoms.cell.bandpath(npoints=settings.band_npoints, pbc=atoms.pbc)
                nconverged = max(nocc) + settings.band_extra
                band_log = log.with_name(f"{log.stem}_bandpath{log.suffix}") if log is not None else None
                path_calc = calc.fixed_density(
                    kpts=path,
                    symmetry="off",
                    nbands=nconverged + BUFFER_BANDS,  # unconverged buffer bands help Davidson converge the top ones
                    convergence={"bands": nconverged},
                    txt=str(band_log) if band_log is not None else None,
                )
                path_calc.get_potential_energy()  # runs the non-self-consistent diagonalisation
                calcs.append(path_calc)
                eigenvalues.append(_eigenvalues(path_calc))
                result.notes.append(f"band path {path.path} with {len(path.kpts)} k-points")
            discontinuity = math.nan
            if nocc is None:
                result.band_gap = 0.0
                result.notes.append("odd electron count or fractional moment: no insulating filling, metallic")
            else:
                nbands = min(e.shape[2] for e in eigenvalues)
                combined = np.concatenate([e[:, :, :nbands] for e in eigenvalues], axis=1)
                gap, direct, vbm, cbm = gap_from_eigenvalues(combined, nocc)
                result.band_gap, result.direct_gap, result.vbm, result.cbm = gap, direct, vbm, cbm
                result.gap_direct = None if gap == 0.0 else bool(direct - gap < DIRECT_GAP_TOLERANCE)
                if gllbsc and gap > 0.0:
                    discontinuity = _gllbsc_discontinuity(calcs, eigenvalues, nocc[0], vbm, cbm, result.notes)
        except Exception as exc:  # per-structure failure, recorded with its reason
            return job.failed(exc)
    result.gap_ks = result.band_gap
    if gllbsc:
        if result.band_gap == 0.0:
            discontinuity = 0.0
            result.notes.append("GLLB-SC: no Kohn-Sham gap, so no derivative discontinuity (metallic)")
        else:
            result.band_gap += discontinuity
            result.direct_gap += discontinuity
            result.cbm = result.vbm + result.band_gap
            result.notes.append(f"GLLB-SC: Kohn-Sham gap {result.gap_ks:.3f} eV + discontinuity {discontinuity:.3f} eV")
    result.gap_discontinuity = discontinuity
    result.converged = True
    result.status = "ok"
    return job.finish()


def _gllbsc_discontinuity(
    calcs: list, eigenvalues: list[np.ndarray], nocc: int, vbm: float, cbm: float, notes: list[str]
) -> float:
    """Derivative discontinuity Δxc, eV, of a spin-unpolarised GLLB-SC ground state ``calcs[0]`` (the others:
    fixed-density runs from it) with ``nocc`` occupied bands, Kohn-Sham ``vbm`` and ``cbm`` (eV) over all k-sets.

    GPAW's ``calculate_discontinuity`` returns, per calculator, min_k [ε_c(k) + <Δv_xc>_c(k)] minus that
    calculator's own lowest conduction energy; adding the latter back puts every k-set on one scale.
    """
    response = calcs[0].hamiltonian.xc.response
    potential = response.calculate_discontinuity_potential(vbm, cbm)
    lowest = math.inf
    for calc, eps in zip(calcs, eigenvalues, strict=True):
        # GPAW takes as conduction band the first band above the Fermi level at the set's first k-point
        below = int((eps[0, 0] < calc.get_fermi_level()).sum())
        if below != nocc:
            notes.append(f"GLLB-SC: a k-set skipped for the discontinuity ({below} bands below E_F, {nocc} occupied)")
            continue
        _, shift = calc.hamiltonian.xc.response.calculate_discontinuity(potential)
        lowest = min(lowest, float(eps[0, :, nocc].min()) + float(shift))
    if not math.isfinite(lowest):
        raise RunError("GLLB-SC discontinuity: no k-set has the Fermi level in the gap")
    return lowest - cbm


def _eigenvalues(calc) -> np.ndarray:
    """Eigenvalues, eV, shape (n_spins, n_kpoints, n_bands)."""
    nk = len(calc.get_ibz_k_points())
    ns = calc.get_number_of_spins()
    return np.array([[calc.get_eigenvalues(kpt=k, spin=s) for k in range(nk)] for s in range(ns)])


def _occupied_bands(calc, spinpol: bool) -> list[int] | None:
    """Occupied bands per spin channel from the electron count (and the total moment when spin-polarised);
    None when no insulating filling exists (odd count unpolarised, non-integer moment)."""
    n_electrons = float(calc.get_number_of_electrons())
    if not spinpol:
        half = n_electrons / 2
        return [round(half)] if abs(half - round(half)) < 1e-6 else None
    moment = float(calc.get_magnetic_moment())
    if abs(moment - round(moment)) > 0.05:
        return None
    up = (n_electrons + round(moment)) / 2
    down = (n_electrons - round(moment)) / 2
    if abs(up - round(up)) > 1e-6:
        return None
    return [round(up), round(down)]


def gap_from_eigenvalues(eigenvalues: np.ndarray, occupied: list[int]) -> tuple[float, float, float, float]:
    """Fundamental gap, smallest direct gap, VBM and CBM (eV) from eigenvalues of shape
    (n_spins, n_kpoints, n_bands) with ``occupied[s]`` filled bands in spin channel ``s``.

    A negative VBM-to-CBM distance (bands overlap somewhere) is a metal: gap 0, direct gap 0, VBM/CBM NaN.
    """
    eigenvalues = np.asarray(eigenvalues, dtype=float)
    if eigenvalues.ndim != 3 or len(occupied) != eigenvalues.shape[0]:
        raise ValueError(f"{eigenvalues.shape=} must be (n_spins, n_kpoints, n_bands) with {len(occupied)=} spins")
    valence = []
    conduction = []
    for s, n in enumerate(occupied):
        if not 0 < n < eigenvalues.shape[2]:
            raise ValueError(f"occupied[{s}]={n} needs 0 < n < n_bands={eigenvalues.shape[2]}")
        valence.append(eigenvalues[s, :, n - 1])
        conduction.append(eigenvalues[s, :, n])
    vb = np.array(valence)  # (n_spins, n_kpoints)
    cb = np.array(conduction)
    vbm = float(vb.max())
    cbm = float(cb.min())
    if cbm <= vbm:
        return 0.0, 0.0, math.nan, math.nan
    return cbm - vbm, float((cb - vb).min()), vbm, cbm


# ------------------------------------------------------------------------------------------ formation energy


def reference_structure(symbol: str) -> Structure:
    """The elemental reference crystal for ``symbol`` (:func:`materials.thermo.stability.elemental_reference_structure`:
    the Delta-test structure with its magnetic order, else ASE's ``bulk(symbol)``).

    Raises:
        DFTReferenceError: no structure is known for ``symbol``.
    """
    try:
        return stability.elemental_reference_structure(symbol)
    except stability.StabilityError as exc:
        raise DFTReferenceError(str(exc)) from exc


def _reference_settings(structure: Structure, settings: DFTSettings) -> DFTSettings:
    """Reference crystals keep their Delta-test magnetic order (FM Fe/Co/Ni, AFM Cr/Mn and O2) whatever
    ``settings.spinpol`` says: MP's elemental ground states are magnetic too."""
    magnetic = given_magmoms(structure) is not None
    return replace(settings, spinpol=True) if magnetic else settings


def _reference_reusable(cached: dict[str, Any], settings: DFTSettings) -> bool:
    """A converged cached reference serves every run with its settings hash; one that hit its step limit only runs
    allowing no more steps than it had (a run asking for more relaxes it again)."""
    if cached.get("result", {}).get("converged", True):
        return True
    return settings.relax_max_steps <= cached.get("settings", {}).get("relax_max_steps", 0)


def elemental_reference_energy(
    symbol: str, settings: DFTSettings | None = None, cache_dir: str | Path = "dft_references"
) -> float:
    """Energy per atom (eV/atom, GPAW scale) of the relaxed elemental reference crystal of ``symbol``
    (:func:`reference_structure`; positions + cell relaxed, positions only for the molecular crystals of
    ``MOLECULAR_REFERENCES``) with ``settings``, spin-polarised when the reference carries magnetic moments.
    The molecular crystals keep k-points and smearing identical to compounds (unlike a molecule in a box) and
    match what Materials Project uses for gaseous elements.

    Cached as ``cache_dir/<symbol>-<settings_hash>.json`` (the relaxation record included); a cached value of
    the current ``REFERENCE_RECIPE`` is returned without running GPAW, unless its relaxation stopped at its step
    limit unconverged and ``settings.relax_max_steps`` allows more steps (``relax_max_steps`` is not in the
    hash: it does not change a converged energy): then it is relaxed again. Concurrent writers are safe (atomic
    rename; at worst the work is done twice). Each computation (not a cache hit) appends a line to
    ``cache_dir/computed.jsonl`` (``REFERENCE_LEDGER``).

    Raises:
        DFTReferenceError: no reference structure, no PAW setup, or the relaxation failed (reason in message).
    """
    settings = settings or DFTSettings()
    _check_settings(settings)
    cache = Path(cache_dir)
    key = settings_hash(settings)
    path = cache / f"{symbol}-{key}.json"
    if path.is_file():
        cached = json.loads(path.read_text())
        if cached.get("recipe") == REFERENCE_RECIPE and _reference_reusable(cached, settings):
            return float(cached["energy_per_atom"])
    structure = reference_structure(symbol)
    ref_settings = _reference_settings(structure, settings)
    cache.mkdir(parents=True, exist_ok=True)
    result = relax(
        structure,
        ref_settings,
        item_id=f"reference-{symbol}",
        log_path=cache / f"{symbol}-{key}.txt",
        relax_cell=symbol not in MOLECULAR_REFERENCES,
    )
    if result.status != "ok":
        raise DFTReferenceError(f"elemental reference {symbol} failed: {result.failure_reason}")
    change = result.volume_per_atom / (structure.volume / len(structure)) - 1
    if abs(change) > REFERENCE_MAX_VOLUME_CHANGE:
        raise DFTReferenceError(
            f"elemental reference {symbol}: the relaxation changed the volume by {change:+.0%} "
            f"(> {REFERENCE_MAX_VOLUME_CHANGE:.0%} from the Delta-test PBE volume); raise dft.ecut "
            f"(now {settings.ecut} eV) or check the log {result.log_path}"
        )
    record = {
        "symbol": symbol,
        "recipe": REFERENCE_RECIPE,
        "settings_hash": key,
        "settings": asdict(settings),
        "spinpol": ref_settings.spinpol,
        "source": "ase.collections.dcdft" if symbol in _dcdft_names() else "ase.build.bulk",
        "energy_per_atom": result.energy_per_atom,
        "result": result.as_dict(),
    }
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(path)
    # one line per computation (never per cache hit): how often each reference really ran, and how long
    line = {"symbol": symbol, "settings_hash": key, "seconds": round(result.seconds, 2), "pid": os.getpid()}
    with (cache / REFERENCE_LEDGER).open("a") as handle:  # one short O_APPEND write: safe across processes
        handle.write(json.dumps(line) + "\n")
    return result.energy_per_atom


def _dcdft_names() -> list[str]:
    from ase.collections import dcdft

    return list(dcdft.names)


def elemental_references(
    symbols: Iterable[str], settings: DFTSettings | None = None, cache_dir: str | Path = "dft_references"
) -> stability.ElementalEnergies:
    """Reference energies μ (eV/atom) of ``symbols`` as :class:`materials.thermo.stability.ElementalEnergies`
    (convention ``self``: raw PBE with references of the same settings), usable wherever the MLIP references are.

    Raises:
        DFTReferenceError: as :func:`elemental_reference_energy`.
    """
    settings = settings or DFTSettings()
    mu = {s: elemental_reference_energy(s, settings, cache_dir) for s in sorted(set(symbols))}
    label = f"gpaw-{settings.xc}-{settings_hash(settings)}"
    return stability.ElementalEnergies(convention="self", potential=label, mu=mu, source="dft")


def gpaw_formation_energy_per_atom(
    result: DFTResult, settings: DFTSettings | None = None, cache_dir: str | Path = "dft_references"
) -> float:
    """Formation energy, eV/atom, of a successful result against elemental references computed with the same
    ``settings`` (the elements in GGA, as MP computes them), plus the compound's MP2020 correction per atom
    (:func:`mp2020_correction_per_atom`) when ``settings.mp2020``: then it is on the MP2020 scale (oxides,
    fluorides, GGA+U compounds) that the screen uses. The caller stores it:
    ``result.e_form_per_atom = gpaw_formation_energy_per_atom(result, ...)``.

    Raises:
        ValueError: the result failed, it was computed with other settings (its ``settings_hash``), or (with
            ``settings.mp2020``) with a run type MP2020 does not correct (:func:`mp2020_correction_per_atom`).
        DFTReferenceError: a reference could not be computed.
    """
    settings = settings or DFTSettings()
    if result.status != "ok" or not math.isfinite(result.energy):
        raise InputError(f"result {result.id!r} has status {result.status!r}: no energy to form from")
    if result.settings_hash and result.settings_hash != settings_hash(settings):
        raise InputError(
            f"result {result.id!r} was computed with settings {result.settings_hash}, references would use "
            f"{settings_hash(settings)}: formation energies need identical settings"
        )
    composition = result.structure.composition if result.structure is not None else Composition(result.formula)
    correction = 0.0
    if settings.mp2020:
        hubbard = result.hubbard_u if result.run_type else hubbard_u_values(composition, settings)
        correction = mp2020_correction_per_atom(composition, settings, hubbard)
    refs = elemental_references([el.symbol for el in composition.elements], settings, cache_dir)
    if result.structure is not None:
        return stability.formation_energy_per_atom(composition, result.energy, refs) + correction
    energy = result.energy_per_atom * composition.num_atoms
    return stability.formation_energy_per_atom(composition, energy, refs) + correction
