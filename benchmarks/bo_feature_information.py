"""How much the formula features of a labelled pool say about its labels, with all labels known.

Five-fold cross-validated random-forest classifiers on the Emery 2017 ABO3 perovskites for "stable" (E_hull <=
0.05 eV/atom), "in window" (1.0 <= PBE gap <= 2.0 eV) and "hit" (both), per feature set: ROC AUC and average
precision (AP; the hit base rate is 0.015). An upper bound on what a surrogate can learn from each feature set,
not a BO result: it explains why the oxidation-state features help the campaign (README, BO section).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bo_feature_information.py      # ~1 min on 2 cores
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

from pathlib import Path  # noqa: E402

from sklearn.ensemble import RandomForestClassifier  # noqa: E402
from sklearn.metrics import average_precision_score, roc_auc_score  # noqa: E402
from sklearn.model_selection import StratifiedKFold, cross_val_predict  # noqa: E402

from pipelines.bo_benchmark import load_labelled_pool  # noqa: E402

POOL = Path(__file__).resolve().parents[1] / "materials" / "data" / "emery2017_abo3_perovskites.csv.gz"


def main() -> None:
    sets = {
        "sites": load_labelled_pool(POOL, "formula", ["gap pbe", "e_hull"], "sites"),
        "sites + oxidation": load_labelled_pool(POOL, "formula", ["gap pbe", "e_hull"], "sites", oxidation=True),
    }
    labels = sets["sites"].labels
    stable = labels["e_hull"] <= 0.05
    window = (labels["gap pbe"] >= 1.0) & (labels["gap pbe"] <= 2.0)
    targets = {"stable": stable, "in window": window, "hit": stable & window}
    print(f"{'features':20s} {'d':>4s}  " + "  ".join(f"{name + ' AUC / AP':>20s}" for name in targets))
    for name, pool in sets.items():
        cells = []
        for y in targets.values():
            forest = RandomForestClassifier(n_estimators=300, min_samples_leaf=2, random_state=0, n_jobs=2)
            folds = StratifiedKFold(n_splits=5, shuffle=True, random_state=0)
            p = cross_val_predict(forest, pool.features, y, cv=folds, method="predict_proba")[:, 1]
            cells.append(f"{roc_auc_score(y, p):10.3f} / {average_precision_score(y, p):.3f}")
        print(f"{name:20s} {pool.features.shape[1]:4d}  " + "  ".join(f"{c:>20s}" for c in cells))


if __name__ == "__main__":
    main()
