"""Batched relaxation with torch-sim: FIRE over many structures at once, one model call per step for the batch.

The same relaxation as :func:`materials.potentials.relax.relax_structure` (positions and cell with a Frechet cell
filter, ASE's FIRE parameters, convergence when every atomic force and every cell-force row is below ``fmax``), the
same :class:`~materials.potentials.relax.RelaxResult` records and the same blow-up checks, so the rest of the
pipeline does not know which path ran. Batching is memory-aware: at most ``RelaxSettings.batch_max_atoms`` atoms in
one model
call (``None``: torch-sim's estimate from free GPU memory), converged structures swapped out and waiting ones in
(in-flight batching, our loop in :func:`_relax_together`; torch-sim's FIRE initialisation and Frechet-cell state).

The step is kept on the device: per-system FIRE updates without boolean-mask indexing, one host sync per step for
the convergence test, neighbour lists built for the whole batch on the device (:func:`neighbor_list`), no
per-structure ``SimState`` objects. Models: MACE through :class:`MACEModel` (the module of an already loaded
``MACECalculator``), CHGNet through :class:`CHGNetModel` (torch-sim has none), both with batched graphs.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch_sim as ts
from ase import Atoms
from ase.calculators.calculator import Calculator
from ase.units import GPa
from pymatgen.core import Composition, Lattice, Structure
from pymatgen.io.ase import AseAtomsAdaptor
from torch_sim.models.interface import ModelInterface

from materials.potentials.calculators import PotentialError, PotentialSpec, sevennet_checkpoint_path
from materials.potentials.relax import RelaxResult, RelaxSettings, blow_up_reason


class CHGNetModel(ModelInterface):
    """torch-sim model interface for a CHGNet model: one batched CHGNet forward pass and one backward pass per call.

    CHGNet's inputs for the whole batch at once: the atom graph (directed bonds within CHGNet's atom-graph cutoff,
    5 Å), its undirected bonds, and the bond graph (pairs of bonds of one centre atom, both within the bond-graph
    cutoff, 3 Å), with the bond and angle basis expansions computed from them, as CHGNet's ``CrystalGraph`` and
    ``BatchedGraph.from_graphs`` define them. ``graphs="device"`` (default) builds them on the model's device from
    :func:`neighbor_list` (no CPU work, no per-structure loop); ``graphs="cpu"`` runs CHGNet's own converter
    (pymatgen neighbour list, per structure, on the CPU) as its ASE calculator does, concatenated and moved in one
    copy. Either way the batch is featurised in one pass (CHGNet's ``from_graphs`` loops over structures, several
    small kernels each). Outputs in torch-sim's units and ``dtype``: energy eV ``[n_systems]``, forces eV/Å
    ``[n_atoms, 3]``, stress eV/Å^3 ``[n_systems, 3, 3]`` (the numbers and sign convention of
    ``CHGNetCalculator``). CHGNet itself computes in float32. (On the CPU, ``device`` graphs take their neighbour
    list from vesin, see :func:`neighbors`.)
    """

    def __init__(
        self,
        model,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float64,
        graphs: Literal["device", "cpu"] = "device",
    ):
        super().__init__()
        if graphs not in ("device", "cpu"):
            raise ValueError(f"graphs={graphs!r}: 'device' or 'cpu'")
        self._device = torch.device(device)
        self._dtype = dtype
        self._compute_stress = True
        self._compute_forces = True
        self._memory_scales_with = "n_atoms"
        self.model = model.to(self._device).eval()
        self.graphs = graphs
        self.atom_cutoff = float(model.graph_converter.atom_graph_cutoff)
        self.bond_cutoff = float(model.graph_converter.bond_graph_cutoff)

    def forward(self, state: ts.SimState, **kwargs) -> dict[str, torch.Tensor]:
        if not isinstance(state, ts.SimState):
            state = ts.SimState(**state)
        graph = self._device_graph(state) if self.graphs == "device" else self._cpu_graph(state)
        with torch.enable_grad():  # forces and stress are autograd derivatives of the energy
            energy, forces, stress = self._energy_forces_stress(graph)
        return {
            "energy": energy.to(self._dtype),
            "forces": forces.to(self._dtype),
            "stress": stress.to(self._dtype),
        }

    def _device_graph(self, state: ts.SimState) -> dict[str, torch.Tensor]:
        """The batch's CHGNet graph built on the device (the conventions of CHGNet's ``Graph``): directed bond e =
        (centre, neighbour, image); its undirected bond pairs it with (neighbour, centre, -image); the bond graph
        holds every ordered pair of distinct directed bonds of one centre atom both shorter than the bond cutoff."""
        positions = state.positions.detach()
        cell = state.row_vector_cell.detach()
        system_idx = state.system_idx
        edge_index, images = neighbors(positions, cell, system_idx, self.atom_cutoff)
        center, neighbor = edge_index
        image = images.round().long()
        # undirected bond: the same key for (i, j, S) and (j, i, -S); for i == j the sign of S is chosen too
        flip = (center > neighbor) | ((center == neighbor) & _lexicographically_negative(image))
        low, high = torch.where(flip, neighbor, center), torch.where(flip, center, neighbor)
        canonical = torch.where(flip.unsqueeze(1), -image, image)
        span = int(canonical.abs().max()) * 2 + 1 if len(canonical) else 1  # host sync
        shift = canonical + span // 2
        key = ((low * positions.shape[0] + high) * span + shift[:, 0]) * span * span + shift[:, 1] * span + shift[:, 2]
        _, directed2undirected = torch.unique(key, return_inverse=True)
        n_undirected = int(directed2undirected.max()) + 1 if len(key) else 0  # host sync
        edges = torch.arange(len(key), device=key.device)
        undirected2directed = torch.full((n_undirected,), len(key), device=key.device, dtype=torch.long)
        undirected2directed = undirected2directed.scatter_reduce(0, directed2undirected, edges, reduce="amin")
        # bond graph: ordered pairs (a, b), a != b, of short directed bonds with the same centre atom
        vectors = (
            positions[neighbor]
            - positions[center]
            + torch.bmm(images.unsqueeze(1), cell[system_idx[center]]).squeeze(1)
        )
        short = (vectors.norm(dim=1) < self.bond_cutoff).nonzero(as_tuple=True)[0]  # host sync
        short = short[torch.argsort(center[short], stable=True)]
        per_atom = torch.bincount(center[short], minlength=positions.shape[0])
        first = torch.cumsum(per_atom, 0) - per_atom
        pairs = per_atom * per_atom
        ends = torch.cumsum(pairs, 0)
        n_pairs = int(ends[-1]) if len(ends) else 0  # host sync
        atom = torch.repeat_interleave(torch.arange(len(pairs), device=key.device), pairs, output_size=n_pairs)
        local = torch.arange(n_pairs, device=key.device) - (ends - pairs)[atom]
        k = per_atom[atom]
        left, right = first[atom] + torch.div(local, k, rounding_mode="floor"), first[atom] + local % k
        distinct = (left != right).nonzero(as_tuple=True)[0]  # host sync
        bond_a, bond_b = short[left[distinct]], short[right[distinct]]
        inverse = torch.linalg.inv_ex(cell).inverse
        fractional = torch.bmm(positions.unsqueeze(1), inverse[system_idx]).squeeze(1)
        return {
            "numbers": state.atomic_numbers.to(torch.int32),
            "fractional": fractional.to(torch.float32),
            "lattice": cell.to(torch.float32),
            "atom_owner": system_idx,
            "atom_graph": edge_index.T.to(torch.int32),
            "image": images.to(torch.float32),
            "directed2undirected": directed2undirected.to(torch.int32),
            "undirected2directed": undirected2directed,
            "angle_center": center[bond_a],
            "angle_bond_a": bond_a,
            "angle_bond_b": bond_b,
        }

    def _cpu_graph(self, state: ts.SimState) -> dict[str, torch.Tensor]:
        """The batch's graph from CHGNet's own converter, one structure at a time on the CPU (as its ASE
        calculator does), concatenated with offsets and moved to the device in one copy."""
        positions = state.positions.detach().cpu().numpy()
        cells = state.row_vector_cell.detach().cpu().numpy()  # [n_systems, 3, 3], lattice vectors as rows
        numbers = state.atomic_numbers.detach().cpu().numpy()
        bounds = np.cumsum([0, *torch.bincount(state.system_idx, minlength=len(cells)).tolist()])
        parts: dict[str, list] = {name: [] for name in ("frac", "atom_graph", "image", "d2u", "u2d", "bond_graph")}
        n_directed = n_undirected = 0
        for i, cell in enumerate(cells):
            atoms = slice(bounds[i], bounds[i + 1])
            structure = Structure(Lattice(cell), numbers[atoms], positions[atoms], coords_are_cartesian=True)
            graph = self.model.graph_converter(structure)
            parts["frac"].append(graph.atom_frac_coord.detach())
            parts["atom_graph"].append(graph.atom_graph.reshape(-1, 2).long() + int(bounds[i]))
            parts["image"].append(graph.neighbor_image.reshape(-1, 3))
            parts["d2u"].append(graph.directed2undirected.long() + n_undirected)
            parts["u2d"].append(graph.undirected2directed.long() + n_directed)
            bond_graph = graph.bond_graph.reshape(-1, 5).long()
            offsets = torch.tensor([int(bounds[i]), n_undirected, n_directed, n_undirected, n_directed])
            parts["bond_graph"].append(bond_graph + offsets)
            n_directed += len(graph.atom_graph.reshape(-1, 2))
            n_undirected += len(graph.undirected2directed)
        bond_graph = torch.cat(parts["bond_graph"])
        host = {
            "fractional": torch.cat(parts["frac"]),
            "lattice": torch.tensor(cells, dtype=torch.float32),
            "atom_graph": torch.cat(parts["atom_graph"]).to(torch.int32),
            "image": torch.cat(parts["image"]),
            "directed2undirected": torch.cat(parts["d2u"]).to(torch.int32),
            "undirected2directed": torch.cat(parts["u2d"]),
            "angle_center": bond_graph[:, 0],
            "angle_bond_a": bond_graph[:, 2],
            "angle_bond_b": bond_graph[:, 4],
        }
        graph = {name: value.to(self._device, non_blocking=True) for name, value in host.items()}
        graph["numbers"] = state.atomic_numbers.to(torch.int32)
        graph["atom_owner"] = state.system_idx
        return graph

    def _energy_forces_stress(self, graph: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """CHGNet's ``BatchedGraph.from_graphs`` featurisation for the whole batch in one pass, then its
        ``forward(task="efs")`` without the training-time ``create_graph=True``: one first-order backward pass for
        forces and strains together (CHGNet's own forward differentiates twice, building a double-backward graph
        each time; same numbers, ~2x the cost). Returns energy (eV, [n_systems]), forces (eV/Å, [n_atoms, 3]) and
        stress (eV/Å^3, [n_systems, 3, 3])."""
        from chgnet.model.model import BatchedGraph

        model = self.model
        owner = graph["atom_owner"]
        n_systems = graph["lattice"].shape[0]
        counts = torch.bincount(owner, minlength=n_systems)
        strain = torch.zeros_like(graph["lattice"], requires_grad=True)
        eye = torch.eye(3, dtype=strain.dtype, device=strain.device)
        lattice = torch.bmm(graph["lattice"], eye + strain)
        volumes = (lattice[:, 0] * torch.linalg.cross(lattice[:, 1], lattice[:, 2])).sum(dim=1)
        cart = torch.bmm(graph["fractional"].unsqueeze(1), lattice[owner]).squeeze(1)
        atom_graph = graph["atom_graph"].long()
        center, neighbor = atom_graph[:, 0], atom_graph[:, 1]
        neighbor_cart = cart[neighbor] + torch.bmm(graph["image"].unsqueeze(1), lattice[owner[center]]).squeeze(1)
        bond_vectors = cart[center] - neighbor_cart
        bond_lengths = torch.norm(bond_vectors, dim=1)
        bond_vectors = bond_vectors / bond_lengths[:, None]
        undirected_lengths = bond_lengths[graph["undirected2directed"]]
        expansion = model.bond_basis_expansion
        directed2undirected = graph["directed2undirected"].long()
        angle_center, bond_a, bond_b = graph["angle_center"], graph["angle_bond_a"], graph["angle_bond_b"]
        batched = BatchedGraph(
            atomic_numbers=graph["numbers"],
            bond_bases_ag=expansion.rbf_expansion_ag(undirected_lengths),
            bond_bases_bg=expansion.rbf_expansion_bg(undirected_lengths),
            angle_bases=model.angle_basis_expansion(bond_vectors[bond_a], bond_vectors[bond_b])
            if len(bond_a)
            else torch.tensor([]),
            batched_atom_graph=graph["atom_graph"],
            batched_bond_graph=torch.stack(
                [angle_center, directed2undirected[bond_a], directed2undirected[bond_b]], dim=1
            ).to(torch.int32)
            if len(bond_a)
            else torch.tensor([]),
            atom_owners=owner.to(torch.int32),
            directed2undirected=graph["directed2undirected"],
            atom_positions=[cart],
            strains=[strain],
            volumes=volumes,
        )
        prediction = model._compute(batched, compute_force=False, compute_stress=False)
        energy = prediction["e"]  # eV/atom when the model is intensive (CHGNet's pretrained models are)
        extensive = energy * counts if model.is_intensive else energy
        forces, strain_grad = torch.autograd.grad(extensive.sum(), [cart, strain])
        stress = strain_grad / volumes.view(-1, 1, 1)  # eV/Å^3, the sign of CHGNet's stress
        composition = model.composition_model
        if composition is not None:  # per-structure reference energies: no position dependence
            elements = torch.zeros(n_systems, composition.max_num_elements, device=owner.device)
            elements = elements.index_put((owner, graph["numbers"].long() - 1), torch.ones_like(cart[:, 0]), True)
            if composition.is_intensive:
                elements = elements / counts.unsqueeze(1)
            reference = composition._get_energy(elements.to(next(composition.parameters()).dtype))
            extensive = extensive + (reference * counts if model.is_intensive else reference)
        return extensive.detach(), -forces.detach(), stress.detach()


def _lexicographically_negative(vectors: torch.Tensor) -> torch.Tensor:
    """Per row of integer vectors: the first non-zero component is negative."""
    first = torch.where(
        vectors[:, 0] != 0, vectors[:, 0], torch.where(vectors[:, 1] != 0, vectors[:, 1], vectors[:, 2])
    )
    return first < 0


def neighbor_list(
    positions: torch.Tensor, cell: torch.Tensor, system_idx: torch.Tensor, cutoff: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Full periodic neighbour list of many systems at once, on the tensors' device (a few host syncs per call for
    output sizes, no per-system Python loop).

    Args:
        positions: [n_atoms, 3] Å; the atoms of each system contiguous, systems in order (as in a torch-sim state).
        cell: [n_systems, 3, 3] lattice vectors as rows (Å).
        system_idx: [n_atoms] system of each atom.
        cutoff: pairs closer than this (Å) are neighbours.

    Returns:
        edge_index [2, n_edges] (sender i, receiver j) and unit_shifts [n_edges, 3] (integers, positions' dtype)
        with the edge vector ``positions[j] - positions[i] + unit_shifts @ cell[system of i]``, both directions of
        each pair, no self pair at zero shift: the convention of ASE's, matscipy's and vesin's full lists (and so of
        MACE's calculator). Atoms need not lie inside their cell.

    All pairs of a system's atoms are tried against every lattice translation that can reach within ``cutoff`` of
    the cell (per axis, ceil(cutoff / plane spacing)), after wrapping positions into the cell: fine for the small
    cells of a screen (tens of atoms), quadratic in the atoms of one system.
    """
    device, dtype = positions.device, positions.dtype
    n_systems = cell.shape[0]
    inverse = torch.linalg.inv_ex(cell).inverse  # fractional = cartesian @ inverse
    fractional = torch.bmm(positions.unsqueeze(1), inverse[system_idx]).squeeze(1)
    offset = torch.floor(fractional)
    wrapped = positions - torch.bmm(offset.unsqueeze(1), cell[system_idx]).squeeze(1)
    # lattice translations within reach: the plane spacing along axis k is 1 / |column k of the inverse|
    reach = torch.ceil(cutoff * torch.linalg.vector_norm(inverse, dim=1)).to(torch.long)  # [n_systems, 3]
    counts = torch.bincount(system_idx, minlength=n_systems)
    first = torch.cumsum(counts, 0) - counts
    max_reach = int(reach.max())  # host sync 1
    axis = torch.arange(-max_reach, max_reach + 1, device=device)
    grid = torch.cartesian_prod(axis, axis, axis)  # [n_grid, 3]
    within = (grid.abs()[None] <= reach[:, None]).all(dim=2)  # [n_systems, n_grid]
    image_system, image = within.nonzero(as_tuple=True)  # host sync 2; (system, translation) pairs, by system
    image_cart = torch.bmm(grid[image].to(dtype).unsqueeze(1), cell[image_system]).squeeze(1)
    image_n = counts[image_system]
    pairs_per_image = image_n * image_n
    ends = torch.cumsum(pairs_per_image, 0)
    n_candidates = int(ends[-1]) if len(ends) else 0  # host sync 3
    owner = torch.repeat_interleave(
        torch.arange(len(image), device=device), pairs_per_image, output_size=n_candidates
    )  # [n_candidates]: the (system, translation) pair of each candidate
    local = torch.arange(n_candidates, device=device) - (ends - pairs_per_image)[owner]
    n = image_n[owner]
    base = first[image_system[owner]]
    i = base + torch.div(local, n, rounding_mode="floor")
    j = base + local % n
    vectors = wrapped[j] - wrapped[i] + image_cart[owner]
    keep = (vectors * vectors).sum(dim=1) < cutoff * cutoff
    keep &= (i != j) | (grid[image[owner]] != 0).any(dim=1)
    kept = keep.nonzero(as_tuple=True)[0]  # host sync 4
    i, j, shift = i[kept], j[kept], grid[image[owner[kept]]].to(dtype)
    # translation between the wrapped and the given positions: p = wrapped + offset @ cell
    unit_shifts = shift + offset[i] - offset[j]
    return torch.stack((i, j)), unit_shifts


def neighbors(
    positions: torch.Tensor, cell: torch.Tensor, system_idx: torch.Tensor, cutoff: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`neighbor_list`'s result, computed where it is cheapest: on a GPU by :func:`neighbor_list` (all pairs
    of each system, no loop); on the CPU by vesin's cell lists one system at a time (a loop is cheap there, and
    trying all pairs against every lattice translation is not)."""
    if positions.device.type != "cpu":
        return neighbor_list(positions, cell, system_idx, cutoff)
    from vesin import NeighborList

    finder = NeighborList(cutoff=cutoff, full_list=True)
    points = positions.detach().to(torch.float64).numpy()
    boxes = cell.detach().to(torch.float64).numpy()
    counts = torch.bincount(system_idx, minlength=len(boxes)).tolist()
    senders, receivers, shifts = [], [], []
    start = 0
    for box, n in zip(boxes, counts, strict=True):
        i, j, shift = finder.compute(points=points[start : start + n], box=box, periodic=True, quantities="ijS")
        senders.append(i.astype(np.int64) + start)
        receivers.append(j.astype(np.int64) + start)
        shifts.append(shift)
        start += n
    edge_index = torch.from_numpy(np.stack([np.concatenate(senders), np.concatenate(receivers)]))
    return edge_index, torch.from_numpy(np.concatenate(shifts).reshape(-1, 3)).to(positions.dtype)


class MACEModel(ModelInterface):
    """torch-sim model interface for a MACE model, with the neighbour list of the whole batch built on the model's
    device (:func:`neighbor_list`).

    torch-sim 0.3.0's ``MaceModel`` builds one neighbour list per system per call with vesin on the CPU (a Python
    loop over the systems, each with device-to-host and host-to-device copies: about 1 s per call for 2,048 cells
    on an H200) and rebuilds its per-system bookkeeping with one ``.item()`` per system whenever the batch changes.
    Here: one batched neighbour list, element one-hot and ``ptr`` cached per batch, and the model fed detached
    positions (MACE marks its input positions ``requires_grad``; on the state's own tensor that chains every
    later FIRE update into an autograd graph that grows step after step). Same outputs as ``MaceModel``: energy eV
    ``[n_systems]``, forces eV/Å ``[n_atoms, 3]``, stress eV/Å^3 ``[n_systems, 3, 3]``.
    """

    def __init__(self, model, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float64):
        super().__init__()
        self._device = torch.device(device)
        self._dtype = dtype
        self._compute_stress = True
        self._compute_forces = True
        self._memory_scales_with = "n_atoms"
        self.model = model.to(device=self._device, dtype=dtype).eval()
        self.r_max = float(self.model.r_max)
        elements = self.model.atomic_numbers.detach().cpu().long()
        index_of_z = torch.full((max(119, int(elements.max()) + 1),), -1, dtype=torch.long)
        index_of_z[elements] = torch.arange(len(elements))
        self._index_of_z = index_of_z.to(self._device)
        self._n_elements = len(elements)
        self._batch_cache: tuple = (None, None, None, None)

    def _node_attrs_and_ptr(self, state: ts.SimState) -> tuple[torch.Tensor, torch.Tensor]:
        """One-hot elements and system boundaries, recomputed only when the batch's tensors change."""
        numbers, system_idx, node_attrs, ptr = self._batch_cache
        if numbers is state.atomic_numbers and system_idx is state.system_idx:
            return node_attrs, ptr
        numbers, system_idx = state.atomic_numbers, state.system_idx
        known = (numbers >= 0) & (numbers < len(self._index_of_z))
        index = self._index_of_z[numbers.long().clamp(0, len(self._index_of_z) - 1)]
        unknown = ~known | (index < 0)
        if bool(unknown.any()):
            missing = sorted({int(z) for z in numbers[unknown].tolist()})
            raise ValueError(f"atomic numbers {missing} are not among the MACE model's elements")
        node_attrs = torch.nn.functional.one_hot(index, self._n_elements).to(self._dtype)
        counts = torch.bincount(system_idx, minlength=state.cell.shape[0])
        ptr = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
        self._batch_cache = (numbers, system_idx, node_attrs, ptr)
        return node_attrs, ptr

    def forward(self, state: ts.SimState, **kwargs) -> dict[str, torch.Tensor]:
        if not isinstance(state, ts.SimState):
            state = ts.SimState(**state)
        node_attrs, ptr = self._node_attrs_and_ptr(state)
        positions = state.positions.detach()
        cell = state.row_vector_cell.detach()
        system_idx = state.system_idx
        edge_index, unit_shifts = neighbors(positions, cell, system_idx, self.r_max)
        shifts = torch.bmm(unit_shifts.unsqueeze(1), cell[system_idx[edge_index[0]]]).squeeze(1)
        data = {
            "ptr": ptr,
            "node_attrs": node_attrs,
            "batch": system_idx,
            "pbc": state.pbc,
            "cell": cell,
            "positions": positions,
            "edge_index": edge_index,
            "unit_shifts": unit_shifts,
            "shifts": shifts,
        }
        out = self.model(data, compute_force=True, compute_stress=True)
        return {
            "energy": out["energy"].detach(),
            "forces": out["forces"].detach(),
            "stress": out["stress"].detach(),
        }


def batched_model(spec: PotentialSpec, calculator: Calculator) -> ModelInterface:
    """The torch-sim model for an ASE calculator made by :func:`materials.potentials.calculators.load_potential`.

    Shares the calculator's loaded weights (no second load). Raises :class:`PotentialError` for a potential
    without a batched model (EMT).
    """
    device = torch.device(spec.device)
    if spec.name == "chgnet":
        return CHGNetModel(calculator.model, device=device, dtype=torch.float64)
    if spec.name == "mace":
        dtype = torch.float64 if spec.dtype == "float64" else torch.float32
        return MACEModel(calculator.models[0], device=device, dtype=dtype)
    if spec.name == "sevennet":
        return sevennet_model(spec, device)
    raise PotentialError(
        f"relax.batched: true needs potential.name chgnet, mace or sevennet (no batched model for {spec.name!r}); "
        "set relax.batched: false"
    )


def sevennet_model(spec: PotentialSpec, device: torch.device) -> ModelInterface:
    """torch-sim 0.3.0's SevenNet wrapper (sevenn 0.12.x; SevenNet's environment) on a model of its own: the wrapper
    switches the module to batch mode, after which a ``SevenNetCalculator`` holding the same module fails, so the
    checkpoint is built a second time rather than shared (float32, SevenNet's own precision)."""
    from sevenn.util import load_checkpoint
    from torch_sim.models.sevennet import SevenNetModel

    model = load_checkpoint(str(sevennet_checkpoint_path(spec))).build_model()
    modal = "PBE" if (spec.model or "7net-0") == "7net-mf-0" else None
    return SevenNetModel(model=model, modal=modal, device=device)


@dataclass
class BatchLog:
    """What the autobatcher did: the number of atoms and systems of every model call (initial and FIRE steps)."""

    atoms_per_call: list[int] = field(default_factory=list)
    systems_per_call: list[int] = field(default_factory=list)
    #: wall time spent building the result records (pymatgen structures, blow-up checks) after the relaxation
    records_seconds: float = 0.0

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
    close_pair: bool = True  # two atoms may be closer than relax.min_distance (False: checked on the device)


def _converged(state: ts.SimState, fmax: float, relax_cell: bool) -> torch.Tensor:
    """Per system: every atomic force and (cell relaxation) every cell-force row below ``fmax`` (eV/Å) — the
    criterion of ASE's optimizers on a cell filter."""
    n_systems = state.cell.shape[0]  # not state.n_systems: torch.unique, a sort and a host sync each time
    max_force = torch.zeros(n_systems, device=state.device, dtype=state.dtype).scatter_reduce(
        0, state.system_idx, state.forces.norm(dim=1), reduce="amax"
    )
    converged = max_force < fmax
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
    Called only when the batch has changed (no host sync, so harmless when nothing is fresh).
    """
    fresh_atoms = batch.velocities.isnan().any(dim=1)
    fresh = torch.zeros(batch.cell.shape[0], dtype=torch.long, device=fresh_atoms.device)
    fresh = fresh.index_add_(0, batch.system_idx, fresh_atoms.long()) > 0
    batch.velocities = torch.where(fresh_atoms.unsqueeze(1), 0.0, batch.velocities)
    if relax_cell:
        batch.cell_velocities = torch.where(fresh.view(-1, 1, 1), 0.0, batch.cell_velocities)
    batch.dt = torch.where(fresh, DT_START / F_DEC, batch.dt)


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


def _frechet_fire_init(state: ts.SimState, model: ModelInterface):
    """The initial ``FrechetCellFIREState`` of torch-sim 0.3.0's ``frechet_cell_fire`` (ASE flavour, no external
    pressure, cell factor = atoms per system, NaN velocities: see :func:`_start_fresh`) without its per-system
    Python loop of 3x3 inverses (a host sync each: ~1 s for 8,192 structures on a GPU): one batched inverse."""
    from torch_sim.optimizers import FrechetCellFIREState

    n, device, dtype = state.cell.shape[0], state.device, state.dtype
    counts = torch.bincount(state.system_idx, minlength=n)
    cell_factor = counts.to(dtype).view(n, 1, 1)
    pressure = torch.zeros((n, 3, 3), device=device, dtype=dtype)
    results = model(state)
    deform = torch.linalg.solve_ex(state.row_vector_cell, state.row_vector_cell).result.mT  # the identity
    volumes = torch.linalg.det(state.cell).view(n, 1, 1)
    virial = -volumes * (results["stress"] + pressure)
    cell_forces = torch.bmm(virial, torch.linalg.inv_ex(deform.mT).inverse) / cell_factor
    cell_masses = torch.zeros(n, device=device, dtype=dtype).index_add_(0, state.system_idx, state.masses)
    return FrechetCellFIREState(
        positions=state.positions,
        masses=state.masses,
        cell=state.cell,
        atomic_numbers=state.atomic_numbers,
        system_idx=state.system_idx,
        pbc=state.pbc,
        velocities=torch.full(state.positions.shape, torch.nan, device=device, dtype=dtype),
        forces=results["forces"],
        energy=results["energy"],
        stress=results["stress"],
        cell_positions=torch.zeros((n, 3, 3), device=device, dtype=dtype),
        cell_velocities=torch.full((n, 3, 3), torch.nan, device=device, dtype=dtype),
        cell_forces=cell_forces,
        cell_masses=cell_masses.unsqueeze(-1).expand(-1, 3),
        reference_cell=state.cell.clone(),
        cell_factor=cell_factor,
        pressure=pressure,
        dt=torch.full((n,), DT_START, device=device, dtype=dtype),
        alpha=torch.full((n,), ALPHA_START, device=device, dtype=dtype),
        n_pos=torch.zeros((n,), device=device, dtype=torch.int32),
        hydrostatic_strain=False,
        constant_volume=False,
    )


def _vdot(x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, n: int) -> torch.Tensor:
    """Per-system sum of the row dot products of ``x`` and ``y`` ([n_atoms, 3]): torch-sim's ``batched_vdot``
    without its two host syncs (its output size and index check read device values)."""
    return torch.zeros(n, dtype=x.dtype, device=x.device).index_add_(0, idx, (x * y).sum(dim=1))


def _frechet_fire_step(state, model: ModelInterface):
    """One ASE-flavoured FIRE step of positions and cell with the Frechet (log-deformation) cell parameterisation,
    for a ``FrechetCellFIREState``: the arithmetic of torch-sim 0.3.0's ``frechet_cell_fire(md_flavor="ase_fire")``
    step (itself ASE's FIRE on a FrechetCellFilter) with (i) every system's FIRE update independent of the others
    (see :func:`_start_fresh`, called by the loop when the batch changes) and (ii) batched Frechet derivatives
    (:func:`_expm_frechet_directions`); per-system updates with ``torch.where`` rather than boolean-mask indexing
    (each of those is a host sync), one 3x3 inverse per system rather than one solve per atom.
    Units: positions Å, forces eV/Å, stress eV/Å^3, energy eV."""
    n, idx = state.cell.shape[0], state.system_idx
    eps = 1e-8 if state.dtype == torch.float32 else 1e-16
    deform = torch.linalg.solve_ex(state.reference_row_vector_cell, state.row_vector_cell).result.mT
    forces = torch.bmm(state.forces.unsqueeze(1), deform[idx]).squeeze(1)
    power = _vdot(forces, state.velocities, idx, n)
    power = power + (state.cell_forces * state.cell_velocities).sum(dim=(1, 2))
    positive = power > 0.0
    increase = (state.n_pos > N_MIN) & positive
    state.dt = torch.where(increase, torch.clamp(state.dt * F_INC, max=DT_MAX), state.dt)
    state.alpha = torch.where(increase, state.alpha * F_ALPHA, state.alpha)
    state.n_pos = torch.where(positive, state.n_pos + 1, torch.zeros_like(state.n_pos))
    state.dt = torch.where(positive, state.dt, state.dt * F_DEC)
    state.alpha = torch.where(positive, state.alpha, torch.full_like(state.alpha, ALPHA_START))

    v_norm = _vdot(state.velocities, state.velocities, idx, n) + state.cell_velocities.pow(2).sum(dim=(1, 2))
    f_norm = _vdot(forces, forces, idx, n) + state.cell_forces.pow(2).sum(dim=(1, 2))
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
    dr_norm = torch.sqrt(_vdot(dr_atoms, dr_atoms, idx, n) + dr_cell.pow(2).sum(dim=(1, 2)))
    too_long = dr_norm > MAX_STEP
    dr_cell = torch.where(too_long.view(n, 1, 1), MAX_STEP * dr_cell / (dr_norm.view(n, 1, 1) + eps), dr_cell)
    dr_atoms = torch.where(
        too_long[idx].unsqueeze(-1), MAX_STEP * dr_atoms / (dr_norm[idx].unsqueeze(-1) + eps), dr_atoms
    )

    # positions in the undeformed frame, moved, then deformed with the new cell
    undeformed = (
        torch.bmm(torch.linalg.inv_ex(deform).inverse[idx], state.positions.unsqueeze(-1)).squeeze(-1) + dr_atoms
    )
    state.cell_positions = state.cell_positions + dr_cell
    logm_new = state.cell_positions / (state.cell_factor + eps)
    deform_new = torch.matrix_exp(logm_new)
    state.row_vector_cell = torch.bmm(state.reference_row_vector_cell, deform_new.mT)
    state.positions = torch.bmm(undeformed.unsqueeze(1), deform_new[idx].mT).squeeze(1)

    results = model(state)
    state.forces, state.energy, state.stress = results["forces"], results["energy"], results["stress"]
    volumes = torch.linalg.det(state.cell).view(n, 1, 1)
    virial = -volumes * (state.stress + state.pressure)
    cell_grad = torch.bmm(virial, torch.linalg.inv_ex(deform_new.transpose(1, 2)).inverse)
    derivatives = _expm_frechet_directions(logm_new)  # [n, 9, 3, 3]
    cell_forces = (derivatives * cell_grad[:, None]).sum(dim=(2, 3)).view(n, 3, 3)
    state.cell_forces = cell_forces / (state.cell_factor + eps)
    return state


def _relax_together(atoms_list: list[Atoms], model: ModelInterface, settings: RelaxSettings, log: BatchLog) -> list:
    """FIRE on all structures with in-flight batching: at most ``batch_max_atoms`` atoms in a model call; a structure
    leaves the batch when it converges or reaches ``max_steps`` and waiting ones take its place (checked for
    convergence before their first step, as ASE does). Our loop rather than torch-sim 0.3.0's
    ``InFlightAutoBatcher``, whose state filtering remaps system indices with one ``.item()`` per atom (thousands of
    host syncs per swap on a GPU) and splits every finished batch into one ``SimState`` per structure: here one
    device-side filter per swap, per-structure step counts on the device, one host sync per step. Structures join
    in groups, initialised together (one model call per group)."""
    if settings.relax_cell:

        def init_fn(state):
            return _frechet_fire_init(state, model)

        def step_fn(batch):
            return _frechet_fire_step(batch, model)
    else:
        init_fn, step_fn = ts.optimizers.fire(model=model, md_flavor="ase_fire", dt_start=DT_START, f_dec=F_DEC)

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
    if limit is None:  # torch-sim estimates the limit from free GPU memory with trial model calls
        binner = ts.BinningAutoBatcher(model, memory_scales_with="n_atoms")
        binner.load_states(ts.initialize_state(atoms_list, model.device, model.dtype))
        limit = binner.max_memory_scaler
    sizes = [len(a) for a in atoms_list]
    waiting = deque(range(len(atoms_list)))
    results: list[_Final | None] = [None] * len(atoms_list)
    batch, members, steps = None, [], None
    fresh = False
    while True:
        # structures that fit join the batch, initialised together (one model call), no per-structure states
        incoming, total = [], sum(sizes[i] for i in members)
        while waiting and total + sizes[waiting[0]] <= limit:
            incoming.append(waiting.popleft())
            total += sizes[incoming[-1]]
        if incoming:
            joining = ts.initialize_state([atoms_list[i] for i in incoming], model.device, model.dtype)
            log.record(joining)
            joining = init_fn(joining)
            batch = joining if batch is None else ts.concatenate_states([batch, joining])
            new_steps = torch.zeros(len(incoming), dtype=torch.long, device=batch.device)
            steps = new_steps if steps is None else torch.cat([steps, new_steps])
            members += incoming
            fresh = True
        if batch is None:
            break
        converged = _converged(batch, settings.fmax, settings.relax_cell)
        done = converged | (steps >= settings.max_steps)
        if bool(done.any()):  # the step's one host sync
            batch, members, steps = _retire(batch, members, steps, done, converged, results, settings)
            continue  # structures swapped in are checked before their first step, as ASE does
        if fresh:
            _start_fresh(batch, settings.relax_cell)
            fresh = False
        batch = step_fn(batch)
        log.record(batch)
        steps += 1
    return results


def _retire(
    batch,
    members: list[int],
    steps: torch.Tensor,
    done: torch.Tensor,
    converged: torch.Tensor,
    results,
    settings: RelaxSettings,
):
    """Record the structures of ``batch`` that are ``done`` into ``results`` (by input index) and return the batch
    of the others (None when none is left), their input indices and their step counts. Also flags, on the device,
    the structures with two atoms closer than ``settings.min_distance`` (the collapse test of the blow-up checks,
    which ASE's all-pairs distances make cost ~5 ms per structure on the host)."""
    relax_cell = settings.relax_cell
    n_systems = len(members)
    close = torch.zeros(n_systems, dtype=torch.bool, device=done.device)
    if settings.min_distance > 0:  # conservative: a pair within a hair above the limit defers to the exact test
        pairs, _ = neighbors(
            batch.positions.detach(), batch.row_vector_cell.detach(), batch.system_idx, settings.min_distance * 1.001
        )
        distinct = pairs[0] != pairs[1]
        close[batch.system_idx[pairs[0][distinct]]] = True
    done_list, converged_list, steps_list, close_list = (
        done.tolist(),
        converged.tolist(),
        steps.tolist(),
        close.tolist(),
    )
    counts = torch.bincount(batch.system_idx, minlength=n_systems).tolist()
    positions = batch.positions.detach().cpu().numpy()
    forces = batch.forces.detach().cpu().numpy()
    numbers = batch.atomic_numbers.detach().cpu().numpy()
    cells = batch.row_vector_cell.detach().cpu().numpy()
    energies = batch.energy.detach().cpu().numpy()
    stresses = batch.stress.detach().cpu().numpy() if relax_cell else None
    start = 0
    for j, i in enumerate(members):
        end = start + counts[j]
        if done_list[j]:
            if relax_cell:
                t = stresses[j]
                stress = np.array([t[0, 0], t[1, 1], t[2, 2], t[1, 2], t[0, 2], t[0, 1]]) / GPa
            else:
                stress = np.full(6, math.nan)
            results[i] = _Final(
                atoms=Atoms(numbers=numbers[start:end], positions=positions[start:end], cell=cells[j], pbc=batch.pbc),
                energy=float(energies[j]),
                forces=forces[start:end],
                stress=stress,
                steps=steps_list[j],
                converged=converged_list[j],
                close_pair=close_list[j],
            )
        start = end
    if all(done_list):
        return None, [], None
    keep = ~done
    atom_keep = keep[batch.system_idx]
    attrs = dict(ts.state.get_attrs_for_scope(batch, "global"))
    for name, value in ts.state.get_attrs_for_scope(batch, "per-atom"):
        attrs[name] = value[atom_keep]
    for name, value in ts.state.get_attrs_for_scope(batch, "per-system"):
        attrs[name] = value[keep]
    attrs["system_idx"] = (torch.cumsum(keep, 0) - 1)[batch.system_idx[atom_keep]]
    members = [i for i, d in zip(members, done_list, strict=True) if not d]
    return type(batch)(**attrs), members, steps[keep]


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
            formulas.append(Composition(s.get_chemical_formula()).reduced_formula)
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
    records_start = time.perf_counter()
    seconds = (records_start - start) / len(atoms_list)
    results = [
        _result(item_id, formula, initial, final, settings, seconds)
        for item_id, formula, initial, final in zip(ids, formulas, atoms_list, finals, strict=True)
    ]
    log.records_seconds += time.perf_counter() - records_start
    return results


def _may_blow_up(final: _Final, v0: float, settings: RelaxSettings) -> bool:
    """False when none of :func:`materials.potentials.relax.blow_up_reason`'s tests can fire (same formulas; the
    distance test decided on the device): then the exact function, whose all-pairs distances cost ~5 ms per structure,
    is
    skipped. True defers to it, so the failure reasons stay those of the ASE path."""
    n = len(final.atoms)
    if final.close_pair or not math.isfinite(final.energy) or final.energy / n < settings.min_energy_per_atom:
        return True
    volume = final.atoms.get_volume()
    return max(volume / v0, v0 / volume) > settings.max_volume_factor


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
    reason = blow_up_reason(final.atoms, final.energy, v0, settings) if _may_blow_up(final, v0, settings) else None
    if reason is not None:
        result.failure_reason = reason
        return result
    atoms = final.atoms
    result.structure = Structure(Lattice(atoms.cell.array), atoms.numbers, atoms.positions, coords_are_cartesian=True)
    result.status = "ok"
    return result
