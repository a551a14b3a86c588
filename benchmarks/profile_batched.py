"""Where the batched (torch-sim) relaxation step spends its time: torch.profiler over ``--steps`` FIRE steps of
``--cells`` cells, after a warm-up relaxation. Prints (and writes to ``--out``) small text tables, not traces:

* our regions (``record_function`` labels put around materials.potentials.batched's pieces by this script): the FIRE
step
  outside the model, the model call, MACE's neighbour list, CHGNet's CPU graph building and its forward/backward,
  the in-flight batcher's swaps, the convergence check;
* the top operators by self CPU time, and on CUDA by self device time;
* wall time per step, model calls, host-device syncs seen as ``cudaStreamSynchronize``/``aten::item``/
  ``aten::_local_scalar_dense`` counts.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/profile_batched.py --potential mace --device cpu --cells 32 --steps 5
    python3 benchmarks/profile_batched.py --potential mace-medium --dtype float32 --device cuda --cells 2048 --steps 5
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import functools  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile, record_function  # noqa: E402

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]

import relax_throughput  # noqa: E402

REGIONS = {
    "_frechet_fire_step": "fire_step (incl. model)",
    "neighbors": "neighbour list",
    "_retire": "batcher.retire (swap out)",
    "_converged": "convergence check",
    "_start_fresh": "start_fresh",
}
METHODS = {
    ("MACEModel", "forward"): "model call",
    ("CHGNetModel", "forward"): "model call",
    ("CHGNetModel", "_device_graph"): "chgnet.graphs (device)",
    ("CHGNetModel", "_cpu_graph"): "chgnet.graphs (CPU converter)",
    ("CHGNetModel", "_energy_forces_stress"): "chgnet.featurise+forward+backward",
}
MODEL_LABEL = "mace.forward+backward"


def _labelled(label: str, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with record_function(label):
            return fn(*args, **kwargs)

    return wrapper


def instrument() -> None:
    """Put a ``record_function`` label around materials.potentials.batched's pieces (module globals, so calls inside the
    module see the wrapped versions)."""
    import materials.potentials.batched as batched

    for name, label in REGIONS.items():
        setattr(batched, name, _labelled(label, getattr(batched, name)))
    for (cls, name), label in METHODS.items():
        klass = getattr(batched, cls)
        setattr(klass, name, _labelled(label, getattr(klass, name)))


def run(args) -> str:
    from materials.potentials.batched import BatchLog, relax_structures_batched
    from materials.potentials.relax import RelaxSettings

    device = args.device
    _, _, model = relax_throughput.load_models(args.potential, device, args.dtype)
    instrument()
    if args.potential.startswith("mace"):  # the MACE module itself (its forward computes forces and stress too)
        model.model.forward = _labelled(MODEL_LABEL, model.model.forward)
    cells = relax_throughput.make_cells(args.potential, args.cells)
    settings = RelaxSettings(fmax=0.0, max_steps=args.steps, batch_max_atoms=args.batch_max_atoms)
    relax_structures_batched(cells[: max(1, len(cells) // 8)], model, RelaxSettings(fmax=0.0, max_steps=2))
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    log = BatchLog()
    relax_throughput._sync(device)
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        relax_structures_batched(cells, model, settings, log=log)
        relax_throughput._sync(device)
    seconds = time.perf_counter() - start
    averages = prof.key_averages()
    lines = [
        f"# profile_batched: {args.potential} ({args.dtype}) on {device}, {len(cells)} cells, "
        f"{sum(len(c) for c in cells)} atoms, {args.steps} FIRE steps, {log.n_calls} model calls "
        f"(max {log.max_atoms} atoms/call)",
        f"# wall {seconds:.3f} s under the profiler ({seconds / max(1, log.n_calls) * 1e3:.1f} ms per model call; "
        "the profiler itself adds overhead)",
        f"# torch {torch.__version__}"
        + (f", {torch.cuda.get_device_name(0)}" if device.startswith("cuda") else ", CPU (1 thread)"),
        "",
    ]
    labels = set(REGIONS.values()) | set(METHODS.values()) | {MODEL_LABEL}
    has_device = device.startswith("cuda")
    lines.append(f"{'region':34s} {'calls':>6s} {'CPU total ms':>13s}" + (f" {'device ms':>10s}" if has_device else ""))
    for event in sorted((e for e in averages if e.key in labels), key=lambda e: -e.cpu_time_total):
        row = f"{event.key:34s} {event.count:6d} {event.cpu_time_total / 1e3:13.1f}"
        if has_device:
            row += f" {getattr(event, 'device_time_total', getattr(event, 'cuda_time_total', 0.0)) / 1e3:10.1f}"
        lines.append(row)
    syncs = {
        key: sum(e.count for e in averages if e.key == key)
        for key in (
            "aten::item",
            "aten::_local_scalar_dense",
            "aten::nonzero",
            "cudaStreamSynchronize",
            "cudaDeviceSynchronize",
            "cudaMemcpyAsync",
        )
    }
    lines += ["", "host-device syncs and scalar reads: " + ", ".join(f"{k} x{v}" for k, v in syncs.items()), ""]
    lines.append(averages.table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=60))
    if has_device:
        try:
            table = averages.table(sort_by="self_device_time_total", row_limit=args.rows, max_name_column_width=60)
        except (AttributeError, KeyError):  # older torch
            table = averages.table(sort_by="self_cuda_time_total", row_limit=args.rows, max_name_column_width=60)
        lines.append(table)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--potential", choices=("chgnet", "mace", "mace-medium"), default="mace")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float64", help="MACE only")
    parser.add_argument("--cells", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch-max-atoms", type=int, default=100_000)
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--out", default=None, help="also write the tables to this file")
    args = parser.parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    with contextlib.redirect_stdout(sys.stderr):
        text = run(args)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
