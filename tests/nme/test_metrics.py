"""Metrics against hand computations, scipy and the ``krippendorff`` package; the bootstrap."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from nme.metrics import (
    accuracy,
    alpha_nominal,
    ccc,
    coincidence_matrix,
    group_difference_bootstrap,
    krippendorff_alpha,
    metrics_for,
    nrmse,
    paired_bootstrap,
    pearson_r,
    per_person,
    rmse,
    summarise,
)

krippendorff = pytest.importorskip("krippendorff")


# --------------------------------------------------------------------------- regression
def test_ccc_matches_hand_computation() -> None:
    t = np.array([1.0, 2.0, 3.0, 4.0])
    p = np.array([2.0, 2.0, 4.0, 5.0])
    # means 2.5, 3.25; population var_t 1.25, var_p 1.6875; cov 1.375
    expected = 2 * 1.375 / (1.25 + 1.6875 + 0.75**2)
    assert ccc(t, p) == pytest.approx(expected)
    assert ccc(t, t) == pytest.approx(1.0)
    assert ccc(t, 5 - t) == pytest.approx(-1.0)  # mirrored about the same mean
    assert ccc(t, np.full(4, 2.5)) == 0.0  # constant prediction of a varying truth


def test_pearson_and_nrmse_match_scipy_and_hand() -> None:
    rng = np.random.default_rng(1)
    t = rng.normal(size=50)
    p = t + rng.normal(size=50)
    assert pearson_r(t, p) == pytest.approx(stats.pearsonr(t, p)[0])
    assert nrmse(t, p) == pytest.approx(np.sqrt(np.mean((t - p) ** 2)) / np.std(t))
    assert rmse(t, p) == pytest.approx(np.sqrt(np.mean((t - p) ** 2)))
    assert nrmse(t, np.full(50, t.mean())) == pytest.approx(1.0)  # predicting the mean


def test_degenerate_inputs_are_nan() -> None:
    const = np.ones(5)
    x = np.arange(5.0)
    assert np.isnan(nrmse(const, x))
    assert np.isnan(pearson_r(const, x))
    assert np.isnan(pearson_r(x[:1], x[:1]))
    assert np.isnan(ccc(const, const))
    assert np.isnan(alpha_nominal(np.array(["a", "a"]), np.array(["a", "a"])))


# --------------------------------------------------------------------------- Krippendorff
@pytest.mark.parametrize("seed", range(6))
def test_alpha_matches_krippendorff_package_with_missing_values(seed: int) -> None:
    rng = np.random.default_rng(seed)
    raters, units = 2 + seed % 3, 25 + 5 * seed
    data = rng.integers(0, 2 + seed % 4, size=(raters, units)).astype(float)
    # agreement well above chance in half the units, so α is not near 0 only
    data[:, : units // 2] = data[0, : units // 2]
    data[rng.random(data.shape) < 0.2] = np.nan
    expected = krippendorff.alpha(reliability_data=data, level_of_measurement="nominal")
    assert krippendorff_alpha(data) == pytest.approx(expected, abs=1e-12)


def test_alpha_of_labels_equals_alpha_of_their_codes() -> None:
    t = np.array(["sad", "ok", "happy", "ok", "sad", "happy", "ok"], dtype=object)
    p = np.array(["sad", "ok", "ok", "ok", "happy", "happy", "sad"], dtype=object)
    codes = {"sad": 0.0, "ok": 1.0, "happy": 2.0}
    numeric = np.array([[codes[v] for v in t], [codes[v] for v in p]])
    expected = krippendorff.alpha(reliability_data=numeric, level_of_measurement="nominal")
    assert alpha_nominal(t, p) == pytest.approx(expected)
    assert alpha_nominal(t, t) == pytest.approx(1.0)


def test_coincidence_matrix_ignores_unpairable_units() -> None:
    data = np.array([[1.0, 2.0, np.nan], [1.0, 1.0, 2.0]])
    o, values = coincidence_matrix(data)
    assert list(values) == [1.0, 2.0]
    np.testing.assert_allclose(o, [[2.0, 1.0], [1.0, 0.0]])  # unit 3 has one value only


def test_accuracy() -> None:
    assert accuracy(np.array(["a", "b", "b"]), np.array(["a", "b", "a"])) == pytest.approx(2 / 3)


# --------------------------------------------------------------------------- per person
def test_per_person_then_average_skips_degenerate_persons() -> None:
    persons = np.array(["a"] * 4 + ["b"] * 4 + ["c"] * 3)
    t = np.array([1, 2, 3, 4, 5, 5, 5, 5, 1, 3, 2], dtype=float)  # b is constant
    p = np.array([1, 2, 3, 5, 4, 5, 6, 5, 2, 3, 2], dtype=float)
    table = per_person(t, p, persons, metrics_for("regression"))
    assert list(table.index) == ["a", "b", "c"]
    assert table.loc["a", "pearson"] == pytest.approx(stats.pearsonr(t[:4], p[:4])[0])
    assert np.isnan(table.loc["b", "nrmse"]) and np.isnan(table.loc["b", "pearson"])
    assert table["n"].tolist() == [4, 4, 3]
    summary = summarise(table, ["nrmse", "ccc"])
    assert summary["nrmse"]["n"] == 2
    assert summary["nrmse"]["mean"] == pytest.approx(table.loc[["a", "c"], "nrmse"].mean())
    assert summary["ccc"]["n"] == 3  # CCC is defined for b (constant truth, varying prediction)


def test_unknown_metric_names_are_rejected() -> None:
    with pytest.raises(ValueError, match="unknown metrics"):
        metrics_for("regression", ["accuracy"])
    assert list(metrics_for("regression", ["rmse", "ccc"])) == ["rmse", "ccc"]


# --------------------------------------------------------------------------- bootstrap
def test_bootstrap_is_reproducible_and_independent_of_chunking() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.normal(0.6, 0.2, 80), rng.normal(0.5, 0.2, 80)
    one = paired_bootstrap(a, b, 10_000, seed=7)
    assert paired_bootstrap(a, b, 10_000, seed=7) == one
    assert paired_bootstrap(a, b, 10_000, seed=7, chunk_elements=1000) == one
    assert paired_bootstrap(a, b, 10_000, seed=8) != one
    assert one.diff == pytest.approx(np.mean(a - b))
    assert one.low < one.diff < one.high


def test_bootstrap_interval_covers_a_known_difference() -> None:
    """Per-person metrics of B are those of A minus 0.05 plus person-level noise."""
    rng = np.random.default_rng(3)
    person_level = rng.normal(0.7, 0.1, 150)  # persons differ a lot, pairing removes that
    a = person_level + rng.normal(0, 0.02, 150)
    b = person_level - 0.05 + rng.normal(0, 0.02, 150)
    res = paired_bootstrap(a, b, 10_000, seed=0)
    assert res.low < 0.05 < res.high
    assert res.excludes_zero and res.n_persons == 150


def test_bootstrap_coverage_is_near_nominal() -> None:
    """Over repeated synthetic studies the 95 % interval covers the true mean about 95 %."""
    rng = np.random.default_rng(11)
    hits = 0
    for rep in range(200):
        d = rng.normal(0.1, 0.3, 60)
        res = paired_bootstrap(d, np.zeros(60), 1000, seed=rep)
        hits += res.low <= 0.1 <= res.high
    assert 0.88 <= hits / 200 <= 0.99


def test_bootstrap_drops_nan_persons_pairwise() -> None:
    a = np.array([0.5, np.nan, 0.7, 0.9])
    b = np.array([0.4, 0.3, np.nan, 0.8])
    res = paired_bootstrap(a, b, 500, seed=0)
    assert res.n_persons == 2
    assert res.diff == pytest.approx(0.1)
    with pytest.raises(ValueError, match="aligned"):
        paired_bootstrap(a, b[:3])


def test_group_difference_bootstrap_of_matrices() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(0.0, 0.05, (40, 3, 3)) + np.eye(3) * 0.3
    b = rng.normal(0.0, 0.05, (30, 3, 3))
    diff, low, high = group_difference_bootstrap(a, b, 2000, seed=1)
    assert diff.shape == low.shape == high.shape == (3, 3)
    assert np.all(low[np.eye(3, dtype=bool)] > 0.2)
    off = ~np.eye(3, dtype=bool)
    assert np.all((low[off] < 0) & (high[off] > 0))
    np.testing.assert_allclose(diff, a.mean(0) - b.mean(0))
    assert isinstance(pd.Series(diff.ravel()).mean(), float)
