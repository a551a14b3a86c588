"""Bayesian optimisation over a discrete candidate pool: objectives, GP surrogates, acquisition, baselines.

The pieces are separable (featurise -> surrogate -> acquisition -> select) and each is testable alone:

* **Objectives** (:class:`WindowObjective`): a target property (e.g. the band gap, eV) inside a window, gated by
  a stability label (e.g. E_hull <= 0.05 eV/atom). Scalar form: :meth:`WindowObjective.desirability` (0 for a
  hit, negative otherwise). Two-objective form: :meth:`WindowObjective.objectives_2d` (stability value and
  distance of the target to its window, both to minimise).
* **Surrogates**: BoTorch ``SingleTaskGP`` (ARD Matern-5/2 by default, or RBF, with BoTorch's dimension-scaled
  lengthscale prior), inputs normalised to the pool's bounds (features constant over the pool dropped),
  outcomes standardised, fitted by maximising the exact marginal log likelihood, float64. Two-objective methods
  use one GP per objective. Columns named in ``AcquisitionSettings.categorical_columns`` (e.g. which element
  sits at each site) get BoTorch's ``CategoricalKernel`` added to the continuous kernel (:func:`site_kernel`).
* **Methods** (:func:`propose_batch`):

  - ``"bo"``: qLogNoisyExpectedImprovement of the scalar desirability, optimised over the remaining pool
    with ``optimize_acqf_discrete`` (sequential greedy batch of q).
  - ``"bo-hit"`` (recommended for discovery): one GP per signed margin of the objective (target outside its
    window, stability above its gate; :meth:`WindowObjective.margins`, clipped at ``margin_clip``), each
    candidate's probability of being a hit, P(target margin <= 0) * P(stability margin <= 0) under the GPs'
    predictive Gaussians (observation noise included), and the q most probable. The sum of these
    probabilities is the expected number of hits in the batch, which is what a discovery campaign is scored
    on. Modelling margins rather than raw labels stops a heavy tail (E_hull up to eV/atom) or a pile of zero
    gaps from dominating the fit.
  - ``"bo-pareto"``: qLogNoisyExpectedHypervolumeImprovement of (stability, distance) (a ModelListGP).
  - ``"greedy"``: top q of the GP posterior mean of the scalar desirability.
  - ``"random"``: q distinct indices drawn with a seeded numpy Generator.

  Evaluated candidates are never proposed again. Each call is deterministic for a given seed and data: torch
  and numpy are seeded from ``seed`` inside the call, without touching the caller's global RNG state.
* **Benchmarking at no cost**: :func:`simulate_campaign` replays a campaign on a labelled pool, and
  :func:`expected_random_evaluations` gives random search's expected cost analytically.

Speed: the MC acquisitions are evaluated on a shortlist of the ``prefilter`` remaining candidates with the
highest upper confidence bound (posterior mean + ``ucb_beta`` sigma, per objective for ``"bo-pareto"``), and
GP hyperparameter fits are capped at ``fit_maxiter`` L-BFGS-B iterations. Measured on one CPU thread for the
4,914-row perovskite pool (82 informative composition features, q = 5), 100 / 300 observations: ``"bo-hit"``
0.8 / 2.1 s, ``"bo"`` 0.6 / 2.0 s, ``"greedy"`` 0.3 / 0.9 s, ``"bo-pareto"`` 1.7 / 7.0 s.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal, get_args

import numpy as np
import torch
from botorch.acquisition.logei import qLogNoisyExpectedImprovement
from botorch.acquisition.multi_objective.logei import qLogNoisyExpectedHypervolumeImprovement
from botorch.exceptions.warnings import InputDataWarning, OptimizationWarning
from botorch.fit import fit_gpytorch_mll
from botorch.models import ModelListGP, SingleTaskGP
from botorch.models.kernels.categorical import CategoricalKernel
from botorch.models.transforms.input import Normalize
from botorch.models.transforms.outcome import Standardize
from botorch.models.utils.gpytorch_modules import get_covar_module_with_dim_scaled_prior
from botorch.optim import optimize_acqf_discrete
from botorch.sampling.normal import SobolQMCNormalSampler
from gpytorch.constraints import GreaterThan
from gpytorch.kernels import AdditiveKernel, Kernel, MaternKernel, RBFKernel, ScaleKernel
from gpytorch.mlls import ExactMarginalLogLikelihood
from linear_operator.utils.warnings import NumericalWarning
from scipy.special import log_ndtr

from materials.errors import InputError

Method = Literal["bo", "bo-hit", "bo-pareto", "greedy", "random"]
METHODS: tuple[str, ...] = get_args(Method)
InitMethod = Literal["random", "diverse"]

_DTYPE = torch.float64
_POSTERIOR_CHUNK = 512  # rows per posterior evaluation in _mean_std


class OptimizationError(InputError):
    """Bad input to an objective, a proposal or a simulated campaign; the message names the item and the fix."""


# ---------------------------------------------------------------------------------------------------------
# Objectives
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WindowObjective:
    """A target label inside ``[low, high]``, optionally gated by a stability label ``<= stable_max``.

    Attributes:
        target: label name of the designed property, e.g. ``"gap"`` (eV).
        low: lower edge of the target window (``-inf`` for none), in the target's unit.
        high: upper edge of the target window (``inf`` for none).
        stable: label name of the stability measure, e.g. ``"e_hull"`` (eV/atom); None for no gate.
        stable_max: largest stability value that counts as stable (eV/atom for E_hull).
        target_scale: distance of the target to its window that costs 1 unit of desirability.
        stable_scale: excess of the stability label over ``stable_max`` that costs 1 unit of desirability.
    """

    target: str
    low: float
    high: float
    stable: str | None = None
    stable_max: float | None = None
    target_scale: float = 1.0
    stable_scale: float = 0.1

    def __post_init__(self) -> None:
        if not self.low <= self.high or (math.isinf(self.low) and math.isinf(self.high)):
            raise OptimizationError(
                f"WindowObjective({self.target!r}): need low <= high with at least one finite edge; "
                f"got low={self.low}, high={self.high}."
            )
        if (self.stable is None) != (self.stable_max is None):
            raise OptimizationError(
                f"WindowObjective({self.target!r}): give both stable and stable_max or neither; "
                f"got stable={self.stable!r}, stable_max={self.stable_max}."
            )
        if not (self.target_scale > 0 and self.stable_scale > 0):
            raise OptimizationError(
                f"WindowObjective({self.target!r}): scales must be positive; got target_scale={self.target_scale}, "
                f"stable_scale={self.stable_scale}."
            )

    @property
    def columns(self) -> tuple[str, ...]:
        """Label names this objective reads: the target, then the stability label if any."""
        return (self.target,) if self.stable is None else (self.target, self.stable)

    def check_columns(self, columns: Sequence[str]) -> None:
        """Raise :class:`OptimizationError` listing the available columns when a needed label is missing."""
        missing = [c for c in self.columns if c not in columns]
        if missing:
            raise OptimizationError(
                f"objective needs label column(s) {missing}, not among the available columns {list(columns)}; "
                "fix the objective's target/stable names."
            )

    def distance(self, target: np.ndarray | float) -> np.ndarray:
        """Distance of target values to the window (0 inside), in the target's unit; shape of ``target``."""
        t = np.asarray(target, dtype=float)
        return np.maximum(np.maximum(self.low - t, t - self.high), 0.0)

    def excess(self, stable: np.ndarray | float) -> np.ndarray:
        """How far stability values exceed ``stable_max`` (0 when stable or ungated); shape of ``stable``."""
        s = np.asarray(stable, dtype=float)
        if self.stable_max is None:
            return np.zeros_like(s)
        return np.maximum(s - self.stable_max, 0.0)

    def margins(self, target: np.ndarray, stable: np.ndarray | None = None) -> np.ndarray:
        """Signed margins in units of the scales, shape (n, 1) or (n, 2) with the stability gate.

        Target: max(low - t, t - high) / target_scale (negative inside the window: minus the distance to its
        nearer edge). Stability: (s - stable_max) / stable_scale. A hit has every margin <= 0, and
        desirability = -sum(max(margin, 0)).
        """
        t = np.asarray(target, dtype=float).reshape(-1)
        columns = [np.maximum(self.low - t, t - self.high) / self.target_scale]
        if self.stable is not None:
            if stable is None:
                raise OptimizationError(f"objective is gated by {self.stable!r}: pass its values.")
            columns.append((np.asarray(stable, dtype=float).reshape(-1) - self.stable_max) / self.stable_scale)
        return np.stack(columns, axis=1)

    def desirability_array(self, target: np.ndarray, stable: np.ndarray | None = None) -> np.ndarray:
        """Vectorised :meth:`desirability` over label arrays of shape (n,)."""
        value = -self.distance(target) / self.target_scale
        if self.stable is not None:
            if stable is None:
                raise OptimizationError(f"objective is gated by {self.stable!r}: pass its values.")
            value = value - self.excess(stable) / self.stable_scale
        return value

    def hit_array(self, target: np.ndarray, stable: np.ndarray | None = None) -> np.ndarray:
        """Vectorised :meth:`is_hit` over label arrays of shape (n,): boolean array (n,)."""
        hit = self.distance(target) == 0.0
        if self.stable is not None:
            if stable is None:
                raise OptimizationError(f"objective is gated by {self.stable!r}: pass its values.")
            hit &= self.excess(stable) == 0.0
        return hit

    def _values(self, labels: Mapping[str, float]) -> tuple[float, float | None]:
        self.check_columns(list(labels))
        target = float(labels[self.target])
        stable = None if self.stable is None else float(labels[self.stable])
        if not math.isfinite(target) or (stable is not None and not math.isfinite(stable)):
            raise OptimizationError(f"labels {dict(labels)} have a non-finite value; drop or fix the item.")
        return target, stable

    def desirability(self, labels: Mapping[str, float]) -> float:
        """0 for a hit, else -distance(target)/target_scale - max(0, stable - stable_max)/stable_scale."""
        target, stable = self._values(labels)
        return float(self.desirability_array(np.array([target]), None if stable is None else np.array([stable]))[0])

    def is_hit(self, labels: Mapping[str, float]) -> bool:
        """True when the target is inside the window and the stability gate (if any) passes."""
        target, stable = self._values(labels)
        return bool(self.hit_array(np.array([target]), None if stable is None else np.array([stable]))[0])

    def objectives_2d(self, labels: Mapping[str, float]) -> tuple[float, float]:
        """(stability value, distance of the target to its window): both to minimise, units of the labels.

        Raises:
            OptimizationError: the objective has no stability label.
        """
        if self.stable is None:
            raise OptimizationError(f"objective on {self.target!r} has no stability label: set stable/stable_max.")
        target, stable = self._values(labels)
        return float(stable), float(self.distance(target))

    def as_dict(self) -> dict[str, Any]:
        """Plain dict of the fields (infinite window edges stay float inf)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> WindowObjective:
        """Inverse of :meth:`as_dict`."""
        values = dict(data)
        for key in ("low", "high", "target_scale", "stable_scale"):
            if key in values:
                values[key] = float(values[key])
        if values.get("stable_max") is not None:
            values["stable_max"] = float(values["stable_max"])
        return cls(**values)


def photovoltaic(target: str = "gap", stable: str = "e_hull") -> WindowObjective:
    """Photovoltaic absorber: 1.1 <= gap <= 1.8 eV and E_hull <= 0.05 eV/atom."""
    return WindowObjective(target=target, low=1.1, high=1.8, stable=stable, stable_max=0.05)


def power_electronics(target: str = "gap", stable: str = "e_hull") -> WindowObjective:
    """Wide-gap power electronics: gap >= 3 eV and E_hull <= 0.05 eV/atom."""
    return WindowObjective(target=target, low=3.0, high=math.inf, stable=stable, stable_max=0.05)


def label_arrays(
    labels: Sequence[Mapping[str, float]] | Mapping[str, Sequence[float] | np.ndarray],
    objective: WindowObjective,
) -> dict[str, np.ndarray]:
    """The objective's label columns as float arrays of shape (n,), from rows of mappings or named columns.

    ``labels`` may be a sequence of per-candidate mappings, a mapping of column name to values, or a pandas
    DataFrame.

    Raises:
        OptimizationError: a needed column is missing (listing the available ones) or a value is not finite
            (naming the row).
    """
    named = isinstance(labels, Mapping) or hasattr(labels, "columns")  # named columns, a pandas DataFrame too
    rows = [] if named else list(labels)  # type: ignore[arg-type]
    objective.check_columns(list(labels) if named else (list(rows[0]) if rows else []))
    out = {}
    for c in objective.columns:
        try:
            values = labels[c] if named else [r[c] for r in rows]  # type: ignore[index, call-overload]
            out[c] = np.asarray(values, dtype=float).reshape(-1)
        except (TypeError, ValueError) as exc:
            raise OptimizationError(
                f"label column {c!r} has non-numeric values ({exc}); convert it (e.g. pandas.to_numeric with "
                "errors='coerce') and drop the rows that fail."
            ) from exc
    lengths = {c: len(v) for c, v in out.items()}
    if len(set(lengths.values())) > 1:
        raise OptimizationError(f"label columns differ in length: {lengths}; give one value per candidate.")
    for column, values in out.items():
        bad = np.flatnonzero(~np.isfinite(values))
        if bad.size:
            raise OptimizationError(
                f"label column {column!r} has non-finite values at rows {bad[:10].tolist()}; drop those rows."
            )
    return out


def method_targets(method: Method, objective: WindowObjective, labels: Mapping[str, np.ndarray]) -> np.ndarray:
    """The ``y`` that :func:`propose_batch` expects for ``method``, from :func:`label_arrays` output.

    ``"bo"``, ``"greedy"``, ``"random"``: desirability, shape (n,), to maximise. ``"bo-pareto"``:
    (stability, distance), shape (n, 2), to minimise. ``"bo-hit"``: raw (target, stability) labels, shape
    (n, 2), or (n, 1) without a stability gate.
    """
    _check_method(method)
    target = labels[objective.target]
    stable = None if objective.stable is None else labels[objective.stable]
    if method == "bo-pareto":
        if stable is None:
            raise OptimizationError("method 'bo-pareto' needs an objective with a stability label (stable=...).")
        return np.stack([stable, objective.distance(target)], axis=1)
    if method == "bo-hit":
        return np.stack([target] if stable is None else [target, stable], axis=1)
    return objective.desirability_array(target, stable)


# ---------------------------------------------------------------------------------------------------------
# Surrogates
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AcquisitionSettings:
    """Science parameters of the surrogate and acquisition (logged with every campaign).

    Attributes:
        kernel: ``"matern"`` (Matern-5/2) or ``"rbf"`` (BoTorch's own default); ARD, dimension-scaled prior.
            Matern-5/2 ranked hits better than RBF on the perovskite benchmark.
        mc_samples: quasi-MC samples for the MC acquisitions.
        prefilter: MC acquisitions only score this many remaining candidates with the highest UCB (None: all).
        ucb_beta: sigma multiplier of the UCB used for the shortlist.
        max_batch_size: candidates per acquisition forward pass (memory bound).
        margin_clip: ``"bo-hit"`` models each label's signed margin in units of the objective's scales
            (:meth:`WindowObjective.margins`: negative inside the window / below the gate), clipped above at this
            value so that far-off candidates (a 4 eV/atom E_hull, a metal for a 1.5 eV window) do not dominate
            the fit; None models the raw labels instead.
        fit_maxiter: L-BFGS-B iterations when fitting GP hyperparameters (the marginal likelihood is within
            ~1 % of its converged value after ~50 on pools of thousands; caps the cost of large d).
        categorical_columns: pool feature columns holding category codes, e.g. the element at each written site
            (:func:`materials.ml.features.site_element_columns` of the ``sites`` feature set); they get a categorical
            kernel that compares codes for equality only (:func:`site_kernel`); () for none. A column constant
            over the pool is dropped like any constant feature.
        categorical_kernel: how the categorical kernel joins the continuous one (:func:`site_kernel`): ``"sum"``
            (measured best on the perovskite benchmark), ``"mixed"`` or ``"additive"``.
        surrogate: ``"gp"`` (BoTorch ``SingleTaskGP``) or ``"forest"`` (``"bo-hit"`` only: a scikit-learn random
            forest per margin; mean and spread over its trees, :func:`forest_mean_std`). With few observations in
            many feature dimensions the forest picks the informative features where the GP's ARD cannot yet.
        forest_trees, forest_max_features: trees per forest and the fraction of features each split considers.
        forest_min_std: added to the spread over trees (margin units), so that a candidate on which every tree
            agrees still has some uncertainty.
        known_objectives: ``"bo-pareto"`` only: pool feature columns whose values are further objectives to
            minimise, known for every candidate before it is evaluated (the production HHI of
            :mod:`materials.datasets.sustainability`); each becomes one more axis of the hypervolume, modelled by a
            GP fitted to its known values at the training and shortlisted candidates (so it is exact where it is
            scored).
    """

    kernel: Literal["rbf", "matern"] = "matern"
    mc_samples: int = 128
    prefilter: int | None = 128
    ucb_beta: float = 2.0
    max_batch_size: int = 512
    fit_maxiter: int = 75
    margin_clip: float | None = 3.0
    categorical_columns: tuple[int, ...] = ()
    categorical_kernel: Literal["sum", "mixed", "additive"] = "sum"
    surrogate: Literal["gp", "forest"] = "gp"
    forest_trees: int = 100
    forest_max_features: float = 0.3
    forest_min_std: float = 0.05
    known_objectives: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.surrogate not in ("gp", "forest"):
            raise OptimizationError(f"surrogate {self.surrogate!r} unknown; use 'gp' or 'forest'.")
        if self.forest_trees < 2 or not 0 < self.forest_max_features <= 1 or not self.forest_min_std >= 0:
            raise OptimizationError(
                "forest settings need forest_trees >= 2, 0 < forest_max_features <= 1 and forest_min_std >= 0; got "
                f"{self.forest_trees}, {self.forest_max_features}, {self.forest_min_std}."
            )
        if self.kernel not in ("rbf", "matern"):
            raise OptimizationError(f"kernel {self.kernel!r} unknown; use 'rbf' or 'matern'.")
        if self.categorical_kernel not in ("sum", "mixed", "additive"):
            raise OptimizationError(
                f"categorical_kernel {self.categorical_kernel!r} unknown; use 'sum', 'mixed' or 'additive'."
            )
        columns = tuple(self.categorical_columns)
        if any(not isinstance(c, int | np.integer) or c < 0 for c in columns) or len(set(columns)) != len(columns):
            raise OptimizationError(
                f"categorical_columns must be distinct non-negative column indices; got {self.categorical_columns}."
            )
        object.__setattr__(self, "categorical_columns", tuple(int(c) for c in columns))
        known = tuple(self.known_objectives)
        if any(not isinstance(c, int | np.integer) or c < 0 for c in known) or len(set(known)) != len(known):
            raise OptimizationError(
                f"known_objectives must be distinct non-negative column indices; got {self.known_objectives}."
            )
        object.__setattr__(self, "known_objectives", tuple(int(c) for c in known))
        if self.margin_clip is not None and not self.margin_clip > 0:
            raise OptimizationError(f"margin_clip must be positive or None; got {self.margin_clip}.")
        if self.mc_samples < 1 or (self.prefilter is not None and self.prefilter < 1) or self.max_batch_size < 1:
            raise OptimizationError(f"AcquisitionSettings needs positive sizes; got {self}.")


def site_kernel(
    d: int,
    categorical: Sequence[int],
    kernel: str = "matern",
    combine: Literal["sum", "mixed", "additive"] = "sum",
) -> Kernel:
    """Covariance over ``d`` input columns of which ``categorical`` hold category codes (e.g. the element at a site).

    The continuous columns get an ARD Matern-5/2 (or RBF) kernel with BoTorch's dimension-scaled lengthscale
    prior; the categorical columns BoTorch's ``CategoricalKernel``, exp(-mean_j [x_j != x'_j] / l_j), which is 1
    when every categorical column matches and only compares codes for equality (their order and spacing carry no
    meaning). ``combine="sum"``: s1 k_cont + s2 k_cat; ``"mixed"``: s1 (k_cont + s2 k_cat) + s3 k_cont k_cat
    (the structure of BoTorch's ``MixedSingleTaskGP``). With no categorical column: the plain continuous kernel.

    Raises:
        OptimizationError: a categorical index outside [0, d), every column categorical, or an unknown combine.
    """
    cat = sorted({int(c) for c in categorical})
    if any(not 0 <= c < d for c in cat):
        raise OptimizationError(f"categorical columns {cat} must lie in [0, {d}).")
    use_rbf = kernel == "rbf"
    if not cat:
        return get_covar_module_with_dim_scaled_prior(ard_num_dims=d, use_rbf_kernel=use_rbf)
    cont = [j for j in range(d) if j not in cat]
    if not cont:
        raise OptimizationError(f"all {d} columns are categorical; keep at least one continuous feature.")
    if combine not in ("sum", "mixed", "additive"):
        raise OptimizationError(f"combine {combine!r} unknown; use 'sum', 'mixed' or 'additive'.")

    def continuous() -> Kernel:
        return get_covar_module_with_dim_scaled_prior(ard_num_dims=len(cont), use_rbf_kernel=use_rbf, active_dims=cont)

    def categories() -> Kernel:
        return CategoricalKernel(ard_num_dims=len(cat), active_dims=cat, lengthscale_constraint=GreaterThan(1e-6))

    if combine == "sum":
        return ScaleKernel(continuous()) + ScaleKernel(categories())
    if combine == "additive":
        return ScaleKernel(continuous()) + AdditiveKernel(
            *(ScaleKernel(CategoricalKernel(active_dims=[c], lengthscale_constraint=GreaterThan(1e-6))) for c in cat)
        )
    return ScaleKernel(continuous() + ScaleKernel(categories())) + ScaleKernel(continuous() * categories())


def fit_gp(
    X: torch.Tensor,
    y: torch.Tensor,
    bounds: torch.Tensor,
    kernel: str = "matern",
    maxiter: int | None = 75,
    categorical: Sequence[int] = (),
    combine: Literal["sum", "mixed", "additive"] = "sum",
) -> SingleTaskGP:
    """Fit a SingleTaskGP to one outcome.

    Args:
        X: inputs, shape (n, d), float64.
        y: outcome, shape (n, 1), float64.
        bounds: per-feature (min, max) used by the Normalize input transform, shape (2, d).
        kernel: ``"rbf"`` or ``"matern"`` (Matern-5/2), ARD with BoTorch's dimension-scaled lengthscale prior.
        maxiter: cap on L-BFGS-B iterations of the hyperparameter fit (None: scipy's default).
        categorical: columns of X holding category codes, compared for equality only (:func:`site_kernel`).
        combine: how the continuous and categorical kernels combine (:func:`site_kernel`).
    """
    d = X.shape[-1]
    covar = site_kernel(d, categorical, kernel, combine)
    model = SingleTaskGP(
        X,
        y,
        covar_module=covar,
        input_transform=Normalize(d=d, bounds=bounds),
        outcome_transform=Standardize(m=1),
    )
    mll = ExactMarginalLogLikelihood(model.likelihood, model)
    with warnings.catch_warnings():
        # jitter notices (duplicated rows) and failed-attempt notices: fit_gpytorch_mll retries and raises
        # ModelFittingError when every attempt fails
        for category in (NumericalWarning, OptimizationWarning, InputDataWarning):
            warnings.simplefilter("ignore", category)
        options = {} if maxiter is None else {"optimizer_kwargs": {"options": {"maxiter": maxiter}}}
        fit_gpytorch_mll(mll, **options)
    model.eval()
    return model


def gp_info(model: SingleTaskGP, prefix: str = "") -> dict[str, float]:
    """Hyperparameters of a fitted GP: lengthscale median/min/max (normalised inputs), noise, outputscale.

    Noise and outputscale are in standardised outcome units; the outputscale is 1.0 when the kernel has no
    ScaleKernel (BoTorch's default since outcomes are standardised).
    """
    covar = model.covar_module
    outputscale = 1.0
    if hasattr(covar, "outputscale"):
        outputscale = float(covar.outputscale.detach().reshape(-1)[0])
        covar = covar.base_kernel
    if getattr(covar, "lengthscale", None) is None or isinstance(covar, CategoricalKernel):  # site_kernel sum
        covar = next(k for k in model.covar_module.modules() if isinstance(k, MaternKernel | RBFKernel))
    lengthscale = covar.lengthscale.detach().reshape(-1).cpu().numpy()
    noise = float(model.likelihood.noise.detach().reshape(-1)[0])
    info = {
        f"{prefix}lengthscale_median": float(np.median(lengthscale)),
        f"{prefix}lengthscale_min": float(lengthscale.min()),
        f"{prefix}lengthscale_max": float(lengthscale.max()),
        f"{prefix}noise": noise,
        f"{prefix}outputscale": outputscale,
    }
    categorical = [k for k in model.covar_module.modules() if isinstance(k, CategoricalKernel)]
    if categorical:
        cat_lengthscale = categorical[0].lengthscale.detach().reshape(-1).cpu().numpy()
        info[f"{prefix}categorical_lengthscale_median"] = float(np.median(cat_lengthscale))
    return info


def _mean_std(model: SingleTaskGP, X: torch.Tensor, observation_noise: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Posterior mean and standard deviation at X (n, d) in outcome units, each shape (n,).

    Evaluated in chunks of rows: the joint posterior of thousands of points at once builds their full test-test
    kernel matrix (n^2) although only its diagonal is needed (6x slower for n = 5,000).
    """
    means, stds = [], []
    with torch.no_grad():
        for chunk in X.split(_POSTERIOR_CHUNK):
            post = model.posterior(chunk, observation_noise=observation_noise)
            means.append(post.mean.reshape(-1))
            stds.append(post.variance.clamp_min(1e-18).sqrt().reshape(-1))
    return torch.cat(means).numpy(), torch.cat(stds).numpy()


# ---------------------------------------------------------------------------------------------------------
# Proposals
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Proposal:
    """The next batch: pool indices in selection order, their acquisition values and the surrogate's state.

    Attributes:
        indices: pool row indices, length <= q.
        acquisition_values: one per index (method-dependent units: log-EI/log-EHVI for the MC methods,
            probability of a hit for ``"bo-hit"``, posterior mean for ``"greedy"``, NaN for ``"random"``).
        model_info: GP hyperparameters (:func:`gp_info`, prefixed per objective for two-GP methods).
        method: the method that proposed.
        seed: the seed used.
    """

    indices: list[int]
    acquisition_values: list[float]
    model_info: dict[str, float] = field(default_factory=dict)
    method: str = "bo"
    seed: int = 0

    def as_dict(self) -> dict[str, Any]:
        """Plain dict (JSON-friendly apart from NaN acquisition values of ``"random"``)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Proposal:
        """Inverse of :meth:`as_dict`."""
        return cls(
            indices=[int(i) for i in data["indices"]],
            acquisition_values=[float(v) for v in data["acquisition_values"]],
            model_info={str(k): float(v) for k, v in data.get("model_info", {}).items()},
            method=str(data.get("method", "bo")),
            seed=int(data.get("seed", 0)),
        )


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise OptimizationError(f"method {method!r} unknown; choose one of {list(METHODS)}.")


def _check_pool(X_pool: np.ndarray) -> np.ndarray:
    X = np.asarray(X_pool, dtype=np.float64)
    if X.ndim != 2 or X.shape[0] == 0 or X.shape[1] == 0:
        raise OptimizationError(f"X_pool must have shape (n_pool, d) with n_pool, d >= 1; got {X.shape}.")
    if not np.all(np.isfinite(X)):
        rows = np.flatnonzero(~np.all(np.isfinite(X), axis=1))[:10].tolist()
        raise OptimizationError(f"X_pool has non-finite features in rows {rows}; impute or drop them first.")
    return X


def _informative_columns(X: np.ndarray) -> np.ndarray:
    """Columns that vary over the pool (constant ones carry no information and break normalisation)."""
    keep = np.ptp(X, axis=0) > 0
    if not keep.any():
        raise OptimizationError("every feature is constant over the pool; the surrogate cannot tell candidates apart.")
    return keep


def _match_rows(chosen: torch.Tensor, choices: torch.Tensor, choice_index: np.ndarray) -> list[int]:
    """Pool indices of chosen rows; duplicated rows (equal features) map to distinct indices in order."""
    used: set[int] = set()
    out = []
    for row in chosen:
        matches = torch.nonzero((choices == row).all(dim=-1)).reshape(-1).tolist()
        j = next(m for m in matches if m not in used)
        used.add(j)
        out.append(int(choice_index[j]))
    return out


def propose_batch(
    X_pool: np.ndarray,
    evaluated: Sequence[int],
    y: np.ndarray,
    q: int,
    method: Method,
    seed: int,
    objective: WindowObjective | None = None,
    settings: AcquisitionSettings | None = None,
) -> Proposal:
    """Propose the next q pool candidates to evaluate; evaluated ones are never proposed again.

    Args:
        X_pool: features of the whole pool, shape (n_pool, d); constant columns are ignored.
        evaluated: pool indices already evaluated, length n (distinct).
        y: observations of the evaluated candidates in the order of ``evaluated``
            (see :func:`method_targets`): shape (n,) scalar to maximise for ``"bo"``/``"greedy"``
            (ignored by ``"random"``); (n, 2) (stability, distance) to minimise for ``"bo-pareto"``;
            (n, 2) raw (target, stability) labels, or (n, 1) without a gate, for ``"bo-hit"``.
        q: batch size; fewer are returned when fewer candidates remain.
        method: one of :data:`METHODS`.
        seed: seeds numpy and torch inside the call (the caller's global RNG state is left untouched).
        objective: the window and gate; required by ``"bo-hit"``.
        settings: surrogate/acquisition parameters (defaults: :class:`AcquisitionSettings`).

    Raises:
        OptimizationError: unknown method, bad shapes, repeated or out-of-range indices, fewer than two
            observations for a model-based method, or no candidate left.
    """
    _check_method(method)
    settings = settings or AcquisitionSettings()
    X = _check_pool(X_pool)
    n_pool = X.shape[0]
    evaluated_idx = np.asarray(list(evaluated), dtype=np.int64).reshape(-1)
    if evaluated_idx.size and (evaluated_idx.min() < 0 or evaluated_idx.max() >= n_pool):
        raise OptimizationError(f"evaluated indices must lie in [0, {n_pool}); got {evaluated_idx.tolist()[:10]}...")
    if len(np.unique(evaluated_idx)) != len(evaluated_idx):
        raise OptimizationError("evaluated indices repeat; pass each evaluated pool index once.")
    if q < 1:
        raise OptimizationError(f"q must be >= 1; got {q}.")
    mask = np.ones(n_pool, dtype=bool)
    mask[evaluated_idx] = False
    available = np.flatnonzero(mask)
    if available.size == 0:
        raise OptimizationError("no candidate left in the pool: every index has been evaluated.")
    q = min(q, available.size)

    if settings.surrogate == "forest" and method not in ("bo-hit", "random"):
        raise OptimizationError(f"surrogate 'forest' is implemented for method 'bo-hit' only; got {method!r}.")
    if method == "random":
        rng = np.random.default_rng([seed, evaluated_idx.size])
        picks = rng.choice(available, size=q, replace=False)
        return Proposal([int(i) for i in picks], [math.nan] * q, {}, method, seed)

    Y = np.asarray(y, dtype=np.float64)
    expected_cols = {"bo": 1, "greedy": 1, "bo-pareto": 2}.get(method)
    if method == "bo-hit":
        if objective is None:
            raise OptimizationError("method 'bo-hit' needs the objective (window and stability gate).")
        expected_cols = len(objective.columns)
    Y = Y.reshape(len(Y), -1) if Y.ndim <= 2 else Y
    if Y.shape != (evaluated_idx.size, expected_cols):
        raise OptimizationError(
            f"method {method!r} expects y of shape ({evaluated_idx.size}, {expected_cols}) (one row per evaluated "
            f"index); got {np.shape(y)}. Build it with method_targets()."
        )
    if evaluated_idx.size < 2:
        raise OptimizationError(
            f"method {method!r} needs at least 2 observations to fit a GP; got {evaluated_idx.size}. "
            "Start with initial_design()."
        )
    if not np.all(np.isfinite(Y)):
        raise OptimizationError("y has non-finite values; drop or fix those observations.")

    keep = _informative_columns(X)
    bad = [c for c in settings.categorical_columns if c >= X.shape[1]]
    if bad:
        raise OptimizationError(f"categorical_columns {bad} are past the pool's {X.shape[1]} feature columns.")
    position = np.cumsum(keep) - 1  # column of X -> column of X[:, keep]
    categorical = tuple(int(position[c]) for c in settings.categorical_columns if keep[c])
    if categorical and len(categorical) == int(keep.sum()):
        categorical = ()  # nothing continuous left: treat the codes as plain numbers
    bad = [c for c in settings.known_objectives if c >= X.shape[1]]
    if bad:
        raise OptimizationError(f"known_objectives {bad} are past the pool's {X.shape[1]} feature columns.")
    # a known objective constant over the pool cannot change the hypervolume ranking: dropped with its column
    known = tuple(int(position[c]) for c in settings.known_objectives if keep[c])
    settings = replace(settings, categorical_columns=categorical, known_objectives=known)
    Xt = torch.as_tensor(X[:, keep], dtype=_DTYPE)
    bounds = torch.stack([Xt.min(dim=0).values, Xt.max(dim=0).values])
    X_train = Xt[evaluated_idx]
    X_avail = Xt[available]
    Y_t = torch.as_tensor(Y, dtype=_DTYPE)

    with torch.random.fork_rng(), warnings.catch_warnings():
        torch.manual_seed(seed)
        # "added jitter to the diagonal" notices: expected with duplicated feature rows (same composition)
        warnings.simplefilter("ignore", NumericalWarning)
        if method == "bo-hit":
            return _propose_hit(X_train, Y_t, X_avail, available, bounds, q, seed, objective, settings)
        if method == "bo-pareto":
            return _propose_pareto(X_train, Y_t, X_avail, available, bounds, q, seed, settings)
        model = fit_gp(X_train, Y_t, bounds, **_gp_options(settings))
        info = gp_info(model)
        mean, std = _mean_std(model, X_avail)
        if method == "greedy":
            order = np.argsort(-mean, kind="stable")[:q]
            return Proposal([int(available[i]) for i in order], [float(mean[i]) for i in order], info, method, seed)
        shortlist = _shortlist([mean + settings.ucb_beta * std], settings.prefilter)
        choices = X_avail[shortlist]
        acq = qLogNoisyExpectedImprovement(
            model=model,
            X_baseline=X_train,
            sampler=SobolQMCNormalSampler(sample_shape=torch.Size([settings.mc_samples]), seed=seed),
            prune_baseline=True,
        )
        chosen, values = optimize_acqf_discrete(
            acq, q=q, choices=choices, max_batch_size=settings.max_batch_size, unique=True
        )
        indices = _match_rows(chosen, choices, available[shortlist])
        return Proposal(indices, [float(v) for v in values.reshape(-1)], info, method, seed)


def _gp_options(settings: AcquisitionSettings) -> dict[str, Any]:
    """:func:`fit_gp` keyword arguments from the settings (categorical columns already mapped to kept columns)."""
    return {
        "kernel": settings.kernel,
        "maxiter": settings.fit_maxiter,
        "categorical": settings.categorical_columns,
        "combine": settings.categorical_kernel,
    }


def _shortlist(scores: Sequence[np.ndarray], size: int | None) -> np.ndarray:
    """Positions of the union of the top ``size // len(scores)`` entries of each score (all if size is None)."""
    n = len(scores[0])
    if size is None or size >= n:
        return np.arange(n)
    per = max(size // len(scores), 1)
    picked = np.unique(np.concatenate([np.argsort(-s, kind="stable")[:per] for s in scores]))
    return picked


def log_window_probability(mean: np.ndarray, std: np.ndarray, low: float, high: float) -> np.ndarray:
    """log P(low <= t <= high) for t ~ N(mean, std^2), elementwise (shape of ``mean``), accurate in both tails.

    Probabilities below ~1e-16 of the window's larger tail term are floored there (log ~ -36.8).
    """
    mean = np.asarray(mean, dtype=float)
    std = np.asarray(std, dtype=float)

    def log_diff(log_a: np.ndarray, log_b: np.ndarray) -> np.ndarray:  # log(exp(a) - exp(b)), a >= b
        return log_a + np.log1p(-np.exp(np.minimum(log_b - log_a, 0.0)).clip(max=1.0 - 1e-16))

    z_low = (low - mean) / std
    z_high = (high - mean) / std
    # P = Phi(z_high) - Phi(z_low) = Phi(-z_low) - Phi(-z_high): take the form whose terms are small (no
    # cancellation of two numbers near 1): survival functions when the mean is below the window, CDFs above
    mean_below = log_diff(log_ndtr(-z_low), log_ndtr(-z_high))
    mean_above = log_diff(log_ndtr(z_high), log_ndtr(z_low))
    middle = 0.5 * (low + high) if math.isfinite(low) and math.isfinite(high) else (low if math.isfinite(low) else high)
    return np.where(mean <= middle, mean_below, mean_above)


def log_hit_probability(
    objective: WindowObjective,
    target_mean: np.ndarray,
    target_std: np.ndarray,
    stable_mean: np.ndarray | None = None,
    stable_std: np.ndarray | None = None,
) -> np.ndarray:
    """log P(hit) of candidates from independent Gaussian predictions of the target and stability labels.

    log P(low <= target <= high) + log P(stable <= stable_max); all arrays shape (n,), in label units.

    Raises:
        OptimizationError: the objective has a stability gate but no stability prediction was given.
    """
    log_p = log_window_probability(target_mean, target_std, objective.low, objective.high)
    if objective.stable is not None:
        if stable_mean is None or stable_std is None:
            raise OptimizationError(f"objective is gated by {objective.stable!r}: pass stable_mean and stable_std.")
        z = (objective.stable_max - np.asarray(stable_mean, dtype=float)) / np.asarray(stable_std, dtype=float)
        log_p = log_p + log_ndtr(z)
    return log_p


def forest_mean_std(
    X_train: np.ndarray, y: np.ndarray, X_pred: np.ndarray, settings: AcquisitionSettings, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Random-forest surrogate of one outcome: the mean over trees and their standard deviation plus
    ``settings.forest_min_std``, each of shape (n_pred,). Deterministic for a given ``seed`` (one thread)."""
    from sklearn.ensemble import RandomForestRegressor

    forest = RandomForestRegressor(
        n_estimators=settings.forest_trees,
        max_features=settings.forest_max_features,
        random_state=seed,
        n_jobs=1,
    ).fit(np.asarray(X_train, dtype=np.float64), np.asarray(y, dtype=np.float64).reshape(-1))
    per_tree = np.stack([tree.predict(np.asarray(X_pred, dtype=np.float64)) for tree in forest.estimators_])
    return per_tree.mean(axis=0), per_tree.std(axis=0) + settings.forest_min_std


def _propose_hit(
    X_train: torch.Tensor,
    Y: torch.Tensor,
    X_avail: torch.Tensor,
    available: np.ndarray,
    bounds: torch.Tensor,
    q: int,
    seed: int,
    objective: WindowObjective,
    settings: AcquisitionSettings,
) -> Proposal:
    """Top-q probability of a hit from one surrogate per label (independent predictive Gaussians; a GP's include
    the noise).

    With ``settings.margin_clip`` set, each GP models a clipped signed margin (:meth:`WindowObjective.margins`)
    and P(hit) = prod_j P(margin_j <= 0); otherwise the GPs model the raw labels (:func:`log_hit_probability`).
    """
    info: dict[str, float] = {}
    labels = Y.numpy()
    stable = labels[:, 1] if objective.stable is not None else None
    if settings.margin_clip is not None:
        outcomes = np.minimum(objective.margins(labels[:, 0], stable), settings.margin_clip)
    else:
        outcomes = labels
    means, stds = [], []
    for j, prefix in enumerate(("target_", "stable_")[: outcomes.shape[1]]):
        if settings.surrogate == "forest":
            mean, std = forest_mean_std(X_train.numpy(), outcomes[:, j], X_avail.numpy(), settings, seed)
            info[f"{prefix}forest_trees"] = float(settings.forest_trees)
        else:
            model = fit_gp(X_train, torch.as_tensor(outcomes[:, j : j + 1]), bounds, **_gp_options(settings))
            info.update(gp_info(model, prefix))
            mean, std = _mean_std(model, X_avail, observation_noise=True)
        means.append(mean)
        stds.append(std)
    if settings.margin_clip is not None:
        log_p = sum(log_ndtr(-m / s) for m, s in zip(means, stds, strict=True))
    else:
        log_p = log_hit_probability(objective, means[0], stds[0], *(means[1:] + stds[1:]))
    order = np.argsort(-log_p, kind="stable")[:q]
    return Proposal([int(available[i]) for i in order], [float(np.exp(log_p[i])) for i in order], info, "bo-hit", seed)


def _propose_pareto(
    X_train: torch.Tensor,
    Y: torch.Tensor,
    X_avail: torch.Tensor,
    available: np.ndarray,
    bounds: torch.Tensor,
    q: int,
    seed: int,
    settings: AcquisitionSettings,
) -> Proposal:
    """qLogNEHVI on (-stability, -distance[, -known objective ...]) (BoTorch maximises).

    Reference point: per objective, the worst observed (negated) value minus 10 % of the observed range (or
    minus 1e-3 when all observations are equal), so every observed point contributes hypervolume. Known objectives
    (``settings.known_objectives``, feature columns) enter the shortlist with their exact values and the
    acquisition through a GP fitted to those values at the training and shortlisted candidates.
    """
    neg = -Y
    models = [fit_gp(X_train, neg[:, j : j + 1], bounds, **_gp_options(settings)) for j in range(neg.shape[1])]
    info: dict[str, float] = {}
    for name, m in zip(("stable_", "distance_"), models, strict=True):
        info.update(gp_info(m, name))
    ucbs = []
    for m in models:
        mean, std = _mean_std(m, X_avail)
        ucbs.append(mean + settings.ucb_beta * std)
    ucbs.extend(-X_avail[:, c].numpy() for c in settings.known_objectives)
    shortlist = _shortlist(ucbs, settings.prefilter)
    choices = X_avail[shortlist]
    for k, c in enumerate(settings.known_objectives):
        X_known = torch.cat([X_train, choices])
        models.append(fit_gp(X_known, -X_known[:, c : c + 1], bounds, **_gp_options(settings)))
        info.update(gp_info(models[-1], f"known{k}_"))
        neg = torch.cat([neg, -X_train[:, c : c + 1]], dim=1)
    model = ModelListGP(*models)
    span = neg.max(dim=0).values - neg.min(dim=0).values
    ref_point = neg.min(dim=0).values - torch.where(span > 0, 0.1 * span, torch.full_like(span, 1e-3))
    acq = qLogNoisyExpectedHypervolumeImprovement(
        model=model,
        ref_point=ref_point,
        X_baseline=X_train,
        sampler=SobolQMCNormalSampler(sample_shape=torch.Size([settings.mc_samples]), seed=seed),
        prune_baseline=True,
    )
    chosen, values = optimize_acqf_discrete(
        acq, q=q, choices=choices, max_batch_size=settings.max_batch_size, unique=True
    )
    info.update({f"ref_point_{i}": float(v) for i, v in enumerate(ref_point)})
    indices = _match_rows(chosen, choices, available[shortlist])
    return Proposal(indices, [float(v) for v in values.reshape(-1)], info, "bo-pareto", seed)


# ---------------------------------------------------------------------------------------------------------
# Initial design and campaigns
# ---------------------------------------------------------------------------------------------------------


def initial_design(X_pool: np.ndarray, n_init: int, seed: int, method: InitMethod = "random") -> list[int]:
    """First pool indices to evaluate before any model exists.

    ``"random"``: n_init distinct indices drawn with ``numpy.random.default_rng(seed)``. ``"diverse"``: a
    seeded random first index, then greedily the candidate farthest (Euclidean, features min-max scaled to
    [0, 1] over the pool) from all chosen so far (max-min distance; ties go to the lowest index).

    Raises:
        OptimizationError: n_init outside [1, n_pool] or unknown method.
    """
    X = _check_pool(X_pool)
    n = X.shape[0]
    if not 1 <= n_init <= n:
        raise OptimizationError(f"n_init must be in [1, {n}] (the pool size); got {n_init}.")
    rng = np.random.default_rng(seed)
    if method == "random":
        return [int(i) for i in rng.choice(n, size=n_init, replace=False)]
    if method != "diverse":
        raise OptimizationError(f"initial design {method!r} unknown; use 'random' or 'diverse'.")
    span = np.ptp(X, axis=0)
    Z = (X - X.min(axis=0)) / np.where(span > 0, span, 1.0)
    chosen = [int(rng.integers(n))]
    min_dist = np.linalg.norm(Z - Z[chosen[0]], axis=1)
    min_dist[chosen[0]] = -1.0
    while len(chosen) < n_init:
        nxt = int(np.argmax(min_dist))
        chosen.append(nxt)
        min_dist = np.minimum(min_dist, np.linalg.norm(Z - Z[nxt], axis=1))
        min_dist[chosen] = -1.0
    return chosen


def expected_random_evaluations(n_pool: int, n_hits: int, k: int) -> float:
    """Expected evaluations random search (without replacement) needs to find k of n_hits hits in n_pool.

    The negative hypergeometric mean: k (N + 1) / (H + 1).

    Raises:
        OptimizationError: unless 1 <= k <= n_hits <= n_pool.
    """
    if not 1 <= k <= n_hits <= n_pool:
        raise OptimizationError(f"need 1 <= k <= n_hits <= n_pool; got k={k}, n_hits={n_hits}, n_pool={n_pool}.")
    return k * (n_pool + 1) / (n_hits + 1)


def simulate_campaign(
    X_pool: np.ndarray,
    labels: Sequence[Mapping[str, float]] | Mapping[str, Sequence[float] | np.ndarray],
    objective: WindowObjective,
    method: Method,
    q: int,
    n_init: int,
    seed: int,
    max_evaluations: int | None = None,
    target_hits: int | None = None,
    init_method: InitMethod = "random",
    settings: AcquisitionSettings | None = None,
) -> dict[str, Any]:
    """Replay a campaign on a fully labelled pool (no evaluation cost): initial design, then batches of q.

    The campaign stops after the batch in which ``target_hits`` hits are reached, when ``max_evaluations``
    (default: the pool size) are spent (the last batch is shrunk to fit), or when the pool is exhausted.
    ``"random"`` always uses a random initial design, whatever ``init_method``.

    Args:
        X_pool: features, shape (n_pool, d).
        labels: per candidate, the objective's label columns (rows of mappings or named arrays of length n_pool).
        objective: window and gate that define a hit.
        method, q, seed, settings: as :func:`propose_batch`; n_init, init_method: as :func:`initial_design`.

    Returns:
        dict with ``order`` (pool indices in evaluation order; within a batch, in selection order),
        ``hits`` (cumulative hits after each evaluation), ``evaluations_to_target`` (1-based position of the
        target_hits-th hit, None if not reached), ``batch_evaluations_to_target`` (evaluations spent when the
        batch holding it completes), ``n_hits_pool``, ``iteration_seconds`` (wall time of each proposal, s),
        ``model_info`` (per iteration) and the run parameters.

    Raises:
        OptimizationError: bad labels (missing column, non-finite values, length differs from the pool),
            a budget smaller than the initial design, or the arguments :func:`propose_batch` rejects.
    """
    _check_method(method)
    X = _check_pool(X_pool)
    n_pool = X.shape[0]
    cols = label_arrays(labels, objective)
    if len(cols[objective.target]) != n_pool:
        raise OptimizationError(
            f"labels have {len(cols[objective.target])} rows but X_pool has {n_pool}; give one label row per candidate."
        )
    budget = n_pool if max_evaluations is None else int(max_evaluations)
    if budget < n_init:
        raise OptimizationError(
            f"max_evaluations={budget} is smaller than the initial design n_init={n_init}; raise the budget or "
            "shrink n_init."
        )
    hit = objective.hit_array(cols[objective.target], None if objective.stable is None else cols[objective.stable])
    y_all = method_targets(method, objective, cols)

    order = initial_design(X, n_init, seed, "random" if method == "random" else init_method)
    seconds: list[float] = []
    infos: list[dict[str, float]] = []
    batch_ends = [len(order)]

    def reached() -> bool:
        return target_hits is not None and int(hit[order].sum()) >= target_hits

    while not reached() and len(order) < min(budget, n_pool):
        start = time.perf_counter()
        proposal = propose_batch(
            X, order, y_all[order], min(q, budget - len(order)), method, seed, objective=objective, settings=settings
        )
        seconds.append(time.perf_counter() - start)
        infos.append(proposal.model_info)
        order.extend(proposal.indices)
        batch_ends.append(len(order))

    cumulative = np.cumsum(hit[order]).astype(int)
    to_target = batch_to_target = None
    if target_hits is not None and cumulative.size and cumulative[-1] >= target_hits:
        to_target = int(np.argmax(cumulative >= target_hits)) + 1
        batch_to_target = next(end for end in batch_ends if end >= to_target)
    return {
        "method": method,
        "seed": seed,
        "q": q,
        "n_init": n_init,
        "init_method": "random" if method == "random" else init_method,
        "target_hits": target_hits,
        "order": [int(i) for i in order],
        "hits": cumulative.tolist(),
        "evaluations_to_target": to_target,
        "batch_evaluations_to_target": batch_to_target,
        "n_hits_pool": int(hit.sum()),
        "n_pool": n_pool,
        "iteration_seconds": seconds,
        "model_info": infos,
    }
