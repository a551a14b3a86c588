"""Put the shipped MP formation-energy table on the MP2020 scale and measure the result against experiment.

The table (``../shared/data/mp_formation_energies.csv``: MP's correction scheme of ~2018-2019) is converted row
by row with :func:`materials.thermo.stability.mp2020_from_legacy` (the two schemes' compound corrections from pymatgen's
``MaterialsProjectCompatibility`` and ``MaterialsProject2020Compatibility``, plus the legacy fitted gas references
of N, F, Cl, H). Writes ``materials/data/mp_formation_energies_mp2020.csv.gz`` and, with ``--save``, the
comparison of the legacy, the anion-only ("naive") and the converted values with pymatgen's experimental
formation enthalpies (``exp_compounds.json.gz``) per anion class.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/convert_reference_table.py \
        --save benchmarks/results/reference_table_conversion.json
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import math
import time
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from importlib import resources
from pathlib import Path

import numpy as np
from pymatgen.core import Composition

from materials.thermo.stability import (
    REFERENCE_TABLE_FILE,
    StabilityError,
    _mp_run_settings,
    legacy_mp_correction,
    mp2020_correction,
    mp2020_from_legacy,
)

ROOT = Path(__file__).resolve().parents[1]


def _shifts(formulas: list[str]) -> list[tuple[float, float] | str]:
    """(full shift, anion-only shift) in eV/atom per formula, or the reason it could not be converted."""
    out: list[tuple[float, float] | str] = []
    for formula in formulas:
        comp = Composition(formula)
        try:
            full = mp2020_from_legacy(comp, 0.0)
            naive = (mp2020_correction(comp) - legacy_mp_correction(comp)) / comp.num_atoms
        except (StabilityError, ValueError) as exc:
            out.append(str(exc))
            continue
        out.append((full, naive))
    return out


def anion_class(comp: Composition) -> str:
    """The most electronegative element, with ``+U`` for oxides/fluorides of MP's U metals."""
    hubbard_u, _ = _mp_run_settings()
    anion = max(comp.elements, key=lambda el: el.X).symbol
    if anion in ("O", "F") and {el.symbol for el in comp.elements} & hubbard_u.keys():
        return f"{anion}+U"
    return anion


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default=str(ROOT.parent / "shared" / "data" / "mp_formation_energies.csv"))
    parser.add_argument("--out", default=str(ROOT / "materials" / "data" / REFERENCE_TABLE_FILE))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--save", help="write the comparison with experiment to this JSON file")
    args = parser.parse_args()

    start = time.perf_counter()
    rows = list(csv.DictReader(open(args.source)))
    formulas = sorted({Composition(r["formula"]).reduced_formula for r in rows})
    chunks = [formulas[i :: args.workers * 8] for i in range(args.workers * 8)]
    shifts: dict[str, tuple[float, float] | str] = {}
    with ProcessPoolExecutor(args.workers) as pool:
        for chunk, result in zip(chunks, pool.map(_shifts, chunks), strict=True):
            shifts.update(zip(chunk, result, strict=True))
    failed = {f: why for f, why in shifts.items() if isinstance(why, str)}
    n_written = 0
    with gzip.open(args.out, "wt", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["material_id", "formula", "formation_energy_per_atom", "formation_energy_per_atom_legacy"])
        for r in rows:
            legacy = float(r["formation_energy_per_atom"])
            formula = Composition(r["formula"]).reduced_formula
            shift = shifts[formula]
            if not math.isfinite(legacy) or isinstance(shift, str):
                continue
            writer.writerow([r["material_id"], r["formula"], f"{legacy + shift[0]:.6f}", f"{legacy:.6f}"])
            n_written += 1
    print(
        f"{n_written} of {len(rows)} rows converted in {time.perf_counter() - start:.0f} s; "
        f"{len(failed)} formulas not convertible (dropped): {dict(list(failed.items())[:5])}"
    )

    lowest: dict[str, float] = {}
    for r in rows:
        value = float(r["formation_energy_per_atom"])
        formula = Composition(r["formula"]).reduced_formula
        if math.isfinite(value) and value < lowest.get(formula, math.inf):
            lowest[formula] = value
    from pymatgen.analysis import compatibility

    with resources.files(compatibility).joinpath("exp_compounds.json.gz").open("rb") as raw:
        experiments = json.loads(gzip.decompress(raw.read()))
    errors: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for exp in experiments:
        comp = Composition(exp["formula"])
        formula = comp.reduced_formula
        if len(comp) < 2 or formula not in lowest or isinstance(shifts.get(formula, "x"), str):
            continue
        target = exp["exp energy"] / comp.num_atoms  # eV per formula unit as written -> eV/atom
        full, naive = shifts[formula]
        for key, value in (
            ("legacy", lowest[formula]),
            ("naive", lowest[formula] + naive),
            ("mp2020", lowest[formula] + full),
        ):
            errors[anion_class(comp)][key].append(value - target)
            errors["all"][key].append(value - target)
    summary = {
        cls: {key: {"n": len(v), "mae": float(np.mean(np.abs(v))), "mean": float(np.mean(v))} for key, v in by.items()}
        for cls, by in errors.items()
    }
    print(f"{'class':6s} {'n':>5s}  MAE/mean error vs experiment, eV/atom: legacy | anion-only shift | MP2020")
    for cls in sorted(summary, key=lambda c: -summary[c]["legacy"]["n"]):
        s = summary[cls]
        cells = "  ".join(f"{s[k]['mae']:.3f}/{s[k]['mean']:+.3f}" for k in ("legacy", "naive", "mp2020"))
        print(f"{cls:6s} {s['legacy']['n']:5d}  {cells}")
    if args.save:
        Path(args.save).write_text(
            json.dumps(
                {"rows_written": n_written, "rows_in": len(rows), "not_convertible": failed, "vs_experiment": summary},
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
