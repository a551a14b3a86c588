"""Post-hoc stackers on top of the shipped band-gap ensemble, in repeated cross-validation on Zhuo validation.

The question (docs/design.md, "Band gaps", the wide-gap end): can a map fitted after training, on the Zhuo 2018
validation compositions that are non-metals (experimental gap > 0; the split the calibration is fitted on, Borlido
removed, none trained on), beat the plain experimental regression ``gap_expt_nonmetal`` (the members' mean
``mu``)? Each method is fitted on 4/5 of those compositions and scored on the left-out fifth (repeated 5-fold,
fixed seeds); the MAE of a repeat pools the out-of-fold predictions of all compositions.

Methods:

* ``plain``: ``gap_expt_nonmetal`` as shipped (nothing fitted; the same in every repeat).
* ``linear_plain``: ordinary least squares ``a * plain + b``.
* ``linear_plain_lad``: the same line by least absolute deviation (median regression, the loss the MAE scores).
* ``linear_members_chemistry``: ordinary least squares on each member's ``mu`` and the chemistry features the
  metal calibration reads (:func:`materials.ml.bandgap.chemistry_features`: charge balance, electronegativity
  range and maximum, metal and transition-metal fractions).
* ``ridge_members_chemistry``: the same inputs, standardised, ridge with its penalty chosen by inner
  cross-validation on the training folds.
* ``isotonic``: isotonic (monotone) regression of the experimental gap on ``plain``.

Every prediction is clipped at 0 eV. Usage::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bandgap_stackers.py [--repeats 10] [--save PATH]

About a minute on one core (building the data sets reads the 120k-row MP table).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from materials.ml.bandgap import (  # noqa: E402
    CHEMISTRY_COLUMNS,
    METAL_THRESHOLD,
    GapEnsemble,
    chemistry_features,
    shipped_model_path,
)
from pipelines.tracking import git_commit  # noqa: E402
from pipelines.train_gap import BandGapConfig, build_datasets  # noqa: E402

#: A method: (training inputs, training targets, test inputs) -> test predictions (eV).
Method = Callable[[dict[str, np.ndarray], np.ndarray, dict[str, np.ndarray]], np.ndarray]


def _plain(train: dict[str, np.ndarray], y: np.ndarray, test: dict[str, np.ndarray]) -> np.ndarray:
    return test["plain"]


def _linear_plain(train: dict[str, np.ndarray], y: np.ndarray, test: dict[str, np.ndarray]) -> np.ndarray:
    slope, intercept = np.polyfit(train["plain"], y, 1)
    return slope * test["plain"] + intercept


def _linear_plain_lad(train: dict[str, np.ndarray], y: np.ndarray, test: dict[str, np.ndarray]) -> np.ndarray:
    from sklearn.linear_model import QuantileRegressor

    model = QuantileRegressor(quantile=0.5, alpha=0.0, solver="highs").fit(train["plain"][:, None], y)
    return model.predict(test["plain"][:, None])


def _stacked(inputs: dict[str, np.ndarray]) -> np.ndarray:
    return np.column_stack([inputs["members"], inputs["chemistry"]])


def _linear_members_chemistry(train: dict[str, np.ndarray], y: np.ndarray, test: dict[str, np.ndarray]) -> np.ndarray:
    from sklearn.linear_model import LinearRegression

    return LinearRegression().fit(_stacked(train), y).predict(_stacked(test))


def _ridge_members_chemistry(train: dict[str, np.ndarray], y: np.ndarray, test: dict[str, np.ndarray]) -> np.ndarray:
    from sklearn.linear_model import RidgeCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-3, 3, 13)))
    return model.fit(_stacked(train), y).predict(_stacked(test))


def _isotonic(train: dict[str, np.ndarray], y: np.ndarray, test: dict[str, np.ndarray]) -> np.ndarray:
    from sklearn.isotonic import IsotonicRegression

    return IsotonicRegression(out_of_bounds="clip").fit(train["plain"], y).predict(test["plain"])


METHODS: dict[str, Method] = {
    "plain": _plain,
    "linear_plain": _linear_plain,
    "linear_plain_lad": _linear_plain_lad,
    "linear_members_chemistry": _linear_members_chemistry,
    "ridge_members_chemistry": _ridge_members_chemistry,
    "isotonic": _isotonic,
}


def validation_nonmetals(ensemble: GapEnsemble) -> tuple[list[str], np.ndarray, dict[str, np.ndarray]]:
    """Formulas, experimental gaps (eV) and inputs (``plain``, ``members`` (n, members), ``chemistry``) of the
    Zhuo validation compositions with an experimental gap > 0, from the split the ensemble was trained with."""
    config = BandGapConfig.model_validate(
        ensemble.info["config"] | {"calibration": ensemble.info.get("calibration", {})}
    )
    val = build_datasets(config)["expt_val"]
    val = val.subset(np.flatnonzero(val.gap > METAL_THRESHOLD))
    members = np.column_stack([o["mu"] for o in ensemble.outputs("expt", val)])
    inputs = {"plain": members.mean(axis=1), "members": members, "chemistry": chemistry_features(val.formulas)}
    return list(val.formulas), np.asarray(val.gap, dtype=float), inputs


def cross_validate(
    y: np.ndarray, inputs: dict[str, np.ndarray], repeats: int = 10, folds: int = 5, seed: int = 0
) -> dict[str, dict[str, float]]:
    """Per method: the MAE (eV) of each repeat's pooled out-of-fold predictions, their mean, standard deviation,
    minimum and maximum over repeats, and in how many repeats the method's MAE is below the plain one's."""
    from sklearn.model_selection import RepeatedKFold

    splitter = RepeatedKFold(n_splits=folds, n_repeats=repeats, random_state=seed)
    predictions = {name: np.zeros((repeats, len(y))) for name in METHODS}
    for k, (train, test) in enumerate(splitter.split(y)):
        repeat = k // folds
        fit_inputs = {key: value[train] for key, value in inputs.items()}
        held_inputs = {key: value[test] for key, value in inputs.items()}
        for name, method in METHODS.items():
            predictions[name][repeat, test] = np.maximum(0.0, method(fit_inputs, y[train], held_inputs))
    mae = {name: np.mean(np.abs(p - y[None, :]), axis=1) for name, p in predictions.items()}
    return {
        name: {
            "mae_mean": float(np.mean(m)),
            "mae_std_over_repeats": float(np.std(m)),
            "mae_min": float(np.min(m)),
            "mae_max": float(np.max(m)),
            "repeats_below_plain": float(np.sum(m < mae["plain"] - 1e-12)),
        }
        for name, m in mae.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=str(shipped_model_path()))
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save", default=None, help="write the results as JSON to this path")
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    ensemble = GapEnsemble.load(args.model)
    formulas, y, inputs = validation_nonmetals(ensemble)
    results = cross_validate(y, inputs, args.repeats, args.folds, args.seed)
    seconds = time.perf_counter() - start
    best = min((r["mae_mean"], name) for name, r in results.items() if name != "plain")
    out = {
        "command": "OMP_NUM_THREADS=1 .venv/bin/python " + " ".join(sys.argv),
        "commit": git_commit(),
        "model": args.model,
        "n": len(formulas),
        "n_members": int(inputs["members"].shape[1]),
        "chemistry_columns": list(CHEMISTRY_COLUMNS),
        "folds": args.folds,
        "repeats": args.repeats,
        "seed": args.seed,
        "methods": results,
        "plain_wins": bool(results["plain"]["mae_mean"] < best[0]),
        "best_stacker": best[1],
        "seconds": seconds,
        "notes": (
            "Zhuo 2018 validation compositions (hash split of the reduced formula, Borlido removed) with an "
            "experimental gap > 0; MAE in eV of the pooled out-of-fold predictions of one repeat (sklearn "
            "RepeatedKFold, random_state=seed), mean/std/min/max over repeats; predictions clipped at 0"
        ),
    }
    if args.save:
        Path(args.save).parent.mkdir(parents=True, exist_ok=True)
        Path(args.save).write_text(json.dumps(out, indent=1) + "\n")
    print(f"{len(formulas)} Zhuo validation non-metals, {args.repeats} x {args.folds}-fold CV (MAE, eV):")
    for name, r in results.items():
        print(
            f"  {name:26s} {r['mae_mean']:.3f} ± {r['mae_std_over_repeats']:.3f} "
            f"(range {r['mae_min']:.3f}-{r['mae_max']:.3f}; below plain in {r['repeats_below_plain']:.0f} repeats)"
        )
    print(f"plain wins: {out['plain_wins']} (best stacker {best[1]} {best[0]:.3f}); {seconds:.0f} s")


if __name__ == "__main__":
    main()
