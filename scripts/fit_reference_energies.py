"""Fit per-element reference energies for a potential and ship them in materials/data.

Relaxes the calibration compounds (materials.stability.CALIBRATION_COMPOUNDS) with the potential, fits mu
around the MP2020 + MP-2023-elemental prior, prints the fit and leave-one-out errors (eV/atom) next to the
uncalibrated mp2020 scheme, and writes ``materials/data/reference_energies_<weights hash>.json``.

    OMP_NUM_THREADS=1 python scripts/fit_reference_energies.py --potential chgnet
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from pymatgen.core import Composition

from materials.potentials import PotentialSpec, load_potential, supported_elements, weights_hash
from materials.stability import (
    ReferenceTable,
    calibration_points,
    fit_reference_energies,
    formation_energy_per_atom,
    mp2020_references,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--potential", default="chgnet", choices=["chgnet", "mace"])
    parser.add_argument("--model", default=None, help="model name or file (see PotentialSpec.model)")
    parser.add_argument("--ridge", type=float, default=1e-3)
    parser.add_argument("--out-dir", default=str(Path(__file__).resolve().parents[1] / "materials" / "data"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    spec = PotentialSpec(name=args.potential, model=args.model)
    calc = load_potential(spec)
    table = ReferenceTable.load()
    start = time.perf_counter()
    points, skipped = calibration_points(calc, table, supported=supported_elements(spec, calc))
    print(f"relaxed {len(points)} calibration compounds in {time.perf_counter() - start:.0f} s; skipped: {skipped}")
    prior = mp2020_references(spec.label())
    raw = [
        formation_energy_per_atom(p.formula, p.energy_per_atom * Composition(p.formula).num_atoms, prior)
        - p.target_e_form
        for p in points
    ]
    refs = fit_reference_energies(points, prior, ridge=args.ridge, potential=spec.label())
    refs.calibration["skipped"] = skipped
    refs.calibration["mp2020_mae"] = float(np.mean(np.abs(raw)))
    refs.calibration["weights_hash"] = weights_hash(spec)
    print(f"mp2020 scheme (no fit): MAE {np.mean(np.abs(raw)):.3f} eV/atom vs the table")
    print(f"fitted scheme: RMSE {refs.calibration['rmse']:.3f}, leave-one-out RMSE {refs.calibration['loo_rmse']:.3f}")
    out = Path(args.out_dir) / f"reference_energies_{weights_hash(spec)}.json"
    out.write_text(json.dumps(refs.as_dict(), indent=1, sort_keys=True))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
