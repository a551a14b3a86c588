"""Supply-chain descriptors against numbers computed by hand from the tables they come from."""

from __future__ import annotations

import pytest

from materials.datasets.sustainability import (
    SUSTAINABILITY_COLUMNS,
    UNKNOWN,
    SustainabilityDescriptors,
    critical_raw_materials,
    gap_supply_figure,
    supply_risk_summary,
    sustainability_descriptors,
)
from materials.errors import InputError

# pymatgen's hhi_data.csv (production, reserve) and atomic masses, copied here so the test is computed by hand
HHI = {"Cd": (1700, 1300), "Te": (2900, 4900), "Ga": (5500, 1900), "As": (3300, 4000), "Cu": (1600, 1500),
       "Zn": (1600, 1900), "Sn": (2600, 1600), "S": (700, 1000)}  # fmt: skip
MASS = {"Cd": 112.411, "Te": 127.6, "Ga": 69.723, "As": 74.9216, "Cu": 63.546, "Zn": 65.409, "Sn": 118.71,
        "S": 32.065}  # fmt: skip


def by_hand(counts: dict[str, int], index: int) -> float:
    total = sum(MASS[e] * n for e, n in counts.items())
    return sum(MASS[e] * n / total * HHI[e][index] for e, n in counts.items())


@pytest.mark.parametrize(
    "formula, counts",
    [("CdTe", {"Cd": 1, "Te": 1}), ("GaAs", {"Ga": 1, "As": 1}), ("Cu2ZnSnS4", {"Cu": 2, "Zn": 1, "Sn": 1, "S": 4})],
)
def test_hhi_is_the_mass_weighted_mean_of_the_elements(formula, counts):
    d = sustainability_descriptors(formula)
    assert d.hhi_production == pytest.approx(by_hand(counts, 0), abs=0.5)
    assert d.hhi_reserve == pytest.approx(by_hand(counts, 1), abs=0.5)


def test_values_for_the_three_absorbers():
    cdte, gaas, czts = (sustainability_descriptors(f) for f in ("CdTe", "GaAs", "Cu2ZnSnS4"))
    assert cdte.hhi_production == pytest.approx(2338.0, abs=1) and gaas.hhi_production == pytest.approx(4360.5, abs=1)
    # scarcest elements (CRC crustal abundance, ppm): Te 0.001, As 1.8, Sn 2.3 (S is 350, not SMACT's 3.5)
    assert (cdte.scarcest_element, cdte.scarcest_abundance_ppm) == ("Te", 0.001)
    assert (gaas.scarcest_element, gaas.scarcest_abundance_ppm) == ("As", 1.8)
    assert (czts.scarcest_element, czts.scarcest_abundance_ppm) == ("Sn", 2.3)
    assert sustainability_descriptors("ZnS").scarcest_element == "Zn"
    assert cdte.toxic_elements == ("Cd",) and gaas.toxic_elements == ("As",) and czts.toxic_elements == ()
    assert gaas.critical_raw_materials == ("As", "Ga") and czts.critical_raw_materials == ("Cu",)
    assert cdte.critical_raw_materials == ()
    # prices (2013, USD/kg): earth-abundant CZTS is an order of magnitude cheaper than CdTe and GaAs
    assert czts.cost_per_kg < 20 < 150 < cdte.cost_per_kg < gaas.cost_per_kg


def test_missing_data_is_named_never_zero():
    d = sustainability_descriptors("NpO2")
    assert d.hhi_production is None and d.cost_per_kg is None and d.scarcest_element is None
    assert d.missing == {"hhi": ("Np",), "cost_per_kg": ("Np",), "abundance": ("Np",)}
    row = d.as_row()
    assert tuple(row) == SUSTAINABILITY_COLUMNS
    assert row["hhi_production"] == row["cost_per_kg"] == row["scarcest_element"] == UNKNOWN


def test_round_trip_and_bad_formula():
    d = sustainability_descriptors("CsPbI3")
    assert SustainabilityDescriptors.from_dict(d.as_dict()) == d
    with pytest.raises(InputError, match="Xx2"):
        sustainability_descriptors("Xx2")


def test_eu_list_has_its_34_materials():
    # 34 materials; feldspar maps to no element; HREE (10) and LREE (5) and PGM (6) expand
    assert len(critical_raw_materials()) == 49
    assert {"Ga", "Ge", "Si", "Sb", "In"} & critical_raw_materials() == {"Ga", "Ge", "Si", "Sb"}


def test_predict_gap_output_carries_the_supply_chain_columns(tmp_path):
    import csv

    from pipelines.api import predict_gaps
    from pipelines.cli import main

    src = tmp_path / "in.csv"
    src.write_text("formula\nCdTe\nNpO2\nXx2\n")
    out = tmp_path / "out.csv"
    assert main(["predict-gap", "--input", str(src), "--out", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert list(rows[0])[-len(SUSTAINABILITY_COLUMNS) :] == list(SUSTAINABILITY_COLUMNS)
    assert float(rows[0]["hhi_production"]) == pytest.approx(2338.0, abs=1) and rows[0]["toxic_elements"] == "Cd"
    assert rows[1]["hhi_production"] == UNKNOWN and rows[1]["scarcest_element"] == UNKNOWN
    assert rows[2]["hhi_production"] == "" and rows[2]["error"]  # unreadable: no numbers, the reason given
    frame = predict_gaps(["GaAs", "NpO2"])
    assert frame.loc[0, "critical_raw_materials"] == "As Ga" and frame.loc[1, "cost_per_kg"] == UNKNOWN


def test_supply_risk_summary_splits_the_stable_candidates():
    """Median over every relaxed row with an HHI (failed rows and unknown HHI left out); low risk = stable, HHI
    below that median, no toxic element; unknown HHI is never low risk; rows read as results.csv strings."""
    rows = [
        {"id": "a", "formula": "ZnS", "status": "ok", "e_above_hull": "0.0", "hhi_production": "1000",
         "toxic_elements": "", "gap_expt": "3.6"},
        {"id": "b", "formula": "CdTe", "status": "ok", "e_above_hull": "-0.01", "hhi_production": "1500",
         "toxic_elements": "Cd", "gap_expt": "1.5"},
        {"id": "c", "formula": "GaP", "status": "ok", "e_above_hull": "0.02", "hhi_production": "5000",
         "toxic_elements": "", "gap_expt": "2.3"},
        {"id": "d", "formula": "TcO2", "status": "ok", "e_above_hull": "0.01", "hhi_production": UNKNOWN,
         "toxic_elements": "", "gap_expt": ""},
        {"id": "e", "formula": "ZnO", "status": "ok", "e_above_hull": "0.30", "hhi_production": "2000",
         "toxic_elements": "", "gap_expt": "3.3"},
        {"id": "f", "formula": "Cu", "status": "failed", "e_above_hull": "", "hhi_production": "1",
         "toxic_elements": "", "gap_expt": ""},
    ]  # fmt: skip
    summary = supply_risk_summary(rows, stable_threshold=0.05)
    assert summary.hhi_median == pytest.approx(1750.0)  # 1000, 1500, 2000, 5000
    assert [c.id for c in summary.stable] == ["b", "a", "d", "c"]  # lowest E_hull first
    assert [c.id for c in summary.low_risk] == ["a"]
    counts = summary.as_dict()
    assert counts["n_relaxed"] == 5 and counts["n_relaxed_hhi_unknown"] == 1
    assert counts["n_stable_toxic"] == 1 and counts["n_stable_hhi_unknown"] == 1
    assert counts["n_stable_low_supply_risk_in_pv_window"] == 0  # ZnS at 3.6 eV is outside 1.1-1.8
    figure = gap_supply_figure(summary)
    assert figure is not None and len(figure.axes[0].collections) == 3  # low risk, toxic, the rest
    assert supply_risk_summary(rows[3:4], 0.05).hhi_median is None
    assert gap_supply_figure(supply_risk_summary(rows[3:4], 0.05)) is None  # nothing drawable
