"""Batched relaxation with torch-sim: FIRE over many structures at once, one model call per step for the batch.

The same relaxation as :func:`materials.relax.relax_structure` (positions and cell with a Frechet cell filter,
ASE's FIRE parameters, convergence when every atomic force and every cell-force row is below ``fmax``), the
same :class:`~materials.relax.RelaxResult` records and the same blow-up checks, so the rest of the pipeline does
not know which path ran. Batching is memory-aware: torch-sim's autobatchers keep at most
``RelaxSettings.batch_max_atoms`` atoms in one model call (its memory scaler with ``memory_scales_with="n_atoms"``)
and swap converged structures out and waiting ones in (``InFlightAutoBatcher``).

Models: MACE through torch-sim's ``MaceModel`` (built from the module of an already loaded ``MACECalculator``,
since ``MaceModel`` refuses file paths), CHGNet through :class:`CHGNetModel` below (torch-sim has none).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch_sim as ts
from ase import Atoms
from ase.calculators.calculator import Calculator
from ase.units import GPa
from pymatgen.core import Lattice, Structure
from pymatgen.io.ase import AseAtomsAdaptor
from torch_sim.models.interface import ModelInterface

from materials.potentials import PotentialError, PotentialSpec
from materials.relax import RelaxResult, RelaxSettings, _blow_up_reason


class CHGNetModel(ModelInterface):
    """torch-sim model interface for a CHGNet model: one batched CHGNet forward pass per call.

    Each system of the state becomes a CHGNet ``CrystalGraph`` (CHGNet's own graph converter, on the CPU, as its
    ASE calculator does per structure); CHGNet's ``BatchedGraph`` puts them in one forward pass, and forces and
    stress come from one backward pass. Outputs in torch-sim's units and ``dtype``: energy eV ``[n_systems]``,
    forces eV/Å ``[n_atoms, 3]``, stress eV/Å^3 ``[n_systems, 3, 3]`` (the numbers and sign convention of
    ``CHGNetCalculator``). CHGNet itself computes in float32.
    """

    def __init__(self, model, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float64):
        super().__init__()
        self._device = torch.device(device)
        self._dtype = dtype
        self._compute_stress = True
        self._compute_forces = True
        self._memory_scales_with = "n_atoms"
        self.model = model.to(self._device).eval()

    def forward(self, state: ts.SimState, **kwargs) -> dict[str, torch.Tensor]:
        if not isinstance(state, ts.SimState):
            state = ts.SimState(**state)
        positions = state.positions.detach().cpu().numpy()
        cells = state.row_vector_cell.detach().cpu().numpy()  # [n_systems, 3, 3], lattice vectors as rows
        numbers = state.atomic_numbers.detach().cpu().numpy()
        system_idx = state.system_idx.detach().cpu().numpy()
        graphs = []
        for i in range(state.n_systems):
            mask = system_idx == i
            structure = Structure(Lattice(cells[i]), numbers[mask], positions[mask], coords_are_cartesian=True)
            graphs.append(self.model.graph_converter(structure).to(self._device))
        counts = torch.bincount(state.system_idx, minlength=state.n_systems).to(self._device)
        with torch.enable_grad():  # forces and stress are autograd derivatives of the energy
            energy, forces, stress = self._energy_forces_stress(graphs, counts)
        return {
            "energy": energy.to(self._dtype),
            "forces": forces.to(self._dtype),
            "stress": stress.to(self._dtype),
        }

    def _energy_forces_stress(self, graphs: list, counts: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """CHGNet's ``forward(task="efs")`` without its training-time ``create_graph=True``: one first-order
        backward pass for forces and strains together (CHGNet's own forward differentiates twice, building a
        double-backward graph each time; same numbers, ~2x the cost). Returns energy (eV, [n_systems]),
        forces (eV/Å, [n_atoms, 3]) and stress (eV/Å^3, [n_systems, 3, 3])."""
        from chgnet.model.model import BatchedGraph

        model = self.model
        batched = BatchedGraph.from_graphs(
            graphs,
            bond_basis_expansion=model.bond_basis_expansion,
            angle_basis_expansion=model.angle_basis_expansion,
            compute_stress=True,
        )
        prediction = model._compute(batched, compute_force=False, compute_stress=False)
        energy = prediction["e"]  # eV/atom when the model is intensive (CHGNet's pretrained models are)
        extensive = energy * counts if model.is_intensive else energy
        inputs = [*batched.atom_positions, *batched.strains]
        grads = torch.autograd.grad(extensive.sum(), inputs)
        n = len(graphs)
        forces = -torch.cat(grads[:n])
        volumes = torch.stack([v.reshape(()) for v in batched.volumes]).to(self._device)
        stress = torch.stack(grads[n:]) / volumes.view(-1, 1, 1)  # eV/Å^3, the sign of CHGNet's stress
        if model.composition_model is not None:  # per-structure reference energies: no position dependence
            composition_energy = model.composition_model(graphs)
            extensive = extensive + (composition_energy * counts if model.is_intensive else composition_energy)
        return extensive.detach(), forces.detach(), stress.detach()


def batched_model(spec: PotentialSpec, calculator: Calculator) -> ModelInterface:
    """The torch-sim model for an ASE calculator made by :func:`materials.potentials.load_potential`.

    Shares the calculator's loaded weights (no second load). Raises :class:`PotentialError` for a potential
    without a batched model (EMT).
    """
    device = torch.device(spec.device)
    if spec.name == "chgnet":
        return CHGNetModel(calculator.model, device=device, dtype=torch.float64)
    if spec.name == "mace":
        from torch_sim.models.mace import MaceModel

        dtype = torch.float64 if spec.dtype == "float64" else torch.float32
        return MaceModel(model=calculator.models[0], device=device, dtype=dtype)
    raise PotentialError(
        f"relax.batched: true needs potential.name chgnet or mace (torch-sim has no {spec.name!r} model); "
        "set relax.batched: false"
    )


@dataclass
class BatchLog:
    """What the autobatcher did: the number of atoms and systems of every model call (initial and FIRE steps)."""

    atoms_per_call: list[int] = field(default_factory=list)
    systems_per_call: list[int] = field(default_factory=list)

    def record(self, state: ts.SimState) -> None:
        self.atoms_per_call.append(int(state.n_atoms))
        self.systems_per_call.append(int(state.n_systems))

    @property
    def n_calls(self) -> int:
        return len(self.atoms_per_call)

    @property
    def max_atoms(self) -> int:
        return max(self.atoms_per_call, default=0)


@dataclass
class _Final:
    atoms: Atoms
    energy: float
    forces: np.ndarray
    stress: np.ndarray  # Voigt, GPa
    steps: int
    converged: bool


def _converged(state: ts.SimState, fmax: float, relax_cell: bool) -> torch.Tensor:
    """Per system: every atomic force and (cell relaxation) every cell-force row below ``fmax`` (eV/Å) — the
    criterion of ASE's optimizers on a cell filter."""
    converged = ts.quantities.systemwise_max_force(state) < fmax
    if relax_cell:
        converged &= state.cell_forces.norm(dim=2).max(dim=1).values < fmax
    return converged


#: ASE's FIRE defaults (ase.optimize.FIRE: dt=0.1, fdec=0.5), passed explicitly: :func:`_start_fresh` relies on them.
DT_START = 0.1
F_DEC = 0.5


def _start_fresh(batch: ts.SimState, relax_cell: bool) -> None:
    """Give structures that have not stepped yet (NaN velocities) ASE's first FIRE step, in place.

    torch-sim 0.3.0's ASE-flavoured step treats the whole batch as "first step" (no FIRE mixing, no dt update)
    when any system has NaN velocities, i.e. whenever the in-flight batcher swapped a new structure in: results
    would then depend on the batch's composition. Zero velocities with dt = DT_START / F_DEC give exactly ASE's
    first step through the normal branch (zero power: velocities reset, alpha = alpha_start, dt -> DT_START).
    """
    fresh_atoms = batch.velocities.isnan().any(dim=1)
    if not bool(fresh_atoms.any()):
        return
    fresh = torch.zeros(batch.n_systems, dtype=torch.bool, device=fresh_atoms.device)
    fresh[batch.system_idx[fresh_atoms]] = True
    batch.velocities[fresh_atoms] = 0.0
    if relax_cell:
        batch.cell_velocities[fresh] = 0.0
    batch.dt[fresh] = DT_START / F_DEC


#: ASE's other FIRE defaults (ase.optimize.FIRE: dtmax, Nmin, finc, astart, fa, maxstep).
DT_MAX, N_MIN, F_INC, ALPHA_START, F_ALPHA, MAX_STEP = 1.0, 5, 1.1, 0.1, 0.99, 0.2
#: The 9 unit directions E_mn of 3x3 matrices, for the Frechet derivatives of expm.
_DIRECTIONS = torch.eye(9).reshape(9, 3, 3)


def _expm_frechet_directions(logm: torch.Tensor) -> torch.Tensor:
    """Frechet derivatives of expm at each ``logm`` ([n, 3, 3]) in the 9 unit directions: [n, 9, 3, 3].

    Batched through expm([[A, E], [0, A]]) = [[expm(A), L(A, E)], [0, expm(A)]] with one ``matrix_exp`` call,
    instead of torch-sim 0.3.0's per-system Python loop of 9 single-matrix ``expm_frechet`` calls, each with a
    host sync (the loop dominated a GPU step for large batches).
    """
    n = logm.shape[0]
    directions = _DIRECTIONS.to(device=logm.device, dtype=logm.dtype)
    block = torch.zeros((n, 9, 6, 6), device=logm.device, dtype=logm.dtype)
    block[:, :, :3, :3] = logm[:, None]
    block[:, :, 3:, 3:] = logm[:, None]
    block[:, :, :3, 3:] = directions[None]
    return torch.linalg.matrix_exp(block)[:, :, :3, 3:]


def _frechet_fire_step(state, model: ModelInterface):
    """One ASE-flavoured FIRE step of positions and cell with the Frechet (log-deformation) cell parameterisation,
    for a ``FrechetCellFIREState``: the arithmetic of torch-sim 0.3.0's ``frechet_cell_fire(md_flavor="ase_fire")``
    step (itself ASE's FIRE on a FrechetCellFilter) with (i) every system's FIRE update independent of the others
    (see :func:`_start_fresh`) and (ii) batched Frechet derivatives (:func:`_expm_frechet_directions`).
    Units: positions Å, forces eV/Å, stress eV/Å^3, energy eV."""
    _start_fresh(state, relax_cell=True)
    n, idx = state.n_systems, state.system_idx
    eps = 1e-8 if state.dtype == torch.float32 else 1e-16
    deform = state.deform_grad()
    forces = torch.bmm(state.forces.unsqueeze(1), deform[idx]).squeeze(1)
    power = ts.math.batched_vdot(forces, state.velocities, idx)
    power = power + (state.cell_forces * state.cell_velocities).sum(dim=(1, 2))
    positive = power > 0.0
    increase = (state.n_pos > N_MIN) & positive
    state.dt[increase] = torch.clamp(state.dt[increase] * F_INC, max=DT_MAX)
    state.alpha[increase] *= F_ALPHA
    state.n_pos[positive] += 1
    state.dt[~positive] *= F_DEC
    state.alpha[~positive] = ALPHA_START
    state.n_pos[~positive] = 0

    v_norm = ts.math.batched_vdot(state.velocities, state.velocities, idx) + state.cell_velocities.pow(2).sum(
        dim=(1, 2)
    )
    f_norm = ts.math.batched_vdot(forces, forces, idx) + state.cell_forces.pow(2).sum(dim=(1, 2))
    v_norm, f_norm = torch.sqrt(v_norm), torch.sqrt(f_norm)
    alpha = state.alpha.view(n, 1, 1)
    mixed_cell = state.cell_forces / (f_norm.view(n, 1, 1) + eps) * v_norm.view(n, 1, 1)
    state.cell_velocities = torch.where(
        positive.view(n, 1, 1),
        (1.0 - alpha) * state.cell_velocities + alpha * mixed_cell,
        torch.zeros_like(state.cell_velocities),
    )
    mixed_atoms = forces * (v_norm[idx] / (f_norm[idx] + eps)).unsqueeze(-1)
    alpha_atoms = state.alpha[idx].unsqueeze(-1)
    state.velocities = torch.where(
        positive[idx].unsqueeze(-1),
        (1.0 - alpha_atoms) * state.velocities + alpha_atoms * mixed_atoms,
        torch.zeros_like(state.velocities),
    )

    state.velocities = state.velocities + forces * state.dt[idx].unsqueeze(-1)
    dr_atoms = state.velocities * state.dt[idx].unsqueeze(-1)
    state.cell_velocities = state.cell_velocities + state.cell_forces * state.dt.view(n, 1, 1)
    dr_cell = state.cell_velocities * state.dt.view(n, 1, 1)
    dr_norm = torch.sqrt(ts.math.batched_vdot(dr_atoms, dr_atoms, idx) + dr_cell.pow(2).sum(dim=(1, 2)))
    too_long = dr_norm > MAX_STEP
    dr_cell = torch.where(too_long.view(n, 1, 1), MAX_STEP * dr_cell / (dr_norm.view(n, 1, 1) + eps), dr_cell)
    dr_atoms = torch.where(
        too_long[idx].unsqueeze(-1), MAX_STEP * dr_atoms / (dr_norm[idx].unsqueeze(-1) + eps), dr_atoms
    )

    # positions in the undeformed frame, moved, then deformed with the new cell
    undeformed = torch.linalg.solve(deform[idx], state.positions.unsqueeze(-1)).squeeze(-1) + dr_atoms
    state.cell_positions = state.cell_positions + dr_cell
    logm_new = state.cell_positions / (state.cell_factor + eps)
    deform_new = torch.matrix_exp(logm_new)
    state.row_vector_cell = torch.bmm(state.reference_row_vector_cell, deform_new.mT)
    state.positions = torch.bmm(undeformed.unsqueeze(1), deform_new[idx].mT).squeeze(1)

    results = model(state)
    state.forces, state.energy, state.stress = results["forces"], results["energy"], results["stress"]
    volumes = torch.linalg.det(state.cell).view(n, 1, 1)
    virial = -volumes * (state.stress + state.pressure)
    cell_grad = torch.bmm(virial, torch.linalg.inv(deform_new.transpose(1, 2)))
    derivatives = _expm_frechet_directions(logm_new)  # [n, 9, 3, 3]
    cell_forces = (derivatives * cell_grad[:, None]).sum(dim=(2, 3)).view(n, 3, 3)
    state.cell_forces = cell_forces / (state.cell_factor + eps)
    return state


def _relax_together(atoms_list: list[Atoms], model: ModelInterface, settings: RelaxSettings, log: BatchLog) -> list:
    optimizer = ts.optimizers.frechet_cell_fire if settings.relax_cell else ts.optimizers.fire
    init_fn, ts_step = optimizer(model=model, md_flavor="ase_fire", dt_start=DT_START, f_dec=F_DEC)
    if settings.relax_cell:

        def step_fn(batch):
            return _frechet_fire_step(batch, model)
    else:

        def step_fn(batch):
            _start_fresh(batch, relax_cell=False)
            return ts_step(batch)

    limit = settings.batch_max_atoms
    if limit is not None and any(len(a) > limit for a in atoms_list):
        # a structure larger than the limit cannot share a batch: relax it alone, the others under the limit
        big = [i for i, a in enumerate(atoms_list) if len(a) > limit]
        small = [i for i, a in enumerate(atoms_list) if len(a) <= limit]
        finals: dict[int, _Final] = {}
        for i in big:
            alone = dataclasses.replace(settings, batch_max_atoms=len(atoms_list[i]))
            finals[i] = _relax_together([atoms_list[i]], model, alone, log)[0]
        if small:
            finals.update(
                zip(small, _relax_together([atoms_list[i] for i in small], model, settings, log), strict=True)
            )
        return [finals[i] for i in range(len(atoms_list))]
    state = ts.initialize_state(atoms_list, model.device, model.dtype)

    binner = ts.BinningAutoBatcher(model, memory_scales_with="n_atoms", max_memory_scaler=limit)
    binner.load_states(state)
    initialized = []
    for batch in binner:
        log.record(batch)
        initialized.append(init_fn(batch))
    initialized = binner.restore_original_order(initialized)

    batcher = ts.InFlightAutoBatcher(
        model, memory_scales_with="n_atoms", max_memory_scaler=binner.max_memory_scaler, return_indices=True
    )
    batcher.load_states(initialized)
    n = len(atoms_list)
    steps = [0] * n
    converged = [False] * n
    finished: list[ts.SimState] = []
    batch, _, current = batcher.next_batch(None, None)
    while batch is not None:
        indices = list(current)  # the batcher mutates its list in place
        conv = _converged(batch, settings.fmax, settings.relax_cell)
        done = conv | torch.tensor([steps[i] >= settings.max_steps for i in indices], device=conv.device)
        if bool(done.any()):
            for j, i in enumerate(indices):
                converged[i] = bool(conv[j])
            batch, completed, current = batcher.next_batch(batch, done)
            finished.extend(completed)
            continue  # structures swapped in are checked before their first step, as ASE does
        batch = step_fn(batch)
        log.record(batch)
        for i in indices:
            steps[i] += 1
    finals = []
    for i, s in enumerate(batcher.restore_original_order(finished)):
        atoms = ts.io.state_to_atoms(s)[0]
        if settings.relax_cell:
            t = s.stress[0].detach().cpu().numpy()
            stress = np.array([t[0, 0], t[1, 1], t[2, 2], t[1, 2], t[0, 2], t[0, 1]]) / GPa
        else:
            stress = np.full(6, math.nan)
        finals.append(
            _Final(
                atoms=atoms,
                energy=float(s.energy[0]),
                forces=s.forces.detach().cpu().numpy(),
                stress=stress,
                steps=steps[i],
                converged=converged[i],
            )
        )
    return finals


def relax_structures_batched(
    structures: Sequence[Structure | Atoms],
    model: ModelInterface,
    settings: RelaxSettings | None = None,
    ids: Sequence[str] | None = None,
    log: BatchLog | None = None,
) -> list[RelaxResult]:
    """Relax many structures together; one :class:`RelaxResult` per input, in input order.

    Never raises for a calculation failure: if the batch fails, each structure is retried alone so that one bad
    structure fails with its reason and the others still relax. ``seconds`` is the batch's wall time divided
    evenly among its structures.

    Args:
        structures: starting structures (pymatgen or ASE, periodic).
        model: a torch-sim model, e.g. from :func:`batched_model`.
        settings: convergence, blow-up thresholds and ``batch_max_atoms`` (the autobatcher's memory limit).
        ids: names for the results (default ``structure-<index>``).
        log: filled with the atoms/systems of every model call.
    """
    settings = settings or RelaxSettings()
    log = log if log is not None else BatchLog()
    ids = list(ids) if ids is not None else [f"structure-{i}" for i in range(len(structures))]
    if len(ids) != len(structures):
        raise ValueError(f"{len(ids)=} != {len(structures)=}")
    if not structures:
        return []
    if settings.batch_max_atoms is None and model.device.type != "cuda":
        raise ValueError("relax.batch_max_atoms=None (estimate from GPU memory) needs a CUDA model; give a number")
    atoms_list, formulas = [], []
    for s in structures:
        if isinstance(s, Structure):
            formulas.append(s.composition.reduced_formula)
            atoms_list.append(AseAtomsAdaptor.get_atoms(s))
        else:
            formulas.append(AseAtomsAdaptor.get_structure(s).composition.reduced_formula)
            atoms_list.append(s.copy())
    start = time.perf_counter()
    try:
        finals = _relax_together(atoms_list, model, settings, log)
    except Exception as exc:  # a calculation error in the batch: isolate it by relaxing each structure alone
        if len(atoms_list) > 1:
            return [
                relax_structures_batched([a], model, settings, [i], log)[0]
                for a, i in zip(atoms_list, ids, strict=True)
            ]
        n = len(atoms_list[0])
        return [
            RelaxResult(
                id=ids[0],
                formula=formulas[0],
                status="failed",
                failure_reason=f"calculation failed: {type(exc).__name__}: {exc}",
                n_atoms=n,
                initial_volume_per_atom=atoms_list[0].get_volume() / n,
                seconds=time.perf_counter() - start,
            )
        ]
    seconds = (time.perf_counter() - start) / len(atoms_list)
    return [
        _result(item_id, formula, initial, final, settings, seconds)
        for item_id, formula, initial, final in zip(ids, formulas, atoms_list, finals, strict=True)
    ]


def _result(
    item_id: str, formula: str, initial: Atoms, final: _Final, settings: RelaxSettings, seconds: float
) -> RelaxResult:
    n = len(initial)
    v0 = initial.get_volume()
    result = RelaxResult(
        id=item_id,
        formula=formula,
        status="failed",
        n_atoms=n,
        energy=final.energy,
        energy_per_atom=final.energy / n,
        max_force=float(np.linalg.norm(final.forces, axis=1).max()) if n else 0.0,
        stress=[float(s) for s in final.stress],
        steps=final.steps,
        converged=final.converged,
        initial_volume_per_atom=v0 / n,
        volume_per_atom=final.atoms.get_volume() / n,
        seconds=seconds,
    )
    reason = _blow_up_reason(final.atoms, final.energy, v0, settings)
    if reason is not None:
        result.failure_reason = reason
        return result
    result.structure = AseAtomsAdaptor.get_structure(final.atoms)
    result.status = "ok"
    return result
