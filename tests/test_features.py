from __future__ import annotations

import math

import numpy as np
import pytest
from ase.build import bulk
from pymatgen.io.ase import AseAtomsAdaptor

from materials.ml.elements import ELEMENT_PROPERTIES, FeatureError, element_properties
from materials.ml.features import (
    candidate_features,
    composition_feature_names,
    composition_features,
    featurize_formulas,
    stack_features,
    structure_features,
)


def test_gaas_statistics_are_exact():
    f = composition_features("GaAs")
    assert f["electronegativity_mean"] == pytest.approx((1.81 + 2.18) / 2, abs=1e-12)
    assert f["electronegativity_min"] == pytest.approx(1.81)
    assert f["electronegativity_max"] == pytest.approx(2.18)
    assert f["electronegativity_range"] == pytest.approx(0.37)
    assert f["electronegativity_std"] == pytest.approx(0.185)  # two equal fractions: half the range
    assert f["Z_mean"] == pytest.approx(32.0)
    # Ga [Ar]3d10 4s2 4p1 and As [Ar]3d10 4s2 4p3: 13 and 15 valence electrons
    assert f["valence_mean"] == pytest.approx(14.0)
    assert f["valence_p_min"] == 1.0 and f["valence_p_max"] == 3.0
    assert f["unfilled_mean"] == pytest.approx((5 + 3) / 2)  # 6 - 1 and 6 - 3 empty p states
    assert f["n_elements"] == 2.0 and f["max_fraction"] == 0.5
    assert list(f) == composition_feature_names()


def test_srtio3_fraction_weighting():
    f = composition_features("SrTiO3")
    assert f["electronegativity_mean"] == pytest.approx((0.95 + 1.54 + 3 * 3.44) / 5)
    assert f["row_mean"] == pytest.approx((5 + 4 + 3 * 2) / 5)
    assert f["max_fraction"] == pytest.approx(0.6)
    assert f["fraction_l2"] == pytest.approx(math.sqrt(0.04 + 0.04 + 0.36))
    # reduced and unreduced formulas describe the same composition
    assert composition_features("Sr2Ti2O6") == pytest.approx(f)
    assert all(math.isfinite(v) for v in f.values())


def test_unparseable_and_empty_formulas_name_the_formula():
    with pytest.raises(FeatureError, match=r"'Ga\(\('"):
        composition_features("Ga((")
    with pytest.raises(FeatureError, match="empty"):
        composition_features("  ")


def test_unknown_element_is_named():
    with pytest.raises(FeatureError, match=r"unknown element.*'Xx'"):
        composition_features("Xx2O3")
    with pytest.raises(FeatureError, match="'Qq'"):
        element_properties("Qq")


def test_missing_properties_are_imputed():
    he = element_properties("He")  # no electronegativity, no ionic radius in pymatgen
    assert all(math.isfinite(he[name]) for name in ELEMENT_PROPERTIES)
    assert he["ionic_radius"] == element_properties("Ne")["ionic_radius"]  # both take the same mean


def test_featurize_formulas_keeps_going_past_bad_rows():
    X, names, failures, ok_index = featurize_formulas(["GaAs", "Ga((", "Xx2O3", "SrTiO3", "", float("nan")])
    assert X.shape == (2, len(names)) and X.dtype == np.float64
    assert ok_index.tolist() == [0, 3]
    assert sorted(failures) == [1, 2, 4, 5]
    assert "Ga((" in failures[1] and "Xx" in failures[2]
    np.testing.assert_allclose(X[1], [composition_features("SrTiO3")[n] for n in names])


def test_structure_features_of_zincblende_gaas():
    gaas = AseAtomsAdaptor.get_structure(bulk("GaAs", "zincblende", a=5.653))
    f = structure_features(gaas)
    assert f["volume_per_atom"] == pytest.approx(5.653**3 / 8)
    assert f["density"] == pytest.approx(5.32, abs=0.02)  # g/cm^3, experiment 5.32
    assert f["coordination_mean"] == 4.0 and f["coordination_min"] == 4.0
    assert f["nn_distance_min"] == pytest.approx(5.653 * math.sqrt(3) / 4)


def test_candidate_features_never_read_excluded_labels():
    screening = {"e_form": -0.35, "e_hull": 0.0, "gap": 1.2, "gap_sigma": None}
    f = candidate_features("GaAs", screening=screening, exclude=["gap", "screen_e_hull"])
    assert "screen_gap" not in f and "screen_e_hull" not in f
    assert f["screen_e_form"] == -0.35 and math.isnan(f["screen_gap_sigma"])
    assert f["electronegativity_mean"] == composition_features("GaAs")["electronegativity_mean"]


def test_stack_features_aligns_and_imputes():
    X, names = stack_features([{"a": 1.0, "b": 2.0}, {"a": 3.0, "b": math.nan}, {"b": 6.0, "c": 1.0}])
    assert names == ["a", "b", "c"]
    np.testing.assert_allclose(X, [[1.0, 2.0, 1.0], [3.0, 4.0, 1.0], [2.0, 6.0, 1.0]])
    with pytest.raises(FeatureError, match=r"\['z'\]"):
        stack_features([{"z": math.nan}])


def test_site_ordered_features_tell_site_swaps_apart():
    from materials.composition import written_elements
    from materials.ml.elements import element_properties
    from materials.ml.features import featurize_formulas, ordered_features

    assert written_elements("SrTiO3") == [("Sr", 1.0), ("Ti", 1.0), ("O", 3.0)]
    assert written_elements("CH3COOH") == [("C", 2.0), ("H", 4.0), ("O", 2.0)]
    swap_a, swap_b = ordered_features("SrTiO3", 3), ordered_features("TiSrO3", 3)
    assert swap_a["site0_electronegativity"] == pytest.approx(element_properties("Sr")["electronegativity"])
    assert swap_b["site0_electronegativity"] == pytest.approx(element_properties("Ti")["electronegativity"])
    assert swap_a["site2_fraction"] == pytest.approx(0.6)
    # composition statistics cannot tell the two apart; "both" can
    X, names, failures, ok = featurize_formulas(["SrTiO3", "TiSrO3", "GaAs", "Xx2O3"], "both")
    assert failures.keys() == {3} and list(ok) == [0, 1, 2]
    n_comp = len(featurize_formulas(["SrTiO3"])[1])
    assert np.allclose(X[0, :n_comp], X[1, :n_comp]) and not np.allclose(X[0], X[1])
    # GaAs has no third element: its site2 columns get the column mean (here SrTiO3's and TiSrO3's O values)
    j = names.index("site2_fraction")
    assert X[2, j] == pytest.approx(0.6) and np.isfinite(X).all()
    with pytest.raises(FeatureError, match="feature set 'site'"):
        featurize_formulas(["GaAs"], "site")
    with pytest.raises(FeatureError, match="flat formula"):
        ordered_features("Ca(OH)2", 2)


def test_site_element_codes_for_a_categorical_kernel():
    from materials.ml.features import site_element_columns, site_elements

    assert site_elements("SrTiO3", 3) == {"site0_element": 38.0, "site1_element": 22.0, "site2_element": 8.0}
    # A = B merged into one written element: the missing position gets code 0, a category of its own
    assert site_elements("Ac2O3", 3) == {"site0_element": 89.0, "site1_element": 8.0, "site2_element": 0.0}
    X, names, failures, ok = featurize_formulas(["SrTiO3", "TiSrO3", "GaAs"], "sites")
    n_comp = len(composition_feature_names())
    assert names[:n_comp] == composition_feature_names()
    assert names[n_comp:] == ["site0_element", "site1_element", "site2_element"]
    assert site_element_columns(names) == [n_comp, n_comp + 1, n_comp + 2]
    assert site_element_columns(["Z_mean", "site0_Z", "site12_element"]) == [2]
    assert X[:, n_comp:].tolist() == [[38.0, 22.0, 8.0], [22.0, 38.0, 8.0], [31.0, 33.0, 0.0]]
    assert np.array_equal(X[0, :n_comp], X[1, :n_comp])  # composition statistics cannot tell the swap apart
    with pytest.raises(FeatureError, match="flat formula"):
        site_elements("Ca(OH)2", 3)


def test_oxidation_features_states_valence_and_icsd_frequency():
    import math

    from materials.ml.features import (
        UNSEEN_OXIDATION_LOG_PROB,
        UNTABULATED_ELEMENT_LOG_PROB,
        oxidation_feature_names,
        oxidation_features,
    )

    la_fe = oxidation_features("LaFeO3", 3)
    assert list(la_fe) == oxidation_feature_names(3)
    # La3+ Fe3+ O2-: Fe3+ is d5 (group 8 - 3), La3+ has no valence electrons left, O2- a closed octet
    assert [la_fe[f"site{k}_oxidation"] for k in range(3)] == [3.0, 3.0, -2.0]
    assert [la_fe[f"site{k}_valence_left"] for k in range(3)] == [0.0, 5.0, 8.0]
    assert la_fe["oxidation_balanced"] == 1.0
    # the formula's log prob is the atom-weighted mean of the sites' (A, B, 3 O)
    per_site = [la_fe[f"site{k}_oxidation_log_prob"] for k in range(3)]
    assert la_fe["oxidation_log_prob"] == pytest.approx((per_site[0] + per_site[1] + 3 * per_site[2]) / 5)
    assert all(-3.0 < v < 0.0 for v in per_site)  # common states: frequent in the ICSD
    # Pb2+ keeps its 6s2 lone pair; Ti4+ is d0
    pb_ti = oxidation_features("PbTiO3", 3)
    assert (pb_ti["site0_valence_left"], pb_ti["site1_valence_left"]) == (2.0, 0.0)
    # Fe3+ is far more common than Fe4+ (SrFeO3 needs Fe4+)
    assert oxidation_features("SrFeO3", 3)["site1_oxidation_log_prob"] < la_fe["site1_oxidation_log_prob"] - 1.0
    # no balanced assignment with known states: every site gets the 'unseen' values
    unbalanced = oxidation_features("CsAuO3", 3)
    assert unbalanced["oxidation_balanced"] == 0.0 and unbalanced["oxidation_log_prob"] == UNSEEN_OXIDATION_LOG_PROB
    assert unbalanced["site1_valence_left"] == -1.0
    # an element absent from the ICSD table (Np) gets the neutral value; positions past the formula the unseen ones
    k_np = oxidation_features("KNpO3", 3)
    assert k_np["site1_oxidation"] == 5.0 and k_np["site1_oxidation_log_prob"] == UNTABULATED_ELEMENT_LOG_PROB
    nacl = oxidation_features("NaCl", 3)
    assert (nacl["site2_oxidation"], nacl["site2_valence_left"]) == (0.0, -1.0)
    assert all(math.isfinite(v) for v in nacl.values())
    # in featurize_formulas they sit after the composition statistics and before the site element codes
    X, names, failures, ok = featurize_formulas(["LaFeO3", "Ca(OH)2"], "sites", oxidation=True)
    n_comp = len(composition_feature_names())
    assert names[n_comp:] == oxidation_feature_names(3) + ["site0_element", "site1_element", "site2_element"]
    assert X.shape == (1, len(names)) and X[0, names.index("site1_valence_left")] == 5.0
    assert 1 in failures and "flat formula" in failures[1]
