"""The stability step at scale: formation energies -> hull distances for many candidates over many systems.

Candidates are drawn from the shipped table itself (seeded): ``--systems`` chemical systems of 2-4 elements, each
with ``--per-system`` compositions of rows of that system, their formation energy set to the table's lowest value
of the formula plus N(0.05, 0.1) eV/atom (so about a third lie below the known hull and reshape the screen's
hull). Measured: :func:`materials.thermo.stability.hull_distances` (reference diagram once per system, a second diagram
only where a candidate lies below the reference hull) against the previous method (every table row scanned per
system, one diagram of table + all candidates per system), on a sample of systems, with the largest difference
between the two methods' distances to the screen's hull (identical up to rounding).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/hull_scale.py [--systems 1000] [--per-system 10] [--check 100]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def make_candidates(table, n_systems: int, per_system: int, seed: int = 0):
    from pymatgen.core import Composition

    from materials.thermo.stability import HullItem

    rng = random.Random(seed)
    by_system: dict[frozenset[str], list[str]] = {}
    for row in table.rows:
        if 2 <= len(row.elements) <= 4:
            by_system.setdefault(row.elements, []).append(row.formula)
    systems = sorted(by_system, key=lambda s: sorted(s))
    chosen = rng.sample(systems, n_systems)
    items = []
    for k, system in enumerate(chosen):
        formulas = sorted(set(by_system[system]))
        for j in range(per_system):
            formula = rng.choice(formulas)
            value = table.lowest_formation_energy(formula) + rng.gauss(0.05, 0.1)
            items.append(HullItem(f"s{k}-{j}", Composition(formula), value))
    return items


def previous_method(items, table) -> dict[str, float]:
    """The method before the index: scan every table row per system, one diagram with all candidates in it."""
    from pymatgen.analysis.phase_diagram import PDEntry, PhaseDiagram
    from pymatgen.core import Composition, Element

    out = {}
    groups: dict[frozenset[str], list] = {}
    for it in items:
        groups.setdefault(frozenset(el.symbol for el in it.composition.elements), []).append(it)
    for system, members in groups.items():
        entries = [PDEntry(Composition({Element(el): 1}), 0.0) for el in sorted(system)]
        for row in table.rows:
            if row.elements <= system and len(row.elements) > 1:
                comp = Composition(row.formula)
                entries.append(PDEntry(comp, row.e_form_per_atom * comp.num_atoms))
        own = {}
        for it in items:
            if frozenset(el.symbol for el in it.composition.elements) <= system:
                own[it.id] = PDEntry(it.composition, it.e_form_per_atom * it.composition.num_atoms)
        diagram = PhaseDiagram(entries + list(own.values()))
        for it in members:
            out[it.id] = float(diagram.get_e_above_hull(own[it.id], allow_negative=True))
    return out


def measure(n_systems: int = 1000, per_system: int = 10, check_systems: int = 100, seed: int = 0) -> dict:
    from materials.thermo.stability import HullTable, hull_distances

    start = time.perf_counter()
    table = HullTable.load()
    load_seconds = time.perf_counter() - start
    items = make_candidates(table, n_systems, per_system, seed)
    start = time.perf_counter()
    distances = hull_distances(items, HullTable(table.rows))  # a fresh table: no diagram cached yet
    seconds = time.perf_counter() - start
    sample = items[: check_systems * per_system]
    start = time.perf_counter()
    old = previous_method(sample, table)
    old_seconds = time.perf_counter() - start
    fast_sample = hull_distances(sample, HullTable(table.rows))
    diff = max(abs(fast_sample[i].e_above_hull_screen - v) for i, v in old.items())
    below = sum(1 for d in distances.values() if d.e_above_hull < 0)
    return {
        "candidates": len(items),
        "systems": n_systems,
        "table_load_seconds": round(load_seconds, 2),
        "seconds": round(seconds, 2),
        "candidates_per_s": round(len(items) / seconds, 1),
        "below_known_hull": below,
        "check_candidates": len(sample),
        "previous_method_candidates_per_s": round(len(sample) / old_seconds, 1),
        "max_abs_difference_screen_hull": diff,
        "all_finite": all(math.isfinite(d.e_above_hull) for d in distances.values()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--systems", type=int, default=1000)
    parser.add_argument("--per-system", type=int, default=10)
    parser.add_argument("--check", type=int, default=100, help="systems also run with the previous method")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    out = measure(args.systems, args.per_system, args.check)
    print(
        f"{out['candidates']} candidates over {out['systems']} systems: {out['candidates_per_s']:.0f} candidates/s "
        f"(goal >= 500; table load {out['table_load_seconds']} s, once per process), {out['below_known_hull']} below "
        f"the known hull; previous method {out['previous_method_candidates_per_s']:.1f} candidates/s on "
        f"{out['check_candidates']}; largest difference {out['max_abs_difference_screen_hull']:.1e} eV/atom"
    )
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
