"""A screen streams: inputs are read as chunks are dispatched, the stability step goes in batches, resume skips
what is stored. Real Ray, real EMT, real SQLite; small sizes."""

from __future__ import annotations

import csv
import itertools
import json
import math
import random
import sqlite3
from pathlib import Path

import pytest
from pymatgen.core import Composition, Lattice, Structure

from materials.structures.inputs import load_structure_dir
from materials.thermo.stability import (
    ElementalEnergies,
    HullTable,
    StreamingStability,
    assess_stability,
    mp_references,
)
from pipelines.config import parse_config
from pipelines.execution import WorkItem
from pipelines.screen import _file_entries, _structure_files, compute_stability, run_screen
from pipelines.store import ResultStore, ScreenRow

METALS = ("Al", "Cu", "Ag", "Au", "Ni", "Pd", "Pt")


def write_cells(folder: Path, n: int, seed: int = 0) -> None:
    """``n`` small EMT cells (B2 and fcc-based 4-atom cells of two metals) as pymatgen JSON files."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        a, b = rng.sample(METALS, 2)
        if i % 2:
            s = Structure(Lattice.cubic(rng.uniform(2.9, 3.2)), [a, b], [(0, 0, 0), (0.5, 0.5, 0.5)])
        else:
            frac = [(0, 0, 0), (0.5, 0.5, 0), (0.5, 0, 0.5), (0, 0.5, 0.5)]
            s = Structure(Lattice.cubic(rng.uniform(3.7, 4.1)), [a, b, b, b], frac)
        (folder / f"c{i:04d}.json").write_text(json.dumps(s.as_dict()))


def same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


def test_streaming_stability_matches_assess_stability_exactly():
    """Batches in any order give the very numbers (bitwise) and warnings of the all-at-once assessment, with
    many structures below the reference hull, repeated compositions and an element without a reference."""
    table = HullTable.load()
    rng = random.Random(3)
    elements = {"Ga", "As", "Zn", "O", "S", "Cu", "In", "Se"}
    rows = [r for r in table.rows if 2 <= len(r.elements) <= 3 and r.elements <= elements]
    for convention in ("mp2020", "uncorrected"):
        refs = mp_references(convention, "test")
        energies = {}
        for i in range(600):
            row = rng.choice(rows)
            comp = Composition(row.formula) * rng.choice((1, 2))
            e_form = row.e_form_per_atom + rng.gauss(0.02, 0.15)
            energies[f"i{i:04d}"] = (
                comp,
                e_form * comp.num_atoms + sum(a * refs.mu[el.symbol] for el, a in comp.items()),
            )
        energies["no-ref"] = (Composition("CuOg"), -3.0)
        expected = assess_stability(energies, refs, table, elements - {"Se"})
        assert sum(r.e_above_hull < 0 for r in expected.values()) > 50  # the screen's hull differs from MP's
        stream = StreamingStability(refs, HullTable(table.rows), elements - {"Se"})
        items = list(energies.items())
        rng.shuffle(items)
        got = {}
        for start in range(0, len(items), 97):
            got.update(stream.assess(dict(items[start : start + 97])))
        assert stream.needs_second_pass
        screen = {}
        for start in range(0, len(items), 131):
            batch = items[start : start + 131]
            screen.update(stream.screen_distances((i, c, got[i].e_form_per_atom) for i, (c, _) in batch))
        for item_id, row in expected.items():
            new = got[item_id]
            assert same(row.e_form_per_atom, new.e_form_per_atom), item_id
            assert same(row.e_above_hull, new.e_above_hull), item_id
            assert same(row.e_above_hull_screen, screen.get(item_id, new.e_above_hull_screen)), item_id
            assert row.warning == new.warning, item_id


def test_compute_stability_on_a_store_in_batches(tmp_path):
    """The store-level step (batches of 7 records) writes what assess_stability computes for all at once."""
    refs = ElementalEnergies(convention="self", potential="emt", mu={"Cu": -0.0, "Au": 0.0, "Ag": 0.0, "Ni": -0.1})
    rng = random.Random(5)
    records, energies = [], {}
    for i in range(60):
        comp = Composition({rng.choice(("Cu", "Ni")): rng.randint(1, 3), rng.choice(("Au", "Ag")): rng.randint(1, 3)})
        e = rng.gauss(-0.05, 0.1)
        records.append(ScreenRow(f"r{i:03d}", comp.reduced_formula, "ok", energy_per_atom=e))
        red = Composition(comp.reduced_formula)
        energies[f"r{i:03d}"] = (red, e * red.num_atoms)
    records.append(ScreenRow("failed", "CuAu", "failed", "rejected: test"))
    table = HullTable.load()
    expected = assess_stability(energies, refs, table, None)
    with ResultStore(tmp_path / "results.sqlite") as store:
        store.write(records)
        compute_stability(store, refs, table, None, batch_size=7)
        stored = {r["id"]: r for r in store.records()}
    assert stored["failed"]["e_above_hull"] is None
    for item_id, row in expected.items():
        rec = stored[item_id]
        assert rec["e_form_per_atom"] == row.e_form_per_atom
        assert rec["e_above_hull"] == row.e_above_hull
        assert rec["e_above_hull_screen"] == row.e_above_hull_screen
        assert (rec["warning"] or "") == row.warning


def test_folder_is_read_lazily_with_the_ids_load_structure_dir_gives(tmp_path):
    write_cells(tmp_path, 4)
    # a repeated stem (c0001.json and c0001.cif) and an unreadable file
    Structure.from_file(tmp_path / "c0001.json").to(filename=str(tmp_path / "c0001.cif"))
    (tmp_path / "broken.cif").write_text("not a cif")
    files = _structure_files(tmp_path)
    streamed = list(_file_entries(files, None))
    ids = [e.id for e in streamed]
    assert ids == [entry.id for entry in load_structure_dir(tmp_path)]
    failed = [e for e in streamed if isinstance(e, ScreenRow)]
    assert [e.id for e in failed] == ["broken"] and failed[0].failure_reason.startswith("rejected:")
    assert failed[0].status == "failed" and failed[0].source.endswith("broken.cif")
    # with a limit the unreadable file is still recorded, as a full read of the folder did
    limited = list(_file_entries(files, 2))
    assert sum(isinstance(e, ScreenRow) for e in limited) == 1 and sum(isinstance(e, WorkItem) for e in limited) == 2


@pytest.mark.slow
def test_dispatch_pulls_chunks_as_workers_free_up():
    """Chunks come from a generator; at no time are more items alive (made, not yet finished) than the in-flight
    bound allows, whatever the number of items."""
    from materials.potentials.calculators import PotentialSpec
    from materials.potentials.relax import RelaxSettings
    from materials.structures.inputs import CheckSettings
    from pipelines.config import RaySettings
    from pipelines.execution import WorkItem, chunked, init_ray, make_workers, run_chunks

    settings = RaySettings(
        num_cpus=2, num_workers=2, chunk_size=3, max_in_flight_per_worker=2, object_store_memory=None
    )
    started = init_ray(settings)
    try:
        workers = make_workers(
            PotentialSpec(name="emt"), RelaxSettings(max_steps=2, relax_cell=False), CheckSettings(), settings
        )
        counts = {"made": 0, "finished": 0, "alive_max": 0}
        cell = Structure(Lattice.cubic(3.0), ["Cu", "Au"], [(0, 0, 0), (0.5, 0.5, 0.5)]).as_dict()

        def items():
            for i in range(90):
                counts["made"] += 1
                counts["alive_max"] = max(counts["alive_max"], counts["made"] - counts["finished"])
                yield WorkItem(f"x{i:03d}", "CuAu", "b2", "test", cell)

        ids = []

        def on_result(records):
            counts["finished"] += len(records)
            ids.extend(r.id for r in records)

        finished = sum(run_chunks(workers, chunked(items(), 3), 2, on_result))
    finally:
        if started:
            import ray

            ray.shutdown()
    assert finished == 90 and sorted(ids) == [f"x{i:03d}" for i in range(90)]
    # 2 workers x 2 chunks in flight, plus the chunk being cut when one finishes: 5 chunks of 3
    assert counts["alive_max"] <= (2 * 2 + 1) * 3


@pytest.mark.slow
def test_screen_of_a_folder_resumes_what_was_lost(tmp_path, mlflow_uri):
    """A real EMT screen of 40 files in chunks of 7; rows lost (as a kill loses the chunks in flight) are
    relaxed again on resume, and only those; results.csv keeps its columns, the failed file its reason."""
    inputs = tmp_path / "inputs"
    write_cells(inputs, 40)
    (inputs / "broken.cif").write_text("not a cif")
    config = parse_config(
        {
            "name": "scale-resume",
            "potential": {"name": "emt"},
            "relax": {"fmax": 0.05, "max_steps": 3, "relax_cell": False},
            "ray": {"num_cpus": 2, "num_workers": 2, "chunk_size": 7, "max_in_flight_per_worker": 2},
            "tracking": {"uri": mlflow_uri(tmp_path / "mlflow.db"), "experiment": "scale"},
        }
    )
    out = tmp_path / "out"
    first = run_screen(config, structures=str(inputs), out_dir=out, progress=False)
    assert (first.n_items, first.n_ok, first.n_new_this_run) == (41, 40, 40)
    assert first.timings["dispatch_seconds"] > 0 and sum(n for _, n in first.timings["chunks"]) == 40
    header = next(csv.reader((out / "results.csv").open()))
    lost = [f"c{i:04d}" for i in itertools.chain(range(3, 10), range(30, 33))]
    with sqlite3.connect(out / "results.sqlite") as db:
        db.executemany('DELETE FROM results WHERE "id" = ?', [(i,) for i in lost])
    before = {r["id"]: r["energy_per_atom"] for r in ResultStore(out / "results.sqlite").records()}
    second = run_screen(config, structures=str(inputs), out_dir=out, resume=True, progress=False)
    assert second.n_new_this_run == len(lost) and second.n_items == 41
    rows = {r["id"]: r for r in csv.DictReader((out / "results.csv").open())}
    assert next(csv.reader((out / "results.csv").open())) == header and len(rows) == 41
    assert rows["broken"]["status"] == "failed" and rows["broken"]["failure_reason"].startswith("rejected:")
    for item_id, energy in before.items():  # what was stored is kept, not relaxed again
        if energy is not None:
            assert float(rows[item_id]["energy_per_atom"]) == pytest.approx(energy, abs=1e-12)
    assert all(rows[i]["status"] == "ok" and rows[i]["e_above_hull"] != "" for i in lost)
    assert (out / "structures" / "c0005.cif").is_file()
