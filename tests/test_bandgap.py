"""Band-gap GNN: composition graphs, a tiny real training run, the ensemble, the shipped model and the CLI."""

from __future__ import annotations

import csv
import gzip
import io
from importlib import resources

import numpy as np
import pytest
import torch

from materials.ml.bandgap import (
    BASE_CALIBRATION_INPUTS,
    GAP_SOURCE,
    BandGapError,
    GapCalibrationSettings,
    GapDataset,
    GapEnsemble,
    GapModelSettings,
    GapNet,
    GapTrainSettings,
    MetalCalibration,
    anchor_loss,
    calibrate_ensemble,
    calibration_half,
    chemistry_features,
    collate_graphs,
    combine_members,
    composition_graph,
    conformal_scale,
    estimate_pool_prior,
    finetune_expt_model,
    formula_elements,
    gap_metrics,
    interval_width,
    known_nonmetals,
    model_outputs,
    predict_gaps,
    shipped_model_path,
    split_of,
    train_model,
    train_pbe_model,
    training_elements,
)
from pipelines.cli import main
from pipelines.config import ConfigError
from pipelines.train_gap import TEXTBOOK, add_gap_columns, load_bandgap_config

TINY = GapModelSettings(hidden=32, embedding=8, layers=2, heads=2)


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def mp_sample() -> tuple[GapDataset, GapDataset]:
    """600 MP compositions (first rows of the shipped table, one per formula), split by formula hash."""
    with resources.files("materials.data").joinpath("mp_pbe_bandgaps.csv.gz").open("rb") as raw:
        text = gzip.decompress(raw.read()).decode()
    seen: dict[str, float] = {}
    for rec in csv.DictReader(io.StringIO(text)):
        seen.setdefault(rec["pretty_formula"], float(rec["band_gap"]))
        if len(seen) == 600:
            break
    data = GapDataset.from_pairs(list(seen.items()))
    test = np.array([split_of(f, 20, 0) == "test" for f in data.formulas])
    return data.subset(np.flatnonzero(~test)), data.subset(np.flatnonzero(test))


def test_graph_fractions_and_edges():
    g = composition_graph("Fe2O3")
    assert g.formula == "Fe2O3"
    assert g.z.tolist() == [8, 26]  # ordered by Z
    assert g.weight.tolist() == pytest.approx([0.6, 0.4])
    assert g.edge_index.shape == (2, 4)  # every ordered pair with self-loops
    assert sorted(map(tuple, g.edge_index.T.tolist())) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    reduced, z, w = formula_elements("Ga0.5In0.5As")
    assert reduced == "In0.5Ga0.5As1"  # pymatgen's reduced formula of a fractional composition
    assert z.tolist() == [31, 33, 49] and w.tolist() == pytest.approx([0.25, 0.5, 0.25])
    assert formula_elements("Cu")[2].tolist() == [1.0]


def test_collate_offsets_edges_per_graph():
    graphs = [formula_elements(f) for f in ("Cu", "GaAs", "CuInSe2")]
    batch = collate_graphs([g[1] for g in graphs], [g[2] for g in graphs])
    assert batch.batch.tolist() == [0, 1, 1, 2, 2, 2]
    assert batch.edge_index.shape == (2, 1 + 4 + 9)
    src, dst = batch.edge_index
    assert torch.equal(batch.batch[src], batch.batch[dst])  # no edge crosses graphs
    assert batch.weight[batch.batch == 2].sum().item() == pytest.approx(1.0)


@pytest.mark.parametrize(
    "formula, fragment",
    [("GaXx", "Xx"), ("", "empty"), ("   ", "empty"), ("Ga2As)", "cannot be parsed"), ("Qq2O", "Qq")],
)
def test_bad_formulas_raise_naming_the_problem(formula, fragment):
    with pytest.raises(BandGapError, match=fragment):
        composition_graph(formula)


@pytest.mark.slow
def test_tiny_training_beats_the_mean_and_is_deterministic(mp_sample):
    train, test = mp_sample
    assert len(train) > 400 and len(test) > 60
    assert not set(train.formulas) & set(test.formulas)
    settings = GapTrainSettings(epochs=25, samples_per_epoch=0, batch_size=64, lr=3e-3)

    def fit(seed: int) -> GapNet:
        return train_pbe_model(train, TINY, settings, seed)[0]

    model = fit(0)
    pred = combine_members([model_outputs(model, test)])
    mae = gap_metrics(pred, test.gap)["mae"]
    baseline = float(np.mean(np.abs(test.gap - train.gap.mean())))
    assert mae < 0.8 * baseline, f"{mae=:.3f} vs mean predictor {baseline:.3f}"

    again = model_outputs(fit(0), test)
    first = model_outputs(model, test)
    for key in ("p_metal", "mu", "b"):
        np.testing.assert_array_equal(first[key], again[key])

    other = model_outputs(fit(1), test)
    ensemble = combine_members([first, other])
    assert not np.array_equal(first["mu"], other["mu"])
    assert np.all(ensemble["std"] > 0)
    assert np.all((ensemble["p_metal"] >= 0) & (ensemble["p_metal"] <= 1))
    metals = ensemble["p_metal"] >= 0.5
    assert np.all(ensemble["gap"][metals] == 0) and np.all(ensemble["gap"][~metals] >= 0)


def test_train_loss_decreases(mp_sample):
    train, _ = mp_sample
    torch.manual_seed(0)
    history = train_model(GapNet(TINY), train, epochs=6, lr=3e-3, batch_size=64, seed=0)
    assert history[-1]["train_loss"] < history[0]["train_loss"] - 0.2


def test_anchor_loss_exact_values():
    logit = torch.tensor([0.0, 2.0, -1.0])
    mu = torch.tensor([1.0, 3.0, 0.5])
    gap_pbe = torch.tensor([1.5, 2.0, 0.0])  # non-metal below its PBE gap, non-metal above it, PBE metal
    # cross-entropy towards the PBE class (1, 1, 0): log 2, log(1 + e^-2), log(1 + e^-1)
    ce = (np.log(2.0) + np.log1p(np.exp(-2.0)) + np.log1p(np.exp(-1.0))) / 3
    assert float(anchor_loss(logit, mu, gap_pbe, 1.0, 0.0)) == pytest.approx(ce, rel=1e-6)
    # hinge max(0, gap_pbe - mu) averaged over the two PBE non-metals only: (0.5 + 0) / 2
    assert float(anchor_loss(logit, mu, gap_pbe, 0.0, 2.0)) == pytest.approx(0.5, rel=1e-6)
    assert float(anchor_loss(logit, mu, gap_pbe, 1.0, 2.0)) == pytest.approx(ce + 0.5, rel=1e-6)


def test_anchored_finetune_raises_gaps_to_the_pbe_bound(mp_sample):
    """Fine-tuning on a few 'experimental' gaps with the PBE bound keeps the anchor compositions at or above their
    PBE gap; without it they drift below."""
    train, _ = mp_sample
    torch.manual_seed(0)
    base = train_pbe_model(train, TINY, GapTrainSettings(epochs=8, samples_per_epoch=0, batch_size=64), 0)[0]
    nonmetal = np.flatnonzero(train.gap > 0.5)
    anchor = train.subset(nonmetal[:150])
    expt = GapDataset.from_pairs([(f, 0.1) for f in train.formulas[-60:]])  # all tiny gaps: pulls mu down
    shortfall = {}
    for weight in (0.0, 5.0):
        settings = GapTrainSettings(finetune_epochs=15, batch_size=32, finetune_lr=2e-3, anchor_bound_weight=weight)
        model = finetune_expt_model(base, expt, settings, 0, anchor=anchor)[0]
        mu = model_outputs(model, anchor)["mu"]
        shortfall[weight] = float(np.mean(np.maximum(anchor.gap - mu, 0)))
    assert shortfall[5.0] < 0.5 * shortfall[0.0], shortfall


@pytest.mark.slow
def test_anchor_set_holds_pbe_nonmetals_outside_the_experimental_set():
    from pipelines.train_gap import BandGapConfig, build_datasets

    config = BandGapConfig.model_validate({"data": {"max_mp_train": 3000, "max_expt_train": 300}})
    data = build_datasets(config)
    anchor = data["anchor"]
    assert 0 < len(anchor) < len(data["mp_train"]) and np.all(anchor.gap > 0)
    expt = {f for k in ("expt_train", "expt_val", "expt_test") for f in data[k].formulas}
    assert not expt & set(anchor.formulas)
    assert not set(data["borlido"].formulas) & set(anchor.formulas)


def test_config_is_strict(tmp_path):
    config = load_bandgap_config("configs/bandgap.yaml")
    assert config.members >= 4
    bad = tmp_path / "bad.yaml"
    bad.write_text("training:\n  epoks: 3\n")
    with pytest.raises(ConfigError, match="epoks"):
        load_bandgap_config(bad)


# ---------------------------------------------------------------------------------------------------- shipped model


def test_shipped_model_predicts_known_gaps():
    assert shipped_model_path().is_file(), "the trained ensemble must ship in materials/data"
    rows = {r["formula"]: r for r in predict_gaps(["Si", "GaAs", "ZnO", "Cu", "Bogus1"])}
    assert 0.6 <= rows["Si"]["gap_expt"] <= 1.8
    assert 0.8 <= rows["GaAs"]["gap_expt"] <= 2.2
    assert 2.0 <= rows["ZnO"]["gap_expt"] <= 4.5
    assert rows["Cu"]["p_metal"] > 0.8 and rows["Cu"]["gap_expt"] == 0.0
    for formula in ("Si", "GaAs", "ZnO"):
        r = rows[formula]
        assert r["p_metal"] < 0.5 and r["error"] is None
        assert 0 < r["gap_expt_std"] < 2.0 and 0 < r["gap_pbe_std"] < 2.0
        assert r["gap_pbe"] < r["gap_expt"] + 0.3  # PBE underestimates gaps
    assert rows["Bogus1"]["error"] and np.isnan(rows["Bogus1"]["gap_pbe"])


def test_predict_gap_cli_keeps_going_past_a_bad_row(tmp_path, capsys):
    src = tmp_path / "in.csv"
    src.write_text("name,composition\na,GaN\nb,Xx2O\nc,\nd,CdTe\n")
    out = tmp_path / "out.csv"
    assert main(["predict-gap", "--input", str(src), "--formula-column", "composition", "--out", str(out)]) == 0
    assert "2/4 rows predicted" in capsys.readouterr().out
    rows = list(csv.DictReader(out.open()))
    assert [r["name"] for r in rows] == ["a", "b", "c", "d"]
    assert {"gap_pbe", "gap_pbe_std", "gap_expt", "gap_expt_lo", "gap_expt_hi", "p_metal", "error"} <= set(rows[0])
    assert rows[0]["gap_source"] == "composition"
    assert 2.5 < float(rows[0]["gap_expt"]) < 4.5 and rows[0]["error"] == ""
    assert 1.0 < float(rows[3]["gap_expt"]) < 2.2
    assert "Xx" in rows[1]["error"] and rows[1]["gap_expt"] == ""
    assert "empty" in rows[2]["error"]
    assert main(["predict-gap", "--input", str(src), "--formula-column", "nope", "--out", str(out)]) == 2


def test_predict_gap_cli_keeps_blank_lines_in_place_and_refuses_untrained_elements(tmp_path, capsys):
    """Blank lines used to vanish (every later output row shifted up by one) and Og got a confident number."""
    assert {"H", "Si", "Pu"} <= training_elements() and not {"Og", "Ne", "Fr"} & training_elements()
    src = tmp_path / "in.csv"
    src.write_text("name,formula\na,GaN\n\nb,OgO2\nc,NeF2\n,\nd,Si,extra\ne,CdTe\n\n\n")
    out = tmp_path / "out.csv"
    assert main(["predict-gap", "--input", str(src), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "2/7 rows predicted (5 with an error)" in text
    assert "no prediction: line 3: blank line, no formula" in text
    assert "no prediction: line 4: formula 'OgO2': element(s) Og absent from the model's training data" in text
    rows = list(csv.DictReader(out.open()))
    # one output row per input line between the header and the trailing blank lines, in order
    assert [(r["name"], r["formula"]) for r in rows] == [
        ("a", "GaN"),
        ("", ""),
        ("b", "OgO2"),
        ("c", "NeF2"),
        ("", ""),
        ("d", "Si"),
        ("e", "CdTe"),
    ]
    errors = [r["error"] for r in rows]
    assert errors[0] == errors[6] == "" and 1.0 < float(rows[6]["gap_expt"]) < 2.2
    assert errors[1] == "line 3: blank line, no formula"
    assert errors[2].startswith("line 4: formula 'OgO2': element(s) Og absent") and rows[2]["gap_expt"] == ""
    assert "element(s) Ne absent" in errors[3] and rows[3]["p_metal"] == ""
    assert errors[4].startswith("line 6: formula '' is empty")
    assert errors[5] == "line 7: 3 fields, header has 2; quote fields holding commas" and rows[5]["gap_pbe"] == ""
    # the library keeps one dict per input, the untrained element named
    og = predict_gaps(["Og", "Si"])
    assert "Og absent" in og[0]["error"] and np.isnan(og[0]["gap_expt"]) and og[1]["error"] is None


def test_add_gap_columns_to_results_csv(tmp_path):
    results = tmp_path / "results.csv"
    results.write_text("id,formula,status\nx,CdTe,ok\ny,,failed\n")
    assert add_gap_columns(results)
    rows = list(csv.DictReader(results.open()))
    assert 1.0 < float(rows[0]["gap_expt"]) < 2.2 and rows[0]["status"] == "ok"
    assert rows[1]["gap_expt"] == ""


# ----------------------------------------------------------------------------------- calibrated metal call, intervals


def test_chemistry_features_by_hand():
    # columns: balanced, EN range, EN max, metal fraction, transition-metal fraction
    feats = chemistry_features(["NaCl", "Cu3Au", "Si", "GaAs", "Ar"])
    assert feats[0].tolist() == pytest.approx([1.0, 3.16 - 0.93, 3.16, 0.5, 0.0])  # Pauling: Cl 3.16, Na 0.93
    assert feats[1].tolist() == pytest.approx([0.0, 2.54 - 1.90, 2.54, 1.0, 1.0])  # an intermetallic: not balanced
    assert feats[2].tolist() == pytest.approx([0.0, 0.0, 1.90, 0.0, 0.0])  # an element: neither; Si no metal
    assert feats[3, 0] == 1.0 and feats[3, 3] == 0.5  # Ga a metal, As not
    assert feats[4].tolist() == [0.0, 0.0, 0.0, 0.0, 0.0]  # a noble gas has no Pauling electronegativity


def test_metal_calibration_prior_shift_is_bayes_rule():
    cal = MetalCalibration(weights=(1.0, -2.0, -0.5, 0.0), bias=0.3, prior_fit=0.5)
    assert cal.inputs == BASE_CALIBRATION_INPUTS == ("logit_p", "balanced", "en_range", "balanced_en_range")
    p = np.array([0.2, 0.6, 0.9])
    chem = np.array([[1.0, 2.0, 3.0, 0.5, 0.0], [0.0, 0.0, 1.9, 0.0, 0.0], [1.0, 0.5, 2.5, 0.5, 0.5]])
    logit = np.log(p / (1 - p)) * 1.0 - 2.0 * chem[:, 0] - 0.5 * chem[:, 1] + 0.3
    assert cal.probability(p, chem) == pytest.approx(1 / (1 + np.exp(-logit)))
    assert cal.probability(p, chem, prior=0.5) == pytest.approx(cal.probability(p, chem))
    # odds multiply by (0.2 / 0.8) / (0.5 / 0.5) = 0.25
    shifted = cal.probability(p, chem, prior=0.2)
    ratio = (shifted / (1 - shifted)) / (cal.probability(p, chem) / (1 - cal.probability(p, chem)))
    assert ratio == pytest.approx(np.full(3, 0.25))
    assert MetalCalibration.from_dict(cal.as_dict()) == cal
    # the EM estimate is a fixed point: the prior equals the mean shifted probability
    pool = np.linspace(0.05, 0.95, 40)
    prior = estimate_pool_prior(cal, pool, np.zeros((40, 5)))
    assert np.mean(cal.probability(pool, np.zeros((40, 5)), prior)) == pytest.approx(prior, abs=1e-5)
    # a file written before the inputs were named reads as the base inputs
    assert MetalCalibration.from_dict({"weights": [1, 0, 0, 0], "bias": 0.0, "prior_fit": 0.5}).inputs == cal.inputs


def test_metal_calibration_named_inputs_read_the_pbe_classifier():
    cal = MetalCalibration(
        weights=(1.0, 2.0, -1.0, 0.5), bias=-0.2, inputs=("logit_p", "logit_p_pbe", "en_max", "metal_fraction")
    )
    p, p_pbe = np.array([0.3, 0.7]), np.array([0.5, 0.1])
    chem = np.array([[1.0, 2.0, 3.0, 0.25, 0.0], [0.0, 0.0, 1.9, 1.0, 1.0]])
    logit = np.log(p / (1 - p)) + 2.0 * np.log(p_pbe / (1 - p_pbe)) - chem[:, 2] + 0.5 * chem[:, 3] - 0.2
    assert cal.needs_pbe and cal.probability(p, chem, p_pbe=p_pbe) == pytest.approx(1 / (1 + np.exp(-logit)))
    with pytest.raises(BandGapError, match="p_pbe"):
        cal.probability(p, chem)
    assert MetalCalibration.from_dict(cal.as_dict()) == cal
    with pytest.raises(BandGapError, match="unknown.*'colour'"):
        MetalCalibration(weights=(1.0,), inputs=("colour",))


def test_interval_width_grows_with_the_nonmetal_gap():
    pred = {"std": np.array([0.2, 0.5]), "mu": np.array([1.0, 6.0]), "gap": np.array([0.0, 6.0])}
    assert interval_width(pred).tolist() == pytest.approx([0.2, 0.5])
    assert interval_width(pred, 0.1).tolist() == pytest.approx([0.3, 1.1])  # mu, not the reported (metal: 0) gap


def test_calibration_is_fitted_on_validation_data_with_known_nonmetals_weighted(mp_sample):
    """calibrate_ensemble reads only the validation sets it is given: the experimental P(metal) on one half of
    the experimental set plus, labelled non-metal with the configured total weight, the same half of the PBE
    set's compositions with a PBE gap >= the threshold; the interval on all of the experimental set."""
    pbe_val, expt_val = mp_sample
    torch.manual_seed(0)
    ensemble = GapEnsemble(TINY, {f: [GapNet(TINY).eval(), GapNet(TINY).eval()] for f in ("pbe", "expt")})
    known = known_nonmetals(pbe_val, 0.5)
    assert len(known) and np.all(known.gap >= 0.5) and len(known) < np.sum(pbe_val.gap > 0)
    first = calibration_half(expt_val.formulas)
    n_first, metal_fraction = int(first.sum()), float(np.mean(expt_val.gap[first] <= 0))
    n_known = int(calibration_half(known.formulas).sum())
    for weight in (0.0, 0.5):
        settings = GapCalibrationSettings(nonmetal_weight=weight, interval_gap_weight=0.1)
        fitted = calibrate_ensemble(ensemble, {"pbe": pbe_val, "expt": expt_val}, settings)
        calibration = ensemble.metal_calibration["expt"]
        assert calibration.inputs == settings.expt_inputs and calibration.needs_pbe
        assert ensemble.metal_calibration["pbe"].inputs == BASE_CALIBRATION_INPUTS
        # the known non-metals weigh `weight` times the Zhuo half in all: the fitted prior is diluted by 1 + weight
        assert calibration.prior_fit == pytest.approx(metal_fraction / (1 + weight))
        assert fitted["metal_calibration_n_expt"] == n_first + (n_known if weight else 0)
        pred = ensemble.predict_dataset("expt", expt_val)
        inside = (expt_val.gap >= pred["lo"]) & (expt_val.gap <= pred["hi"])
        assert 0.9 <= inside.mean() <= 0.97  # split conformal on these very compositions
        assert ensemble.interval_gap_weight == {"pbe": 0.0, "expt": 0.1}


def test_conformal_scale_is_the_right_order_statistic():
    error = np.arange(1, 20, dtype=float)  # 19 scores 1..19 with std 1
    # ceil((19 + 1) * 0.9) = 18th smallest score
    assert conformal_scale(error, np.ones(19), coverage=0.9) == 18.0
    assert conformal_scale(-error, 2 * np.ones(19), coverage=0.5) == 5.0  # ceil(20 * 0.5) = 10th: 10 / 2


def test_shipped_model_calls_no_textbook_semiconductor_a_metal():
    """The 16 textbook semiconductors and insulators (all in Borlido: in no training data) are non-metals, with a
    90 % interval around the reported gap; numbers from the composition alone, and the row says so."""
    formulas = list(TEXTBOOK)
    assert len(formulas) == 16 and "CuInSe2" in formulas
    rows = predict_gaps(formulas)
    for r in rows:
        assert r["p_metal"] < 0.5 and r["gap_expt"] > 0, r["formula"]
        assert r["gap_expt_lo"] <= r["gap_expt"] <= r["gap_expt_hi"] and r["gap_expt_lo"] >= 0
        assert r["gap_source"] == GAP_SOURCE == "composition"
    metrics = torch.load(shipped_model_path(), weights_only=True)["info"]["metrics"]
    assert 0.88 <= metrics["expt_test_coverage90"] <= 0.92 and 0.88 <= metrics["mp_test_coverage90"] <= 0.92
    assert metrics["textbook_called_metal"] == 0
    # what the calibration was chosen on (validation): charge-balanced known non-metals of the unseen half of MP val
    assert metrics["val_known_nonmetal_balanced_called_metal"] < 0.05
    assert 0.88 <= metrics["borlido_expt_coverage90"] <= 0.92 and metrics["borlido_expt_false_metal"] < 0.09
    assert metrics["mp_test_mae"] <= 0.30
