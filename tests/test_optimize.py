from __future__ import annotations

import itertools
import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from scipy.stats import norm

from materials.bo.optimize import (
    AcquisitionSettings,
    OptimizationError,
    Proposal,
    WindowObjective,
    expected_random_evaluations,
    fit_gp,
    initial_design,
    log_hit_probability,
    log_window_probability,
    method_targets,
    photovoltaic,
    power_electronics,
    propose_batch,
    simulate_campaign,
)

PV = photovoltaic()  # 1.1 <= gap <= 1.8 eV, e_hull <= 0.05 eV/atom
FAST = AcquisitionSettings(mc_samples=32, prefilter=64, fit_maxiter=50)


# ---------------------------------------------------------------------------------------------------------
# Objectives
# ---------------------------------------------------------------------------------------------------------


def test_desirability_exact_numbers():
    assert PV.desirability({"gap": 1.5, "e_hull": 0.0}) == 0.0
    assert PV.desirability({"gap": 1.8, "e_hull": 0.05}) == 0.0  # window and gate are inclusive
    # 0.2 eV above the window (/1.0) and 0.1 eV/atom above the gate (/0.1)
    assert PV.desirability({"gap": 2.0, "e_hull": 0.15}) == pytest.approx(-1.2)
    assert PV.desirability({"gap": 0.6, "e_hull": -0.3}) == pytest.approx(-0.5)
    scaled = WindowObjective("gap", 1.1, 1.8, "e_hull", 0.05, target_scale=0.5, stable_scale=0.2)
    assert scaled.desirability({"gap": 2.0, "e_hull": 0.15}) == pytest.approx(-0.4 - 0.5)
    ungated = WindowObjective("gap", 1.0, 2.0)
    assert ungated.desirability({"gap": 0.25}) == pytest.approx(-0.75)


def test_is_hit_and_two_objective_form():
    assert PV.is_hit({"gap": 1.1, "e_hull": 0.05})
    assert not PV.is_hit({"gap": 1.5, "e_hull": 0.051})
    assert not PV.is_hit({"gap": 1.09, "e_hull": 0.0})
    assert PV.objectives_2d({"gap": 2.3, "e_hull": 0.12}) == pytest.approx((0.12, 0.5))
    assert PV.objectives_2d({"gap": 1.4, "e_hull": -0.1}) == pytest.approx((-0.1, 0.0))
    wide = power_electronics()
    assert wide.high == math.inf
    assert wide.is_hit({"gap": 5.5, "e_hull": 0.0}) and wide.desirability({"gap": 2.5, "e_hull": 0.0}) == -0.5
    with pytest.raises(OptimizationError, match="no stability label"):
        WindowObjective("gap", 1.0, 2.0).objectives_2d({"gap": 1.0})


def test_signed_margins_exact():
    margins = PV.margins(np.array([1.5, 2.0, 0.6]), np.array([0.0, 0.15, 0.05]))
    # target: max(1.1 - t, t - 1.8) / 1.0; stability: (e_hull - 0.05) / 0.1
    np.testing.assert_allclose(margins, [[-0.3, -0.5], [0.2, 1.0], [0.5, 0.0]], atol=1e-12)
    desirability = -np.maximum(margins, 0.0).sum(axis=1)
    np.testing.assert_allclose(
        desirability, PV.desirability_array(np.array([1.5, 2.0, 0.6]), np.array([0, 0.15, 0.05]))
    )
    assert power_electronics().margins(np.array([3.5]), np.array([0.0]))[0, 0] == -0.5  # one-sided: low - t


def test_objective_names_missing_column_and_bad_fields():
    with pytest.raises(OptimizationError, match=r"\['e_hull'\].*\['gap', 'e_form'\]"):
        PV.desirability({"gap": 1.5, "e_form": -1.0})
    with pytest.raises(OptimizationError, match="low <= high"):
        WindowObjective("gap", 2.0, 1.0)
    with pytest.raises(OptimizationError, match="both stable and stable_max"):
        WindowObjective("gap", 1.0, 2.0, stable="e_hull")


def test_objective_round_trip_through_json():
    for objective in (PV, power_electronics(), WindowObjective("gap", -math.inf, 1.0)):
        data = json.loads(json.dumps(objective.as_dict()))
        assert WindowObjective.from_dict(data) == objective


def test_window_and_hit_probability_exact():
    # standard normal, window [-1, 1]: 0.682689...
    assert np.exp(log_window_probability(np.array([0.0]), np.array([1.0]), -1.0, 1.0))[0] == pytest.approx(
        0.6826894921370859, rel=1e-12
    )
    # far above or below the window the probability keeps full relative precision (no 1 - 1 cancellation)
    assert log_window_probability(np.array([30.0]), np.array([1.0]), 1.0, 2.0)[0] == pytest.approx(
        norm.logcdf(-28.0), rel=1e-6
    )
    assert log_window_probability(np.array([-30.0]), np.array([1.0]), 1.0, 2.0)[0] == pytest.approx(
        norm.logcdf(-31.0), rel=1e-6
    )
    # open-ended window: P(t >= 3) for t ~ N(3.5, 0.5^2) = Phi(1)
    assert np.exp(log_window_probability(np.array([3.5]), np.array([0.5]), 3.0, math.inf))[0] == pytest.approx(
        norm.cdf(1.0)
    )
    log_p = log_hit_probability(PV, np.array([1.45]), np.array([0.35]), np.array([0.05]), np.array([0.2]))
    assert np.exp(log_p[0]) == pytest.approx((norm.cdf(1.0) - norm.cdf(-1.0)) * 0.5)


def test_expected_random_evaluations_exact():
    assert expected_random_evaluations(4914, 73, 10) == pytest.approx(10 * 4915 / 74)
    assert expected_random_evaluations(7, 7, 3) == 3.0
    # brute force over all placements of 2 hits among 5: mean position of the first and of the second hit
    for k in (1, 2):
        positions = [sorted(c)[k - 1] + 1 for c in itertools.combinations(range(5), 2)]
        assert expected_random_evaluations(5, 2, k) == pytest.approx(np.mean(positions))
    with pytest.raises(OptimizationError, match="k <= n_hits"):
        expected_random_evaluations(10, 2, 3)


# ---------------------------------------------------------------------------------------------------------
# Proposals on a small hand-made pool
# ---------------------------------------------------------------------------------------------------------


def _pool_1d() -> tuple[np.ndarray, np.ndarray]:
    x = np.linspace(0.0, 1.0, 41)[:, None]
    return x, -((x[:, 0] - 0.62) ** 2)  # maximum at x = 0.62


def test_greedy_picks_the_posterior_mean_argmax():
    X, f = _pool_1d()
    evaluated = [0, 8, 16, 24, 32, 40]
    proposal = propose_batch(X, evaluated, f[evaluated], q=3, method="greedy", seed=0, settings=FAST)
    Xt = torch.as_tensor(X)
    model = fit_gp(Xt[evaluated], torch.as_tensor(f[evaluated, None]), torch.tensor([[0.0], [1.0]]), maxiter=50)
    available = np.setdiff1d(np.arange(41), evaluated)
    mean = model.posterior(Xt[available]).mean.detach().numpy().ravel()
    assert proposal.indices == available[np.argsort(-mean)[:3]].tolist()
    assert proposal.acquisition_values == pytest.approx(np.sort(mean)[::-1][:3].tolist())
    assert proposal.indices[0] == 25  # x = 0.625, the pool point nearest the optimum
    assert set(proposal.model_info) >= {"lengthscale_median", "noise", "outputscale"}


@pytest.mark.parametrize(
    "method", ["bo", "bo-hit", "bo-hit-raw", pytest.param("bo-pareto", marks=pytest.mark.slow), "greedy", "random"]
)
def test_methods_never_repropose_evaluated_indices(method):
    settings = FAST
    if method == "bo-hit-raw":  # P(hit) from GPs of the raw labels instead of their clipped margins
        method, settings = "bo-hit", AcquisitionSettings(mc_samples=32, prefilter=64, fit_maxiter=50, margin_clip=None)
    rng = np.random.default_rng(1)
    X = rng.random((60, 2))
    labels = {"gap": 3.0 * X[:, 0], "e_hull": 0.3 * X[:, 1]}
    cols = {k: np.asarray(v) for k, v in labels.items()}
    evaluated = rng.choice(60, 20, replace=False).tolist()
    y = method_targets(method, PV, cols)[evaluated]
    proposal = propose_batch(X, evaluated, y, q=4, method=method, seed=3, objective=PV, settings=settings)
    assert len(proposal.indices) == 4 == len(set(proposal.indices)) == len(proposal.acquisition_values)
    assert not set(proposal.indices) & set(evaluated)
    assert all(0 <= i < 60 for i in proposal.indices)


def test_duplicate_feature_rows_map_to_distinct_indices():
    X = np.repeat(np.linspace(0.0, 1.0, 10)[:, None], 2, axis=0)  # every row twice
    f = -((X[:, 0] - 0.5) ** 2)
    evaluated = [0, 6, 12, 18]
    for method in ("bo", "greedy"):
        proposal = propose_batch(X, evaluated, f[evaluated], q=4, method=method, seed=0, settings=FAST)
        assert len(set(proposal.indices)) == 4 and not set(proposal.indices) & set(evaluated)


def test_random_is_seeded_and_propose_batch_deterministic():
    X, f = _pool_1d()
    evaluated = [0, 10, 20, 30, 40]
    a = propose_batch(X, evaluated, f[evaluated], q=5, method="random", seed=7)
    assert a == propose_batch(X, evaluated, f[evaluated], q=5, method="random", seed=7)
    assert a.indices != propose_batch(X, evaluated, f[evaluated], q=5, method="random", seed=8).indices
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    b = propose_batch(X, evaluated, f[evaluated], q=3, method="bo", seed=11, settings=FAST)
    assert torch.rand(1) == expected_next  # the caller's global torch RNG is untouched
    assert b.as_dict() == propose_batch(X, evaluated, f[evaluated], q=3, method="bo", seed=11, settings=FAST).as_dict()


def test_proposal_round_trip():
    p = Proposal([3, 1], [-0.5, -1.25], {"noise": 0.01}, "bo", 4)
    assert Proposal.from_dict(json.loads(json.dumps(p.as_dict()))) == p


def test_propose_batch_bad_input_is_named():
    X, f = _pool_1d()
    with pytest.raises(OptimizationError, match="unknown"):
        propose_batch(X, [0, 1], f[[0, 1]], q=2, method="ei", seed=0)  # type: ignore[arg-type]
    with pytest.raises(OptimizationError, match="expects y of shape"):
        propose_batch(X, [0, 1, 2], f[[0, 1]], q=2, method="bo", seed=0)
    with pytest.raises(OptimizationError, match="repeat"):
        propose_batch(X, [0, 0], f[[0, 0]], q=2, method="bo", seed=0)
    with pytest.raises(OptimizationError, match="at least 2 observations"):
        propose_batch(X, [0], f[[0]], q=2, method="bo", seed=0)
    with pytest.raises(OptimizationError, match="no candidate left"):
        propose_batch(X[:2], [0, 1], f[:2], q=1, method="random", seed=0)


def test_initial_design_random_and_diverse():
    X = np.linspace(0.0, 10.0, 11)[:, None]
    assert initial_design(X, 4, seed=2) == initial_design(X, 4, seed=2)
    assert len(set(initial_design(X, 11, seed=0))) == 11
    diverse = initial_design(X, 3, seed=5, method="diverse")
    assert {0, 10} <= set(diverse)  # max-min distance reaches both ends of a line within three picks
    with pytest.raises(OptimizationError, match=r"n_init must be in \[1, 11\]"):
        initial_design(X, 12, seed=0)


# ---------------------------------------------------------------------------------------------------------
# Simulated campaigns
# ---------------------------------------------------------------------------------------------------------


def _synthetic_pool() -> tuple[np.ndarray, dict[str, np.ndarray]]:
    g = np.linspace(0.0, 1.0, 15)
    X = np.array(list(itertools.product(g, g)))
    gap = 3.0 * X[:, 0]  # eV
    e_hull = 2.0 * (X[:, 1] - 0.2) ** 2  # eV/atom, stable near x1 = 0.2
    return X, {"gap": gap, "e_hull": e_hull}


def test_simulated_bo_finds_hits_faster_than_random():
    X, labels = _synthetic_pool()
    hits = PV.hit_array(labels["gap"], labels["e_hull"]).sum()
    assert hits == 15  # 3 gap columns x 5 stable rows of 225
    kwargs = dict(q=4, n_init=6, seed=0, max_evaluations=120, target_hits=5, settings=FAST)
    bo = simulate_campaign(X, labels, PV, "bo-hit", **kwargs)
    rnd = simulate_campaign(X, labels, PV, "random", **kwargs)
    assert bo["evaluations_to_target"] is not None
    assert rnd["evaluations_to_target"] is None or bo["evaluations_to_target"] < rnd["evaluations_to_target"]
    assert bo["evaluations_to_target"] < expected_random_evaluations(225, 15, 5) / 2
    assert len(set(bo["order"])) == len(bo["order"])
    assert bo["hits"][-1] >= 5 and bo["n_hits_pool"] == 15
    assert bo["batch_evaluations_to_target"] >= bo["evaluations_to_target"]


def test_simulated_campaign_bad_input():
    X, labels = _synthetic_pool()
    with pytest.raises(OptimizationError, match="smaller than the initial design"):
        simulate_campaign(X, labels, PV, "random", q=2, n_init=10, seed=0, max_evaluations=5)
    with pytest.raises(OptimizationError, match=r"\['e_hull'\].*\['gap', 'stability'\]"):
        simulate_campaign(X, {"gap": labels["gap"], "stability": labels["e_hull"]}, PV, "random", 2, 4, 0)
    bad = dict(labels, gap=np.where(np.arange(225) == 7, np.nan, labels["gap"]))
    with pytest.raises(OptimizationError, match=r"rows \[7\]"):
        simulate_campaign(X, bad, PV, "random", 2, 4, 0)
    text = dict(labels, e_hull=["-" if i == 3 else str(v) for i, v in enumerate(labels["e_hull"])])
    with pytest.raises(OptimizationError, match="'e_hull' has non-numeric values"):
        simulate_campaign(X, text, PV, "random", 2, 4, 0)


def test_simulated_campaign_accepts_rows_of_labels():
    X, labels = _synthetic_pool()
    pairs = zip(labels["gap"], labels["e_hull"], strict=True)
    rows = [{"gap": g, "e_hull": e, "formula_id": i} for i, (g, e) in enumerate(pairs)]
    a = simulate_campaign(X, rows, PV, "random", q=3, n_init=4, seed=1, max_evaluations=30)
    b = simulate_campaign(X, labels, PV, "random", q=3, n_init=4, seed=1, max_evaluations=30)
    assert a["order"] == b["order"] and len(a["order"]) == 30 and a["evaluations_to_target"] is None


# ---------------------------------------------------------------------------------------------------------
# Site (categorical) kernel
# ---------------------------------------------------------------------------------------------------------


def _set_site_kernel(kernel, cont_scale: float, cat_scales: list[float], cat_lengthscales: list[float]) -> None:
    """Fix the hyperparameters of a site_kernel sum/additive: continuous ScaleKernel first, then categorical."""
    from botorch.models.kernels.categorical import CategoricalKernel

    scales = [k for k in kernel.modules() if hasattr(k, "outputscale")]
    scales[0].outputscale = cont_scale
    for scale, value in zip(scales[1:], cat_scales, strict=True):
        scale.outputscale = value
    cats = [k for k in kernel.modules() if isinstance(k, CategoricalKernel)]
    if len(cats) == 1:
        cats[0].lengthscale = torch.tensor([cat_lengthscales], dtype=torch.float64)
    else:
        for k, value in zip(cats, cat_lengthscales, strict=True):
            k.lengthscale = torch.tensor([[value]], dtype=torch.float64)


def test_site_kernel_exact_values():
    from materials.bo.optimize import site_kernel

    # columns: one continuous feature, then the element codes of two sites (atomic numbers)
    X = torch.tensor([[0.3, 38.0, 22.0], [0.3, 38.0, 22.0], [0.3, 56.0, 22.0], [0.3, 56.0, 40.0]], dtype=torch.float64)
    kernel = site_kernel(3, [1, 2], combine="sum").to(torch.float64)
    _set_site_kernel(kernel, 2.0, [0.5], [1.0, 2.0])
    K = kernel(X).to_dense().detach()
    # same continuous value and same elements: k = s_cont + s_cat, correlation exactly 1
    assert K[0, 1] == pytest.approx(2.5) and K[0, 0] == pytest.approx(2.5)
    assert (K[0, 1] / torch.sqrt(K[0, 0] * K[1, 1])).item() == pytest.approx(1.0)
    # site 0 differs (lengthscale 1): exp(-mean([1/1, 0/2])) = exp(-0.5)
    assert K[0, 2] == pytest.approx(2.0 + 0.5 * math.exp(-0.5))
    # both sites differ: exp(-(1/1 + 1/2) / 2) = exp(-0.75); codes are labels, |56 - 38| plays no role
    assert K[0, 3] == pytest.approx(2.0 + 0.5 * math.exp(-0.75))

    additive = site_kernel(3, [1, 2], combine="additive").to(torch.float64)
    _set_site_kernel(additive, 2.0, [0.5, 0.25], [1.0, 2.0])
    K = additive(X).to_dense().detach()
    assert K[0, 1] == pytest.approx(2.75)
    assert K[0, 3] == pytest.approx(2.0 + 0.5 * math.exp(-1.0) + 0.25 * math.exp(-0.5))

    assert type(site_kernel(3, [])).__name__ == "MaternKernel"  # no categorical column: the plain kernel


def test_site_kernel_and_settings_reject_bad_input():
    from materials.bo.optimize import site_kernel

    with pytest.raises(OptimizationError, match=r"must lie in \[0, 3\)"):
        site_kernel(3, [3])
    with pytest.raises(OptimizationError, match="all 2 columns are categorical"):
        site_kernel(2, [0, 1])
    with pytest.raises(OptimizationError, match="combine 'product' unknown"):
        site_kernel(3, [2], combine="product")  # type: ignore[arg-type]
    with pytest.raises(OptimizationError, match="distinct non-negative"):
        AcquisitionSettings(categorical_columns=(-1,))
    with pytest.raises(OptimizationError, match="distinct non-negative"):
        AcquisitionSettings(categorical_columns=(2, 2))
    with pytest.raises(OptimizationError, match="categorical_kernel 'x' unknown"):
        AcquisitionSettings(categorical_kernel="x")  # type: ignore[arg-type]
    X = np.random.default_rng(0).random((10, 2))
    with pytest.raises(OptimizationError, match=r"categorical_columns \[5\] are past the pool's 2"):
        propose_batch(
            X,
            [0, 1, 2],
            X[[0, 1, 2], 0],
            q=1,
            method="greedy",
            seed=0,
            settings=AcquisitionSettings(categorical_columns=(5,)),
        )


def test_bo_hit_with_site_codes_prefers_the_hit_element():
    # 40 candidates: a continuous feature and the element code of one site; hits are exactly the code-26 rows
    rng = np.random.default_rng(4)
    codes = np.repeat([8.0, 22.0, 26.0, 40.0], 10)
    X = np.column_stack([rng.random(40), codes])
    gap = np.where(codes == 26.0, 1.5, 4.0)
    labels = {"gap": gap, "e_hull": np.zeros(40)}
    evaluated = [0, 1, 10, 11, 20, 21, 30, 31]  # two of each element, two hits
    y = method_targets("bo-hit", PV, labels)[evaluated]
    settings = AcquisitionSettings(fit_maxiter=50, categorical_columns=(1,))
    proposal = propose_batch(X, evaluated, y, q=5, method="bo-hit", seed=0, objective=PV, settings=settings)
    assert set(proposal.indices) <= set(range(22, 30))  # the unevaluated code-26 rows
    assert "target_categorical_lengthscale_median" in proposal.model_info
    # a categorical column that is constant over the pool is dropped like any constant feature: plain kernel
    X_const = np.column_stack([X[:, 0], np.full(40, 8.0), X[:, 1] / 10])
    plain = propose_batch(
        X_const,
        evaluated,
        y,
        q=5,
        method="bo-hit",
        seed=0,
        objective=PV,
        settings=replace(settings, categorical_columns=(1,)),
    )
    assert "target_categorical_lengthscale_median" not in plain.model_info and len(plain.indices) == 5


def test_forest_surrogate_finds_the_hit_element_and_is_seeded():
    # hits are the code-26 rows; the forest splits on the code like on any number (a second feature, a function
    # of the code, leaves it nothing else to split on: with 8 observations a random column separates them too)
    codes = np.repeat([8.0, 22.0, 26.0, 40.0], 10)
    X = np.column_stack([codes, codes % 7])
    labels = {"gap": np.where(codes == 26.0, 1.5, 4.0), "e_hull": np.zeros(40)}
    evaluated = [0, 1, 10, 11, 20, 21, 30, 31]
    y = method_targets("bo-hit", PV, labels)[evaluated]
    settings = AcquisitionSettings(surrogate="forest", forest_trees=50, forest_max_features=1.0)
    first = propose_batch(X, evaluated, y, q=5, method="bo-hit", seed=3, objective=PV, settings=settings)
    again = propose_batch(X, evaluated, y, q=5, method="bo-hit", seed=3, objective=PV, settings=settings)
    assert set(first.indices) <= set(range(22, 30))
    assert first.indices == again.indices and first.acquisition_values == again.acquisition_values
    assert first.model_info["target_forest_trees"] == 50.0
    # codes 8 and 22 (gap 4.0) are alike and sit at one end: every tree, whatever its bootstrap sample, predicts
    # 4.0 there, so the spread is exactly the floor; on the hit rows some trees never saw a hit: more spread
    from materials.bo.optimize import forest_mean_std

    mean, std = forest_mean_std(X[evaluated], y[:, 0], X[evaluated], settings, seed=0)
    assert np.allclose(mean[:4], 4.0) and np.allclose(std[:4], settings.forest_min_std)
    assert (std[4:6] > settings.forest_min_std + 0.1).all() and (mean[4:6] < 4.0).all()
    with pytest.raises(OptimizationError, match="forest' is implemented for method 'bo-hit' only"):
        propose_batch(X, evaluated, y[:, 0], q=2, method="bo", seed=0, settings=settings)
    with pytest.raises(OptimizationError, match="surrogate 'svm' unknown"):
        AcquisitionSettings(surrogate="svm")
    with pytest.raises(OptimizationError, match="forest settings"):
        AcquisitionSettings(surrogate="forest", forest_max_features=0.0)


@pytest.mark.slow
def test_known_objective_is_a_third_pareto_axis():
    """Twins with the same features and labels but a low or a high known cost (e.g. production HHI): with the cost
    as a known objective, qLogNEHVI proposes the cheap twins; without it, it cannot tell them apart."""
    rng = np.random.default_rng(0)
    x0 = rng.uniform(0, 1, 40)
    cost = np.concatenate([np.full(40, 1000.0), np.full(40, 6000.0)])
    X = np.column_stack([np.concatenate([x0, x0]), cost])
    stability, distance = (np.concatenate([v, v]) for v in ((x0 - 0.3) ** 2, np.abs(x0 - 0.7)))
    y_all = np.column_stack([stability, distance])
    evaluated = list(range(0, 80, 8))
    base = AcquisitionSettings(prefilter=None, mc_samples=64)
    known = propose_batch(
        X, evaluated, y_all[evaluated], 6, "bo-pareto", 0, settings=replace(base, known_objectives=(1,))
    )
    assert any(k.startswith("known0_") for k in known.model_info)  # the third axis reached the acquisition
    assert sum(cost[i] == 1000.0 for i in known.indices) >= 5
    with pytest.raises(OptimizationError, match="known_objectives"):
        propose_batch(X, evaluated, y_all[evaluated], 2, "bo-pareto", 0, settings=replace(base, known_objectives=(5,)))
