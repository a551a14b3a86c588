from __future__ import annotations

import csv
import math

from pipelines.store import RESULT_COLUMNS, ResultStore


def test_results_survive_reopen_and_export(tmp_path):
    path = tmp_path / "results.sqlite"
    with ResultStore(path) as store:
        store.write(
            [
                {
                    "id": "a",
                    "formula": "GaAs",
                    "status": "ok",
                    "energy_per_atom": -4.06,
                    "converged": True,
                    "stress": [0.1] * 6,
                    "structure": {"x": 1},
                },
                {
                    "id": "b",
                    "formula": "GaN",
                    "status": "failed",
                    "failure_reason": "rejected: because",
                    "energy_per_atom": math.nan,
                },
            ]
        )
        store.set_meta("fingerprint", "abc")
    with ResultStore(path) as store:  # a new process would see the same
        assert store.done_ids() == {"a", "b"}
        assert store.get_meta("fingerprint") == "abc"
        store.update_stability({"a": (-0.35, 0.0)})
        recs = {r["id"]: r for r in store.records(with_structures=True)}
        assert recs["a"]["converged"] is True and recs["a"]["structure"] == {"x": 1}
        assert recs["a"]["e_form_per_atom"] == -0.35
        assert recs["b"]["energy_per_atom"] is None  # NaN stored as empty
        out = store.export_csv(tmp_path / "results.csv")
    rows = list(csv.DictReader(out.open()))
    assert tuple(rows[0]) == RESULT_COLUMNS
    assert rows[1]["failure_reason"] == "rejected: because" and rows[1]["energy_per_atom"] == ""
