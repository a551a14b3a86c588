"""Ray execution: actors that hold a loaded potential and relax chunks of structures, with bounded in-flight
work. Local ``ray.init`` by default; ``ray.address`` (or RAY_ADDRESS, as set by ``ray job submit``) for a
cluster."""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import ray

from materials.potentials.calculators import PotentialSpec, load_potential, supported_elements, training_elements
from materials.potentials.relax import RelaxSettings, relax_structure
from materials.structures.inputs import CheckSettings, StructureCheckError, check_structure
from materials.thermo.stability import (
    ElementalEnergies,
    HullTable,
    calibrate_element_offsets,
    model_elemental_references,
)
from pipelines.config import RaySettings
from pipelines.environments import actor_runtime_env
from pipelines.interrupts import install_sigterm_handler, sigterm_handler_installed
from pipelines.store import ScreenRow


@dataclass
class WorkItem:
    """One structure to relax: ``structure`` is a pymatgen Structure dict (cheap to ship)."""

    id: str
    formula: str
    prototype: str
    source: str
    structure: dict[str, Any]


#: Ray's switch for "local-only" nodes (on by default only on macOS/Windows): with it off, a node's IP is the
#: loopback address and every Ray server binds there (see :func:`_loopback_only`).
RAY_CLUSTER_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


@contextmanager
def _loopback_only() -> Iterator[None]:
    """While a local Ray starts, make its node IP 127.0.0.1 so that every Ray process listens on loopback only.

    ``ray.init(_node_ip_address="127.0.0.1")`` alone does not do it: Ray 2.60 swaps a loopback address for the
    machine's routable one (``ray/_private/worker.py``: ``_node_ip_address =
    services.resolve_ip_for_localhost(_node_ip_address)``), and its servers bind to loopback only when the node
    IP is loopback (GCS, raylet, core-worker gRPC), otherwise to all interfaces (``::``/``0.0.0.0``: dashboard
    agent gRPC and metrics exporter, autoscaler and dashboard metrics) or to the node IP (runtime-env agent).
    ``resolve_ip_for_localhost`` keeps loopback when ``ray_constants.ENABLE_RAY_CLUSTER`` is false, i.e. with
    ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (Ray's local-only mode, its default on macOS and Windows). The
    constant is read when ray is imported, so it is switched here for the start only (the variable is inherited
    by the processes Ray spawns) and restored afterwards: a later ``ray.init(address=...)`` in this process
    behaves as usual.
    """
    from ray._private import ray_constants

    previous_env = os.environ.get(RAY_CLUSTER_SWITCH)
    previous_flag = ray_constants.ENABLE_RAY_CLUSTER
    os.environ[RAY_CLUSTER_SWITCH] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = previous_flag
        if previous_env is None:
            os.environ.pop(RAY_CLUSTER_SWITCH, None)
        else:
            os.environ[RAY_CLUSTER_SWITCH] = previous_env


def init_ray(settings: RaySettings) -> bool:
    """Start or join Ray. Returns True if this call started it (the caller then shuts it down).

    A local Ray (no ``ray.address``, no RAY_ADDRESS) listens on 127.0.0.1 only: GCS, raylet (node and object
    manager), workers' gRPC servers, dashboard agent (gRPC, HTTP, metrics exporter), runtime-env agent and the
    autoscaler/dashboard metrics servers (tests/test_security.py lists them). The dashboard UI is off."""
    if ray.is_initialized():
        return False
    graceful_sigterm = sigterm_handler_installed()  # ray.init replaces it with sys.exit
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = settings.address or os.environ.get("RAY_ADDRESS")
    env = {"env_vars": {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}}
    if address:
        # inside `ray job submit`, Ray refuses a driver env var that the job's runtime env also sets: the job wins
        job_config = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
        job_vars = (job_config.get("runtime_env") or {}).get("env_vars") or {}
        env = {"env_vars": {k: v for k, v in env["env_vars"].items() if k not in job_vars}}
        ray.init(address=address, runtime_env=env if env["env_vars"] else None, log_to_driver=False)
    else:
        with _loopback_only():
            ray.init(
                num_cpus=settings.num_cpus,
                include_dashboard=False,
                object_store_memory=settings.object_store_memory,
                _node_ip_address="127.0.0.1",
                runtime_env=env,
                log_to_driver=False,
            )
    if graceful_sigterm:
        install_sigterm_handler()
    return True


class RelaxWorker:
    """Holds one loaded potential (loaded once) and relaxes chunks of work items."""

    def __init__(self, spec: PotentialSpec, relax: RelaxSettings, checks: CheckSettings):
        import torch

        torch.set_num_threads(1)
        self.spec = spec
        self.relax = relax
        self.checks = checks
        self.calculator = load_potential(spec)
        self.supported = supported_elements(spec, self.calculator)
        self.label = spec.label()
        self.batched_model = None
        if relax.batched:  # one torch-sim model sharing the calculator's weights; a chunk is relaxed as one batch
            from materials.potentials.batched import batched_model

            self.batched_model = batched_model(spec, self.calculator)

    def relax_chunk(self, items: Sequence[WorkItem]) -> list[ScreenRow]:
        """Check then relax each item; every item yields a row (status ok, or failed with a reason)."""
        from pymatgen.core import Structure

        out: list[ScreenRow | None] = []
        to_relax: list[tuple[int, WorkItem, Structure]] = []
        for item in items:
            try:
                structure = Structure.from_dict(item.structure)
                check_structure(structure, self.checks, self.supported, name=item.id)
            except (StructureCheckError, ValueError, KeyError) as exc:
                n_atoms = len(item.structure.get("sites", []))
                out.append(ScreenRow.failed(item, f"rejected: {exc}", self.label, n_atoms))
                continue
            to_relax.append((len(out), item, structure))
            out.append(None)
        if self.batched_model is not None and to_relax:
            from materials.potentials.batched import relax_structures_batched

            try:
                results = relax_structures_batched(
                    [s for _, _, s in to_relax], self.batched_model, self.relax, ids=[it.id for _, it, _ in to_relax]
                )
            except Exception as exc:  # an unexpected error fails this chunk's items, with its reason
                results = [exc] * len(to_relax)
        else:
            results = []
            for _, item, structure in to_relax:
                try:
                    results.append(relax_structure(structure, self.calculator, self.relax, item_id=item.id))
                except Exception as exc:  # an unexpected error fails this item only, with its reason
                    results.append(exc)
        for (slot, item, _), result in zip(to_relax, results, strict=True):
            if isinstance(result, Exception):
                out[slot] = ScreenRow.failed(item, f"error: {type(result).__name__}: {result}", self.label)
            else:
                out[slot] = ScreenRow.relaxed(item, self.label, result)
        return out

    def elemental_references(self, symbols: Sequence[str]) -> dict[str, Any]:
        """``self``-convention references: the elemental crystals of ``symbols`` relaxed with this worker's
        potential (see materials.thermo.stability.model_elemental_references)."""
        return model_elemental_references(self.calculator, symbols, self.label).as_dict()

    def element_offsets(self, refs: dict[str, Any]) -> dict[str, Any]:
        """Per-element offsets fitted for this worker's potential on the known ground states, on top of ``refs``
        (see materials.thermo.stability.calibrate_element_offsets; ~50 relaxations)."""
        base = ElementalEnergies.from_dict(refs)
        return calibrate_element_offsets(self.calculator, base, HullTable.load(), self.supported).as_dict()

    def training_elements(self) -> frozenset[str]:
        """The elements this worker's potential was trained on (coverage warnings)."""
        return training_elements(self.spec, self.calculator)


def make_workers(spec: PotentialSpec, relax: RelaxSettings, checks: CheckSettings, settings: RaySettings) -> list:
    """``settings.num_workers`` :class:`RelaxWorker` actors for ``spec``, each in the environment the potential
    needs (SevenNet's venv for ``sevennet``: see :mod:`pipelines.environments`)."""
    options: dict[str, Any] = {
        "num_cpus": settings.cpus_per_worker,
        "num_gpus": settings.gpus_per_worker,
        "max_restarts": settings.max_retries,
        "max_task_retries": settings.max_retries,
    }
    runtime_env = actor_runtime_env(spec, settings.environments)
    if runtime_env is not None:
        options["runtime_env"] = runtime_env
    remote_cls = ray.remote(**options)(RelaxWorker)
    return [remote_cls.remote(spec, relax, checks) for _ in range(settings.num_workers)]


def as_completed(refs: dict[Any, Any]) -> Iterator[tuple[Any, Any, str | None]]:
    """For a ``{ObjectRef: key}`` of running Ray tasks, yield ``(key, result, None)`` as each finishes, or
    ``(key, None, reason)`` when the task itself failed (worker crash, exception), so a batch keeps going and
    records why."""
    pending = list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        try:
            result, reason = ray.get(ready[0]), None
        except ray.exceptions.RayError as exc:
            result, reason = None, f"task error: {str(exc).splitlines()[0][:300]}"
        yield refs[ready[0]], result, reason


def chunked(items: Iterable[WorkItem], size: int) -> Iterator[list[WorkItem]]:
    """Consecutive chunks of ``size`` items (the last may be shorter), taken from ``items`` as they are asked for."""
    it = iter(items)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


def run_chunks(
    workers: list,
    chunks: Iterable[Sequence[WorkItem]],
    max_in_flight_per_worker: int,
    on_result: Callable[[list[ScreenRow]], None],
) -> Iterator[int]:
    """Dispatch chunks round-robin with at most ``max_in_flight_per_worker`` per actor; call ``on_result``
    with each chunk's records as it finishes (yields the number of items finished, for progress bars).

    ``chunks`` is consumed lazily (a generator is fine): a chunk is taken only when a worker has room for it, so
    at most ``len(workers) * max_in_flight_per_worker`` chunks exist at any time, whatever the screen's size.
    A chunk whose worker died beyond its retries becomes failed records naming the error: the batch goes on.
    """
    source = iter(chunks)
    exhausted = False
    in_flight: dict[Any, tuple[int, Sequence[WorkItem]]] = {}
    load = {i: 0 for i in range(len(workers))}
    owner: dict[Any, int] = {}
    limit = max_in_flight_per_worker
    index = 0
    while True:
        while not exhausted:
            free = [i for i in load if load[i] < limit]
            if not free:
                break
            chunk = next(source, None)
            if chunk is None:
                exhausted = True
                break
            worker = min(free, key=lambda i: load[i])
            ref = workers[worker].relax_chunk.remote(chunk)
            in_flight[ref] = (index, chunk)
            index += 1
            owner[ref] = worker
            load[worker] += 1
        if not in_flight:
            return
        done, _ = ray.wait(list(in_flight), num_returns=1)
        ref = done[0]
        _, chunk = in_flight.pop(ref)
        load[owner.pop(ref)] -= 1
        try:
            records = ray.get(ref)
        except ray.exceptions.RayError as exc:
            what = "worker died (retries exhausted)" if isinstance(exc, ray.exceptions.RayActorError) else "task error"
            reason = f"{what}: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
            records = [ScreenRow.failed(it, reason) for it in chunk]
        del ref
        on_result(records)
        yield len(chunk)
