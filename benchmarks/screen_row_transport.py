"""The driver's cost per screen row: unpickling a chunk of rows (what ``ray.get`` does with a worker's result)
plus ``ResultStore.write``, for the rows the workers send (:class:`pipelines.store.ScreenRow`: the relaxed
structure as JSON text made on the worker) against the former design (a dict per row holding the structure as a
nested dict, JSON-encoded by the driver when it stores it).

Rows of 4-atom cells, chunks of 100 as a screen sends them; each variant the best of 3 passes over 20,000 rows.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/screen_row_transport.py \
        --save benchmarks/results/screen_row_transport.json
"""

from __future__ import annotations

import argparse
import copy
import json
import pickle
import platform
import tempfile
import time
from pathlib import Path

from pymatgen.core import Lattice, Structure

from pipelines.store import ResultStore, ScreenRow

CELL = Structure(Lattice.cubic(3.6), ["Cu"] * 4, [(0, 0, 0), (0.5, 0.5, 0), (0.5, 0, 0.5), (0, 0.5, 0.5)])


def numbers(i: int) -> dict:
    return dict(
        id=f"c{i:06d}", formula="Cu", status="ok", prototype="user", source="x.json", potential="emt", n_atoms=4,
        energy_per_atom=-0.01, volume_per_atom=11.6, initial_volume_per_atom=11.7, max_force=0.01, relax_steps=3,
        converged=False, seconds=0.01, stress=[0.0] * 6,
    )  # fmt: skip


def typed_chunk(start: int, size: int, cif: str) -> bytes:
    """What a worker sends now: ScreenRows with the structure's JSON text."""
    rows = [
        ScreenRow(**numbers(i), structure_json=json.dumps(CELL.as_dict()), cif=cif + str(i))
        for i in range(start, start + size)
    ]
    return pickle.dumps(rows)


def dict_chunk(start: int, size: int, cif: str) -> bytes:
    """The former design: a dict per row, the structure as a nested dict (each row its own)."""
    rows = [
        {**numbers(i), "structure": copy.deepcopy(CELL.as_dict()), "cif": cif + str(i)}
        for i in range(start, start + size)
    ]
    return pickle.dumps(rows)


def store_dicts(store: ResultStore, rows: list[dict]) -> None:
    """The former driver work: encode each structure dict as JSON, then store."""
    store.write(
        [
            ScreenRow(**{k: v for k, v in r.items() if k != "structure"}, structure_json=json.dumps(r["structure"]))
            for r in rows
        ]
    )


def measure(chunks: list[bytes], store_rows, folder: Path, passes: int = 3) -> dict:
    n = sum(len(pickle.loads(c)) for c in chunks)
    best_unpickle = best_store = float("inf")
    for k in range(passes):
        unpickle = store = 0.0
        with ResultStore(folder / f"{store_rows.__name__}{k}.sqlite") as db:
            for c in chunks:
                t0 = time.perf_counter()
                rows = pickle.loads(c)
                t1 = time.perf_counter()
                store_rows(db, rows)
                store += time.perf_counter() - t1
                unpickle += t1 - t0
        best_unpickle, best_store = min(best_unpickle, unpickle), min(best_store, store)
    return {
        "rows": n,
        "unpickle_rows_per_s": round(n / best_unpickle),
        "store_rows_per_s": round(n / best_store),
        "driver_rows_per_s": round(n / (best_unpickle + best_store)),
        "chunk_bytes": len(chunks[0]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--chunk", type=int, default=100)
    parser.add_argument("--save", type=Path, default=None)
    args = parser.parse_args()
    cif = CELL.to(fmt="cif")
    folder = Path(tempfile.mkdtemp(prefix="row_transport_"))
    starts = range(0, args.n, args.chunk)
    typed = measure([typed_chunk(s, args.chunk, cif) for s in starts], ResultStore.write, folder)
    former = measure([dict_chunk(s, args.chunk, cif) for s in starts], store_dicts, folder)
    record = {
        "command": "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/screen_row_transport.py "
        f"--n {args.n} --chunk {args.chunk}",
        "machine": platform.platform(),
        "screen_row": typed,
        "former_dict_rows": former,
        "driver_speedup": round(typed["driver_rows_per_s"] / former["driver_rows_per_s"], 2),
    }
    for name in ("screen_row", "former_dict_rows"):
        r = record[name]
        print(f"{name:18s} unpickle {r['unpickle_rows_per_s']:>8d}/s  store {r['store_rows_per_s']:>7d}/s  "
              f"driver {r['driver_rows_per_s']:>7d} rows/s  chunk {r['chunk_bytes']} bytes")  # fmt: skip
    print(f"driver speed-up: {record['driver_speedup']}x")
    if args.save:
        args.save.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
