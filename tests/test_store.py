from __future__ import annotations

import csv
import json
import math
import sqlite3

import pytest

from materials.thermo.stability import StabilityRow
from pipelines.store import RESULT_COLUMNS, STABILITY_COLUMNS, ResultStore, ScreenRow


def test_results_survive_reopen_and_export(tmp_path):
    path = tmp_path / "results.sqlite"
    with ResultStore(path) as store:
        store.write(
            [
                ScreenRow("a", "GaAs", "ok", energy_per_atom=-4.06, converged=True, stress=[0.1] * 6),
                ScreenRow("b", "GaN", "failed", "rejected: because", energy_per_atom=math.nan),
            ]
        )
        store.set_meta("fingerprint", "abc")
    with ResultStore(path) as store:  # a new process would see the same
        assert store.done_ids() == {"a", "b"}
        assert store.get_meta("fingerprint") == "abc"
        store.update_stability({"a": StabilityRow(-0.35, -0.2, 0.0, "below the known hull")}, "mp2020")
        recs = {r["id"]: r for r in store.records(with_structures=True)}
        assert recs["a"]["converged"] is True and recs["a"]["structure"] is None
        assert recs["a"]["e_form_per_atom"] == -0.35 and recs["a"]["e_above_hull"] == -0.2
        assert recs["a"]["e_above_hull_screen"] == 0.0 and recs["a"]["warning"] == "below the known hull"
        assert recs["a"]["energy_convention"] == "mp2020"
        assert recs["b"]["energy_per_atom"] is None  # NaN stored as empty
        out = store.export_csv(tmp_path / "results.csv")
    rows = list(csv.DictReader(out.open()))
    assert tuple(rows[0]) == RESULT_COLUMNS
    assert rows[1]["failure_reason"] == "rejected: because" and rows[1]["energy_per_atom"] == ""


def test_a_store_from_before_the_new_columns_still_resumes(tmp_path):
    """A results.sqlite written before e_above_hull_screen/warning/energy_convention existed gains the columns."""
    path = tmp_path / "results.sqlite"
    old = [c for c in RESULT_COLUMNS if c not in ("e_above_hull_screen", "warning", "energy_convention")]
    db = sqlite3.connect(path)
    columns = ", ".join(f'"{c}"' for c in [*old[1:], "stress", "structure"])
    db.execute(f'CREATE TABLE results ("id" TEXT PRIMARY KEY, {columns})')
    db.execute(
        'INSERT INTO results ("id", "formula", "status", "energy_per_atom") VALUES (?, ?, ?, ?)',
        ("old", "GaAs", "ok", -4.0),
    )
    db.commit()
    db.close()
    with ResultStore(path) as store:
        store.write([ScreenRow("new", "GaP", "ok", energy_per_atom=-4.2)])
        store.update_stability({"new": StabilityRow(-0.1, 0.0, 0.0, "w")}, "mp2020")
        recs = {r["id"]: r for r in store.records()}
    assert recs["old"]["energy_per_atom"] == -4.0 and recs["old"]["warning"] is None
    assert recs["new"]["energy_per_atom"] == -4.2 and recs["new"]["warning"] == "w"


def test_queries_that_let_a_large_screen_stream(tmp_path):
    """Lookups of some ids, counts, column cursors that stay valid while writing, the screen-hull update and a
    CSV with extra columns: what a 100,000-candidate screen uses instead of holding every record."""
    with ResultStore(tmp_path / "results.sqlite") as store:
        store.write(
            ScreenRow(f"i{i:04d}", "GaAs" if i % 2 else "GaP", "ok", energy_per_atom=-4.0 - i) for i in range(2000)
        )
        store.write([ScreenRow("bad", None, "failed", "rejected: x")])
        assert store.stored_ids(["i0001", "nope", "bad", *(f"i{i:04d}" for i in range(1000, 1990))]) == {
            "i0001",
            "bad",
            *(f"i{i:04d}" for i in range(1000, 1990)),
        }
        assert store.count() == 2001 and store.count("status = ?", ("ok",)) == 2000
        assert store.distinct_formulas() == ["GaAs", "GaP"]
        # a cursor over the records while the same store is written through its own connection
        seen = 0
        for item_id, energy in store.columns(("id", "energy_per_atom"), "status = 'ok'"):
            store.update_screen_hull({item_id: -energy})
            seen += 1
        assert seen == 2000
        top = list(store.records(where="status = 'ok'", order_by='e_above_hull_screen, "id"', limit=2))
        assert [r["id"] for r in top] == ["i0000", "i0001"] and top[0]["e_above_hull_screen"] == 4.0
        assert "structure" not in top[0]
        out = store.export_csv(tmp_path / "results.csv", ["extra"], lambda rec: {"extra": rec["id"].upper()})
    rows = list(csv.DictReader(out.open()))
    assert tuple(rows[0]) == (*RESULT_COLUMNS, "extra") and rows[0]["extra"] == "BAD" and len(rows) == 2001


def test_screen_campaign_and_dft_stores_share_one_base(tmp_path):
    """The three run stores are one SQLiteStore each: WAL journal (a commit survives a killed process), a meta
    table of JSON values, reopened with what was committed."""
    from pipelines.campaign import CampaignStore
    from pipelines.dft_run import DFTStore
    from pipelines.store import SQLiteStore

    for cls in (ResultStore, CampaignStore, DFTStore):
        path = tmp_path / f"{cls.__name__}.sqlite"
        with cls(path) as store:
            assert isinstance(store, SQLiteStore)
            store.set_meta("fingerprint", {"a": [1, 2.5, None]})
        assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        with cls(path) as again:
            assert again.get_meta("fingerprint") == {"a": [1, 2.5, None]}
            assert again.get_meta("missing", "default") == "default"
    dft = DFTStore(tmp_path / "DFTStore.sqlite")
    dft.write({"id": "si", "energy": -5.4})
    dft.close()
    assert DFTStore(tmp_path / "DFTStore.sqlite").records() == [{"id": "si", "energy": -5.4}]


def test_screen_rows_are_typed_and_fill_every_column_but_stability(tmp_path):
    """A worker's ScreenRow carries every results column except the stability step's; the store takes only
    ScreenRows (a dict is refused, naming the fix) and a row goes through JSON unchanged (what Ray ships)."""
    from dataclasses import fields

    named = {f.name for f in fields(ScreenRow)}
    assert set(RESULT_COLUMNS) - named == set(STABILITY_COLUMNS)
    assert named - set(RESULT_COLUMNS) == {"stress", "structure_json", "cif"}
    row = ScreenRow("c", "GaAs", "ok", n_atoms=2, energy_per_atom=-4.1, stress=[0.0] * 6, structure_json='{"x": 1}')
    assert ScreenRow.from_dict(json.loads(json.dumps(row.as_dict()))) == row
    with ResultStore(tmp_path / "results.sqlite") as store:
        with pytest.raises(TypeError, match=r"takes ScreenRow records, got dict; build one with ScreenRow"):
            store.write([{"id": "d", "formula": "Si", "status": "ok"}])
        assert store.count() == 0
        store.write([row])
        (stored,) = store.records(with_structures=True)
    assert stored["n_atoms"] == 2 and stored["stress"] == [0.0] * 6 and stored["structure"] == {"x": 1}
