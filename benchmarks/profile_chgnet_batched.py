"""Where CHGNet's batched relaxation spends its time: cProfile of ``relax_throughput.measure`` (512 cells, 5 FIRE
steps, plus the warm-up calls), printed for the batched model's forward, its energy/forces/stress part and
CHGNet's graph batching, then the top functions by own time. Run on a GPU machine the way ``gpu_check.sh`` runs
(result on an H200: ``benchmarks/results/chgnet_batched_profile_h200.txt``, measured before issue 18, when the batched
model built CHGNet's graphs on the CPU and used ``BatchedGraph.from_graphs``; since then ``profile_batched.py``
gives torch.profiler summaries of every batched model, and gpu_check.sh saves them).

    OMP_NUM_THREADS=1 python benchmarks/profile_chgnet_batched.py [cuda|cpu]
"""

from __future__ import annotations

import cProfile
import io
import pstats
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]

import relax_throughput  # noqa: E402


def main() -> None:
    device = sys.argv[1] if len(sys.argv) > 1 else "cuda"
    profile = cProfile.Profile()
    profile.enable()
    result = relax_throughput.measure(
        "chgnet", device, n_cells=512, n_ase_cells=1, fixed_steps=5, batch_max_atoms=4096, dtype="float32"
    )
    profile.disable()
    print("batched s", result["batched"]["seconds"], "calls", result["batched"]["model_calls"])
    out = io.StringIO()
    stats = pstats.Stats(profile, stream=out).sort_stats("cumulative")
    stats.print_stats("graph_converter|_energy_forces_stress|batched.py.*forward|from_graphs|BatchedGraph")
    pstats.Stats(profile, stream=out).sort_stats("tottime").print_stats(15)
    print(out.getvalue())


if __name__ == "__main__":
    main()
