"""The universal potentials side by side, each in its own environment: CHGNet (main venv), SevenNet-0 and
SevenNet-l3i5 (``.venv-sevennet``), MACE where weights are on disk.

Per potential, on the same structures and settings (ASE FIRE + cell filter, fmax 0.02 eV/Å, 400 steps, 1 thread):
  E_form MAE     the 50 known ground states of the stability benchmark (``materials.thermo.stability.GROUND_STATES``),
                 each potential under its energy convention (CHGNet mp2020; SevenNet/MACE uncorrected: MP2020 added),
                 against the lowest E_form of the formula in the shipped MP2020-scale table
  stable         how many of those ground states the potential places within 0.05 / 0.1 eV/atom of the reference
                 hull (all are on it: this is recall; the shipped data holds no structures of unstable polymorphs)
  lattice a      12 cubic textbook semiconductors against experiment (room temperature, Å)
  s/relax        seconds per relaxation (the ground states), model loaded beforehand

Each potential runs in a subprocess of its environment's python (``--worker``), so models that cannot share a venv
are compared in one command. A potential whose environment or weights are missing is listed with the reason.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/potential_comparison.py \
        [--potentials chgnet,sevennet:7net-0,sevennet:7net-l3i5,mace:medium-mpa-0] \
        [--save benchmarks/results/potential_comparison.json]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

#: Experimental lattice constants (Å, room temperature) of cubic semiconductors: (formula, prototype, a).
TEXTBOOK_LATTICE = (
    ("C", "diamond", 3.567),
    ("Si", "diamond", 5.431),
    ("Ge", "diamond", 5.658),
    ("SiC", "zincblende", 4.360),
    ("AlP", "zincblende", 5.464),
    ("AlAs", "zincblende", 5.661),
    ("GaP", "zincblende", 5.451),
    ("GaAs", "zincblende", 5.653),
    ("InP", "zincblende", 5.869),
    ("InAs", "zincblende", 6.058),
    ("ZnS", "zincblende", 5.409),
    ("CdTe", "zincblende", 6.481),
)
DEFAULT_POTENTIALS = "chgnet,sevennet:7net-0,sevennet:7net-l3i5,mace:medium-mpa-0"


def _spec(token: str):
    from materials.potentials.calculators import PotentialSpec

    name, _, model = token.partition(":")
    return PotentialSpec(name=name, model=model or None)  # type: ignore[arg-type]


def worker(token: str) -> dict:
    """Relax the ground states and the textbook cells with one potential in this process; raw energies only."""
    import torch
    from ase.build import bulk
    from pymatgen.io.ase import AseAtomsAdaptor

    from materials.potentials.calculators import load_potential, weights_hash
    from materials.potentials.relax import RelaxSettings, relax_structure
    from materials.thermo.stability import GROUND_STATES, build_ground_state

    torch.set_num_threads(1)
    spec = _spec(token)
    start = time.perf_counter()
    calc = load_potential(spec)
    load_seconds = time.perf_counter() - start
    settings = RelaxSettings(fmax=0.02, max_steps=400)
    ground, seconds, steps = [], 0.0, 0
    for prototype, species, anion in GROUND_STATES:
        structure = build_ground_state(prototype, species)
        result = relax_structure(structure, calc, settings, item_id=structure.composition.reduced_formula)
        seconds += result.seconds
        steps += result.steps
        ground.append(
            {
                "formula": structure.composition.reduced_formula,
                "anion": anion,
                "status": result.status,
                "reason": result.failure_reason,
                "energy_per_atom": result.energy_per_atom,
                "n_atoms": len(structure),
            }
        )
    lattice = []
    for formula, prototype, a_expt in TEXTBOOK_LATTICE:
        atoms = bulk(formula, prototype, a=a_expt * 1.02, cubic=True)
        result = relax_structure(AseAtomsAdaptor.get_structure(atoms), calc, settings, item_id=formula)
        a = (result.volume_per_atom * len(atoms)) ** (1 / 3) if result.status == "ok" else None
        lattice.append({"formula": formula, "a_expt": a_expt, "a": a})
    return {
        "potential": spec.label(),
        "convention": spec.convention(),
        "weights_hash": weights_hash(spec),
        "load_seconds": load_seconds,
        "relax_seconds": seconds,
        "relax_steps": steps,
        "ground_states": ground,
        "lattice": lattice,
        "python": sys.executable,
    }


def run_in_environment(token: str) -> dict:
    """Run :func:`worker` in the environment the potential needs; a failure becomes ``{"error": reason}``."""
    from pipelines.environments import environment_python

    spec = _spec(token)
    env_name = spec.environment()
    python = environment_python(env_name) if env_name else Path(sys.executable)
    if not python.is_file():
        return {"potential": spec.label(), "error": f"environment {env_name!r} not built: make setup-{env_name}"}
    env = os.environ | {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([str(python), __file__, "--worker", token], capture_output=True, text=True, env=env, cwd=REPO)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"potential": spec.label(), "error": tail[:300]}
    return json.loads(lines[-1])


def score(raw: dict) -> dict:
    """E_form, signed E_hull and lattice errors from a worker's raw energies (in the main environment)."""
    import numpy as np
    from pymatgen.core import Composition

    from materials.thermo.stability import (
        HullItem,
        HullTable,
        formation_energy_per_atom,
        hull_distances,
        mp_references,
    )

    table = HullTable.load()
    refs = mp_references(raw["convention"], raw["potential"])
    rows = []
    for row in raw["ground_states"]:
        if row["status"] != "ok":
            continue
        comp = Composition(row["formula"])
        e_form = formation_energy_per_atom(comp, row["energy_per_atom"] * comp.num_atoms, refs)
        rows.append(row | {"e_form": e_form, "reference": table.lowest_formation_energy(row["formula"])})
    hull = hull_distances([HullItem(r["formula"], Composition(r["formula"]), r["e_form"]) for r in rows], table)
    errors = np.array([r["e_form"] - r["reference"] for r in rows])
    ehull = np.array([hull[r["formula"]].e_above_hull for r in rows])
    lattice = [r for r in raw["lattice"] if r["a"] is not None]
    lattice_err = np.array([r["a"] - r["a_expt"] for r in lattice])
    n_relax = len(raw["ground_states"])
    return {
        "potential": raw["potential"],
        "convention": raw["convention"],
        "weights_hash": raw["weights_hash"],
        "n_ground_states": len(rows),
        "n_failed": n_relax - len(rows),
        "e_form_mae": float(np.mean(np.abs(errors))),
        "e_form_max_abs": float(np.max(np.abs(errors))),
        "stable_within_0.05": int(np.sum(ehull <= 0.05)),
        "stable_within_0.1": int(np.sum(ehull <= 0.1)),
        "lattice_mae": float(np.mean(np.abs(lattice_err))),
        "lattice_mean_rel_error_pct": float(np.mean(lattice_err / np.array([r["a_expt"] for r in lattice])) * 100),
        "lattice": lattice,
        "seconds_per_relaxation": raw["relax_seconds"] / n_relax,
        "steps_per_relaxation": raw["relax_steps"] / n_relax,
        "load_seconds": raw["load_seconds"],
        "rows": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--potentials", default=DEFAULT_POTENTIALS, help="comma list of name[:model]")
    parser.add_argument("--save", help="write the table and per-compound rows to this JSON file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker)))
        return

    results, skipped = [], []
    for token in args.potentials.split(","):
        print(f"{token}: relaxing {50} ground states and {len(TEXTBOOK_LATTICE)} textbook cells ...", flush=True)
        raw = run_in_environment(token)
        if "error" in raw:
            print(f"  skipped: {raw['error']}")
            skipped.append(raw)
            continue
        results.append(score(raw))
    goal_line = "E_form MAE vs MP2020-scale ground states; stable = |E_hull| recall; a vs experiment"
    print(f"\n{goal_line}")
    header = f"{'potential':22s} {'E_form MAE':>10s} {'max':>6s} {'<=0.05':>7s} {'<=0.1':>6s} {'a MAE Å':>8s}"
    print(header + f" {'a err %':>8s} {'s/relax':>8s} {'steps':>6s}")
    for r in results:
        n = r["n_ground_states"]
        print(
            f"{r['potential']:22s} {r['e_form_mae']:10.3f} {r['e_form_max_abs']:6.3f} "
            f"{r['stable_within_0.05']:>3d}/{n:<3d} {r['stable_within_0.1']:>3d}/{n:<2d} {r['lattice_mae']:8.3f} "
            f"{r['lattice_mean_rel_error_pct']:+8.2f} {r['seconds_per_relaxation']:8.2f} "
            f"{r['steps_per_relaxation']:6.0f}"
        )
    for s in skipped:
        print(f"{s['potential']:22s} not run: {s['error']}")
    if args.save:
        payload = {
            "command": "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/potential_comparison.py "
            + " ".join(sys.argv[1:]),
            "date": time.strftime("%Y-%m-%d"),
            "results": results,
            "skipped": skipped,
        }
        Path(args.save).write_text(json.dumps(payload, indent=1))


if __name__ == "__main__":
    main()
