"""Descriptors of candidates for the Bayesian-optimisation surrogate: pure functions, offline data only.

Three groups, each a ``dict[str, float]`` so that callers can mix and stack them:

* **composition** (:func:`composition_features`): element properties shipped with pymatgen, aggregated over
  the formula with atomic fractions as weights (mean, std, min, max, range), plus a few properties of the
  fractions themselves. Works from the formula alone, so it applies to any labelled pool.
* **structure** (:func:`structure_features`): volume per atom, density, coordination and nearest-neighbour
  distances of a (relaxed) structure.
* **screening** outputs (E_form, E_hull, predicted gap and its sigma) passed in by the caller and combined by
  :func:`candidate_features`, which takes an explicit ``exclude`` list so that a featuriser never reads the
  label it is asked to predict.

Missing element data: an element pymatgen knows but that lacks a property (e.g. the ionic radius of a noble gas,
the melting point of a superheavy element) gets that property's mean over the elements Z = 1..103 that have
it (:data:`ELEMENT_PROPERTIES` documents each property). Only unparseable formulas and unknown element symbols
raise :class:`FeatureError`.
"""

from __future__ import annotations

import functools
import math
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType

import numpy as np
from pymatgen.core import Composition, Element, Structure

from materials.composition import FormulaError, parse_composition, written_elements
from materials.ml.elements import ELEMENT_PROPERTIES, FeatureError, element_properties

#: Statistics of each element property over a composition (weights: atomic fractions).
STATISTICS: tuple[str, ...] = ("mean", "std", "min", "max", "range")

#: Properties of the fractions alone (independent of the elements).
FRACTION_FEATURES: tuple[str, ...] = ("n_elements", "max_fraction", "fraction_l2", "fraction_l3")


def _composition(formula: str) -> Composition:
    """:func:`materials.composition.parse_composition`, its error as a :class:`FeatureError`."""
    try:
        return parse_composition(formula)
    except FormulaError as exc:
        raise FeatureError(str(exc)) from None


def _written_elements(formula: str) -> list[tuple[str, float]]:
    """:func:`materials.composition.written_elements`, its error as a :class:`FeatureError`."""
    try:
        return written_elements(formula)
    except FormulaError as exc:
        raise FeatureError(str(exc)) from None


def composition_feature_names() -> list[str]:
    """Names of :func:`composition_features`, in order: ``"<property>_<statistic>"`` then fraction features."""
    return [f"{p}_{s}" for p in ELEMENT_PROPERTIES for s in STATISTICS] + list(FRACTION_FEATURES)


def composition_features(formula: str) -> dict[str, float]:
    """Composition descriptors of a formula from offline element data.

    For each property in :data:`ELEMENT_PROPERTIES`: the atomic-fraction-weighted mean and standard deviation,
    and the min, max and range (max - min) over the elements present, named ``"<property>_<statistic>"``
    (units as in :data:`ELEMENT_PROPERTIES`). Then :data:`FRACTION_FEATURES`: number of elements, largest atomic
    fraction, and the L2 and L3 norms of the fractions. Example: GaAs has ``electronegativity_mean`` =
    (1.81 + 2.18) / 2.

    Raises:
        FeatureError: unparseable or empty formula, or an unknown element, naming the formula.
    """
    comp = _composition(formula)
    amounts = comp.get_el_amt_dict()
    symbols = sorted(amounts)
    fractions = np.array([amounts[s] for s in symbols], dtype=float)
    fractions /= fractions.sum()
    props = [element_properties(s) for s in symbols]
    out: dict[str, float] = {}
    for name in ELEMENT_PROPERTIES:
        values = np.array([p[name] for p in props], dtype=float)
        mean = float(fractions @ values)
        out[f"{name}_mean"] = mean
        out[f"{name}_std"] = float(np.sqrt(max(fractions @ (values - mean) ** 2, 0.0)))
        out[f"{name}_min"] = float(values.min())
        out[f"{name}_max"] = float(values.max())
        out[f"{name}_range"] = float(values.max() - values.min())
    out["n_elements"] = float(len(symbols))
    out["max_fraction"] = float(fractions.max())
    out["fraction_l2"] = float(np.sum(fractions**2) ** 0.5)
    out["fraction_l3"] = float(np.sum(fractions**3) ** (1.0 / 3.0))
    return out


def ordered_feature_names(positions: int) -> list[str]:
    """Names of :func:`ordered_features`: ``"site<k>_<property>"`` and ``"site<k>_fraction"``, k = 0..positions-1."""
    return [f"site{k}_{p}" for k in range(positions) for p in (*ELEMENT_PROPERTIES, "fraction")]


def ordered_features(formula: str, positions: int) -> dict[str, float]:
    """Site-ordered descriptors: the element properties of the k-th element as written, for k < ``positions``.

    Pools of one structure family usually write formulas in site order (ABO3: A, then B, then O), so the k-th
    written element is the k-th site: this tells SrTiO3 from TiSrO3, which composition statistics cannot.
    For formulas written in pymatgen's order (by electronegativity) position k is still a well-defined
    descriptor (the k-th most electropositive element). Positions past the last element are NaN (impute them,
    as :func:`featurize_formulas` does).
    """
    elements = _written_elements(formula)
    total = sum(amount for _, amount in elements)
    out: dict[str, float] = {}
    for k in range(positions):
        if k < len(elements):
            symbol, amount = elements[k]
            props = element_properties(symbol)
            out.update({f"site{k}_{p}": props[p] for p in ELEMENT_PROPERTIES})
            out[f"site{k}_fraction"] = amount / total
        else:
            out.update({f"site{k}_{p}": math.nan for p in (*ELEMENT_PROPERTIES, "fraction")})
    return out


def site_element_names(positions: int) -> list[str]:
    """Names of :func:`site_elements`: ``"site<k>_element"``, k = 0..positions-1."""
    return [f"site{k}_element" for k in range(positions)]


def site_elements(formula: str, positions: int) -> dict[str, float]:
    """Which element sits at each written position, as a category code: its atomic number, 0 past the last element.

    ``"SrTiO3"`` with 3 positions -> ``{"site0_element": 38, "site1_element": 22, "site2_element": 8}``. The codes
    are labels, not magnitudes: give their columns (:func:`site_element_columns`) to a kernel that only compares
    them for equality (:func:`materials.bo.optimize.site_kernel`). A formula with fewer written elements than
    ``positions`` (``"Ac2O3"`` in an ABO3 pool, A = B merged) gets code 0, a category of its own.

    Raises:
        FeatureError: as :func:`written_elements`.
    """
    elements = _written_elements(formula)
    return {
        name: float(Element(elements[k][0]).Z) if k < len(elements) else 0.0
        for k, name in enumerate(site_element_names(positions))
    }


def site_element_columns(names: Sequence[str]) -> list[int]:
    """Indices of the :func:`site_elements` columns (``"site<k>_element"``) among feature ``names``."""
    return [j for j, name in enumerate(names) if re.fullmatch(r"site\d+_element", name)]


#: Natural-log frequency given to an oxidation state an element is never seen in (ICSD counts).
UNSEEN_OXIDATION_LOG_PROB = -12.0
#: ... and to every state of an element absent from the ICSD table (e.g. Ac, Np, Pu): a neutral, moderate value.
UNTABULATED_ELEMENT_LOG_PROB = -2.0


def oxidation_feature_names(positions: int) -> list[str]:
    """Names of :func:`oxidation_features`: two per formula, three per written position k < ``positions``."""
    per_site = [f"site{k}_{n}" for k in range(positions) for n in ("oxidation", "valence_left", "oxidation_log_prob")]
    return ["oxidation_balanced", "oxidation_log_prob", *per_site]


@functools.lru_cache(maxsize=1)
def _oxidation_log_probs() -> Mapping[str, Mapping[float, float]]:
    """Per element, ln of the fraction of its ICSD occurrences in each oxidation state (pymatgen's
    ``icsd_bv.yaml``, the counts ``Composition.oxi_state_guesses`` ranks guesses by), add-one smoothed."""
    from monty.serialization import loadfn
    from pymatgen.core import Species
    from pymatgen.core import composition as composition_module

    data = loadfn(Path(composition_module.__file__).with_name("icsd_bv.yaml"))["occurrence"]
    counts: dict[str, dict[float, float]] = {}
    for label, count in data.items():
        species = Species.from_str(label)
        counts.setdefault(species.symbol, {})[float(species.oxi_state)] = float(count)
    out = {}
    for symbol, states in counts.items():
        total = sum(states.values()) + len(states) + 1.0
        out[symbol] = MappingProxyType({ox: math.log((n + 1.0) / total) for ox, n in states.items()})
    return MappingProxyType(out)


def _state_log_prob(symbol: str, oxidation: float) -> float:
    table = _oxidation_log_probs().get(symbol)
    if table is None:
        return UNTABULATED_ELEMENT_LOG_PROB
    return table.get(float(oxidation), UNSEEN_OXIDATION_LOG_PROB)


def _group_valence(element: Element) -> float:
    """Valence electrons counted from the group: 1-12 for groups 1-12, group - 10 for 13-18 (La-Lu, Ac-Lr: 3)."""
    group = element.group
    return float(group if group <= 12 else group - 10)


def oxidation_features(formula: str, positions: int) -> dict[str, float]:
    """Descriptors of the most likely charge-balanced oxidation states of a formula (offline, pymatgen).

    The states are pymatgen's first ``Composition.oxi_state_guesses()`` (charge balance, ranked by how often
    each state occurs in the ICSD). Features: ``oxidation_balanced`` (1 if any balanced assignment exists, else
    0), ``oxidation_log_prob`` (atom-averaged ln frequency of the assigned states among each element's ICSD
    occurrences: near 0 for common states such as La3+ Fe3+ O2-, very negative for rare ones;
    :data:`UNTABULATED_ELEMENT_LOG_PROB` for elements the table lacks), and per written position k:
    ``site<k>_oxidation``, ``site<k>_valence_left`` (valence electrons from the group minus the oxidation
    state: the d count of a transition-metal cation such as Fe3+ -> 5, 2 for the lone pair of Pb2+, 8 for O2-)
    and ``site<k>_oxidation_log_prob``. Unbalanced formulas and positions past the last element get
    oxidation 0, valence_left -1 and log prob :data:`UNSEEN_OXIDATION_LOG_PROB`.

    Stability and band gaps of ionic solids follow these (rare oxidation states are rarely stable; the d count
    of the cation decides metal or gap), which composition statistics alone do not express.

    Raises:
        FeatureError: as :func:`written_elements`.
    """
    elements = _written_elements(formula)
    comp = Composition(formula)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        guesses = comp.oxi_state_guesses(max_sites=-1)
    states = {str(k): float(v) for k, v in guesses[0].items()} if guesses else {}
    out = {"oxidation_balanced": 1.0 if states else 0.0}
    if states:
        amounts = comp.get_el_amt_dict()
        total = sum(amounts.values())
        out["oxidation_log_prob"] = sum(_state_log_prob(el, states[el]) * n for el, n in amounts.items()) / total
    else:
        out["oxidation_log_prob"] = UNSEEN_OXIDATION_LOG_PROB
    for k in range(positions):
        symbol = elements[k][0] if k < len(elements) else None
        if symbol is not None and symbol in states:
            ox = states[symbol]
            out[f"site{k}_oxidation"] = ox
            out[f"site{k}_valence_left"] = _group_valence(Element(symbol)) - ox
            out[f"site{k}_oxidation_log_prob"] = _state_log_prob(symbol, ox)
        else:
            out[f"site{k}_oxidation"] = 0.0
            out[f"site{k}_valence_left"] = -1.0
            out[f"site{k}_oxidation_log_prob"] = UNSEEN_OXIDATION_LOG_PROB
    return out


#: Feature sets of :func:`featurize_formulas`.
FEATURE_SETS = ("composition", "ordered", "both", "sites")
#: Most written positions that get site-ordered features.
MAX_ORDERED_POSITIONS = 4


#: Columns of the band-gap model added by ``featurize_formulas(..., gap_model=True)``.
GAP_MODEL_FEATURES = ("gap_pbe", "gap_pbe_std", "p_metal_pbe")


def gap_model_features(formulas: Sequence[str], model_path: str | None = None) -> list[dict[str, float] | str]:
    """Predicted PBE band gap, its ensemble σ and P(metal) per formula from the shipped band-gap model
    (:mod:`materials.ml.bandgap`), named ``model_<column>``; a formula the model cannot read gives its reason (str).
    The model was trained on Materials Project gaps: a pool drawn from MP shares compositions with its training set.
    """
    from materials.ml.bandgap import predict_gaps

    out: list[dict[str, float] | str] = []
    for row in predict_gaps(formulas, model_path):
        if row["error"]:
            out.append(f"band-gap model: {row['error']}")
        else:
            out.append({f"model_{k}": float(row[k]) for k in GAP_MODEL_FEATURES})
    return out


def featurize_formulas(
    formulas: Sequence[str],
    feature_set: str = "composition",
    positions: int | None = None,
    gap_model: bool | str = False,
    oxidation: bool = False,
) -> tuple[np.ndarray, list[str], dict[int, str], np.ndarray]:
    """Features of many formulas; bad rows are recorded and skipped, the batch keeps going.

    Args:
        formulas: chemical formulas.
        feature_set: ``composition`` (:func:`composition_features`), ``ordered`` (:func:`ordered_features`),
            ``both`` (the two side by side) or ``sites`` (composition, then one element code per written position,
            :func:`site_elements`; for a surrogate with a categorical kernel on :func:`site_element_columns`).
        positions: written positions for the ordered features and site codes (default: the most elements any
            formula has, at most :data:`MAX_ORDERED_POSITIONS`). Missing positions get their column's mean
            (ordered features) or code 0 (site codes).
        gap_model: also add :func:`gap_model_features` (True: the shipped model; a str: that model file).
        oxidation: also add :func:`oxidation_features` (most likely oxidation states, their ICSD frequency, the
            valence electrons left on each written position), before any site element codes.

    Returns:
        ``(X, names, failures, ok_index)``: ``X`` float64 of shape (n_ok, d) in input order of the rows that
        worked; ``names`` the d column names; ``failures`` maps the input row index of each failed formula to the
        reason; ``ok_index`` int64 of shape (n_ok,) gives the input row of each row of ``X`` (``X[i]`` describes
        ``formulas[ok_index[i]]``).
    """
    if feature_set not in FEATURE_SETS:
        raise FeatureError(f"feature set {feature_set!r} is not known; use one of {', '.join(FEATURE_SETS)}")
    use_comp, use_ordered = feature_set in ("composition", "both", "sites"), feature_set in ("ordered", "both")
    use_sites = feature_set == "sites"
    rows: list[dict[str, float]] = []
    ok: list[int] = []
    failures: dict[int, str] = {}
    if (use_ordered or use_sites or oxidation) and positions is None:
        counts = []
        for formula in formulas:
            try:
                counts.append(len(_written_elements(formula)))
            except FeatureError:
                continue
        positions = min(max(counts, default=1), MAX_ORDERED_POSITIONS)
    names = (composition_feature_names() if use_comp else []) + (
        ordered_feature_names(positions) if use_ordered else []
    )
    names += oxidation_feature_names(positions) if oxidation else []
    names += site_element_names(positions) if use_sites else []
    model_rows: list[dict[str, float] | str] = []
    if gap_model:
        model_rows = gap_model_features(formulas, None if gap_model is True else str(gap_model))
        names += [f"model_{k}" for k in GAP_MODEL_FEATURES]
    for i, formula in enumerate(formulas):
        try:
            feats = composition_features(formula) if use_comp else {}
            if use_ordered:
                feats.update(ordered_features(formula, positions))
            if oxidation:
                feats.update(oxidation_features(formula, positions))
            if use_sites:
                feats.update(site_elements(formula, positions))
        except FeatureError as exc:
            failures[i] = str(exc)
            continue
        if model_rows:
            if isinstance(model_rows[i], str):
                failures[i] = model_rows[i]
                continue
            feats.update(model_rows[i])
        rows.append(feats)
        ok.append(i)
    X = np.asarray([[row[n] for n in names] for row in rows], dtype=np.float64).reshape(len(rows), len(names))
    if use_ordered and len(rows):
        missing = np.isnan(X)
        if missing.any():
            means = np.nanmean(np.where(missing.all(axis=0), 0.0, X), axis=0)  # an all-NaN column becomes 0
            X = np.where(missing, means[None, :], X)
    return X, names, failures, np.asarray(ok, dtype=np.int64)


def structure_features(structure: Structure, shell_tol: float = 0.2, cutoff: float = 6.0) -> dict[str, float]:
    """Structural descriptors of a (relaxed) periodic structure.

    A neighbour of site i counts towards its coordination when its distance is at most
    ``(1 + shell_tol) * d_min(i)``, with d_min(i) the site's nearest-neighbour distance (fast, no Voronoi).

    Returns:
        ``volume_per_atom`` (Å^3/atom), ``density`` (g/cm^3), ``coordination_mean`` and ``coordination_min``
        (neighbours per site), ``nn_distance_mean`` and ``nn_distance_min`` (Å).

    Raises:
        FeatureError: the structure is empty or some site has no neighbour within ``cutoff`` Å.
    """
    n = len(structure)
    if n == 0:
        raise FeatureError("structure has no sites; pass a relaxed structure with atoms.")
    centers, _, _, distances = structure.get_neighbor_list(r=cutoff)
    dmin = np.full(n, np.inf)
    np.minimum.at(dmin, centers, distances)
    if not np.all(np.isfinite(dmin)):
        lonely = np.flatnonzero(~np.isfinite(dmin)).tolist()
        raise FeatureError(
            f"structure {structure.composition.reduced_formula}: sites {lonely} have no neighbour within "
            f"{cutoff} Å; raise cutoff or check the cell."
        )
    in_shell = distances <= (1.0 + shell_tol) * dmin[centers]
    coordination = np.bincount(centers[in_shell], minlength=n).astype(float)
    return {
        "volume_per_atom": float(structure.volume / n),
        "density": float(structure.density),
        "coordination_mean": float(coordination.mean()),
        "coordination_min": float(coordination.min()),
        "nn_distance_mean": float(dmin.mean()),
        "nn_distance_min": float(dmin.min()),
    }


def candidate_features(
    formula: str,
    structure: Structure | None = None,
    screening: Mapping[str, float | None] | None = None,
    exclude: Sequence[str] = (),
) -> dict[str, float]:
    """All descriptors of one candidate: composition, structure (when given) and screening outputs.

    Args:
        formula: chemical formula of the candidate.
        structure: relaxed structure; adds :func:`structure_features` prefixed ``"structure_"``.
        screening: screening outputs such as ``{"e_form": eV/atom, "e_hull": eV/atom, "gap": eV,
            "gap_sigma": eV}``, added prefixed ``"screen_"``; None values become NaN (impute them when
            stacking, e.g. with :func:`stack_features`).
        exclude: labels the surrogate will predict; a feature whose name, or whose name without its
            ``"structure_"``/``"screen_"`` prefix, is listed is left out, so the featuriser never reads them.

    Raises:
        FeatureError: as :func:`composition_features` / :func:`structure_features`.
    """
    excluded = set(exclude)
    out = composition_features(formula)
    if structure is not None:
        out.update({f"structure_{k}": v for k, v in structure_features(structure).items()})
    for key, value in (screening or {}).items():
        out[f"screen_{key}"] = math.nan if value is None else float(value)
    return {
        name: value
        for name, value in out.items()
        if name not in excluded and re.sub(r"^(structure_|screen_)", "", name) not in excluded
    }


def stack_features(rows: Sequence[Mapping[str, float]]) -> tuple[np.ndarray, list[str]]:
    """Stack feature dicts into a matrix, aligning columns by name.

    Columns are the union of the keys in first-appearance order; a missing or NaN entry is replaced by its
    column's mean over the rows that have it.

    Returns:
        ``(X, names)``: float64 array of shape (len(rows), d) and the d column names.

    Raises:
        FeatureError: no rows, or a column with no finite value (naming it; drop it or supply values).
    """
    if not rows:
        raise FeatureError("stack_features got no rows; featurise at least one candidate.")
    names: list[str] = list(dict.fromkeys(k for row in rows for k in row))
    X = np.array([[float(row.get(n, math.nan)) for n in names] for row in rows], dtype=np.float64)
    finite = np.isfinite(X)
    empty = [names[j] for j in np.flatnonzero(~finite.any(axis=0))]
    if empty:
        raise FeatureError(f"feature columns {empty} have no finite value in any row; exclude them or supply values.")
    col_means = np.nanmean(np.where(finite, X, np.nan), axis=0)
    X = np.where(finite, X, col_means[None, :])
    return X, names
