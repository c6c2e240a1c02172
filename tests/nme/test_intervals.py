"""Per-person prediction intervals of NMERegressor: std of a new observation, intervals, the
service's explicit-rows path, and their calibration on simulated mood."""

from __future__ import annotations

import warnings
from statistics import NormalDist

import numpy as np
import pandas as pd
import pytest
from sklearn.exceptions import ConvergenceWarning

from nme import NMERegressor
from nme.simulate import MOOD_FEATURES, simulate_mood

FEW_DAYS, MANY_DAYS, HELD_OUT_DAYS = 3, 40, 20
N_FEW = 20  # persons u0001 … u0020 train on their first 3 days only


def _fit(est: NMERegressor, data: pd.DataFrame) -> NMERegressor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # the budget is not under test
        return est.fit(data[MOOD_FEATURES], data["mood"], data["user"])


@pytest.fixture(scope="module")
def mood() -> tuple[NMERegressor, pd.DataFrame, pd.DataFrame]:
    """A linear NME (random intercept and slopes) fitted with the defaults otherwise; the
    held-out set is every person's 20 days after their first 40 (2 400 rows)."""
    df, _ = simulate_mood(n_persons=120, n_days=MANY_DAYS + HELD_OUT_DAYS, seed=0)
    day = df.groupby("user").cumcount().to_numpy()
    few = df["user"].str[1:].astype(int).to_numpy() <= N_FEW
    train = df[(day < MANY_DAYS) & (~few | (day < FEW_DAYS))]
    test = df[day >= MANY_DAYS]
    est = _fit(NMERegressor(hidden=(), random_state=0, device="cpu"), train)
    return est, train, test


@pytest.mark.xfail(strict=True, reason=(
    "covers 92.8 %, not 88-92 %: the linear model cannot represent the simulation's "
    "person-specific weekday event, so its residuals are heavy-tailed and a Gaussian interval "
    "with the right variance over-covers (σ alone covers ~90 %); networks that capture the "
    "event over-cover because the posterior covariance is taken diagonal (default net: 96 % "
    "diagonal vs 89 % with the full Laplace covariance). Open: full covariances."))
def test_intervals_cover_held_out_days(mood) -> None:  # type: ignore[no-untyped-def]
    est, _, test = mood
    assert len(test) >= 1000
    bounds = est.predict_interval(test[MOOD_FEATURES], test["user"], coverage=0.9)
    y = test["mood"].to_numpy()
    covered = float(np.mean((bounds[:, 0] <= y) & (y <= bounds[:, 1])))
    assert 0.88 <= covered <= 0.92, covered


def test_intervals_are_calibrated_when_the_model_is_right() -> None:
    """A linear mixed model with Gaussian random intercepts, slopes and noise, fitted by the
    linear NME (the model is right, and with centred features the posterior covariance is
    nearly diagonal): 90 % intervals cover 90 % of 3 000 new observations (seeds 0-3 gave
    89.9, 88.0, 89.7, 89.9 %; slightly under 90 because θ̄'s own error is left out)."""
    rng = np.random.default_rng(0)
    n_persons, n_features, n_new = 150, 3, 20
    n_train = np.where(np.arange(n_persons) < 30, 3, 20)  # 30 persons with 3 observations
    b = rng.normal(0, 2, n_persons)
    slopes = rng.normal(0, 1, (n_persons, n_features))
    beta = np.array([1.0, -0.5, 0.3])
    parts = []
    for p in range(n_persons):  # the simulation only; the fit is vectorised
        x = rng.normal(0, 1, (n_train[p] + n_new, n_features))
        y = 10 + x @ beta + b[p] + x @ slopes[p] + rng.normal(0, 1, len(x))
        parts.append((x, y, p, n_train[p]))
    x_tr = np.concatenate([x[:k] for x, _, _, k in parts])
    y_tr = np.concatenate([y[:k] for _, y, _, k in parts])
    p_tr = np.concatenate([[p] * k for _, _, p, k in parts])
    x_te = np.concatenate([x[k:] for x, _, _, k in parts])
    y_te = np.concatenate([y[k:] for _, y, _, k in parts])
    p_te = np.repeat(np.arange(n_persons), n_new)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        est = NMERegressor(hidden=(), random_state=0, device="cpu").fit(x_tr, y_tr, p_tr)
    bounds = est.predict_interval(x_te, p_te, coverage=0.9)
    covered = float(np.mean((bounds[:, 0] <= y_te) & (y_te <= bounds[:, 1])))
    assert 0.88 <= covered <= 0.92, covered


def test_interval_is_mean_plus_minus_quantile_times_std(mood) -> None:  # type: ignore[no-untyped-def]
    est, _, test = mood
    x, users = test[MOOD_FEATURES].head(50), test["user"].head(50)
    mean, std = est.predict(x, users, return_std=True)
    np.testing.assert_allclose(mean, est.predict(x, users), rtol=1e-6)
    bounds = est.predict_interval(x, users, coverage=0.8)
    z = NormalDist().inv_cdf(0.9)
    np.testing.assert_allclose(bounds[:, 0], mean - z * std, rtol=1e-6)
    np.testing.assert_allclose(bounds[:, 1], mean + z * std, rtol=1e-6)
    assert bounds.shape == (50, 2)


def test_few_observations_give_wider_intervals(mood) -> None:  # type: ignore[no-untyped-def]
    est, train, test = mood
    counts = train.groupby("user").size()
    few = test["user"].map(counts).to_numpy() == FEW_DAYS
    assert few.any() and (test["user"].map(counts).to_numpy() == MANY_DAYS).any()
    bounds = est.predict_interval(test[MOOD_FEATURES], test["user"])
    width = bounds[:, 1] - bounds[:, 0]
    # per person, on the same held-out days' features: every few-obs person is wider than
    # every many-obs person on average
    per_person = pd.Series(width).groupby(test["user"].to_numpy()).mean()
    few_ids = counts.index[counts == FEW_DAYS]
    assert per_person[few_ids].min() > per_person.drop(few_ids).max()


def test_unknown_persons_get_the_prior_width(mood) -> None:  # type: ignore[no-untyped-def]
    est, train, test = mood
    rows = test[MOOD_FEATURES].head(40)
    ids = est.person_ids_
    # every row for every training person at once: (40 · 120,) predictions, one call
    x = pd.concat([rows] * len(ids), ignore_index=True)
    who = np.repeat(ids, len(rows))
    _, std_known = est.predict(x, who, return_std=True)
    _, std_unknown = est.predict(rows, ["nobody"] * len(rows), return_std=True)
    _, std_none = est.predict(rows, return_std=True)
    np.testing.assert_allclose(std_none, std_unknown, rtol=1e-6)
    assert (std_unknown > std_known.reshape(len(ids), len(rows)).max(0)).all()
    # the prior's std by hand: σ² + Σ_k x̃_k² Σ_k for the linear model
    xt = np.hstack([est.x_scaler_.transform(rows.to_numpy(np.float64)),
                    np.ones((len(rows), 1), np.float32)]).astype(np.float64)
    prior = est._Sigma_flat.cpu().numpy().astype(np.float64)
    by_hand = np.sqrt(est.sigma2_ + (xt**2 * prior).sum(1)) * float(est.y_scaler_.std)
    np.testing.assert_allclose(std_unknown, by_hand, rtol=1e-5)


@pytest.fixture(scope="module")
def linear_all() -> tuple[NMERegressor, pd.DataFrame]:
    df, _ = simulate_mood(n_persons=30, n_days=20, seed=5)
    est = _fit(NMERegressor(hidden=(), placement="all", random_state=1, device="cpu",
                            max_epochs=30), df)
    return est, df


def test_std_by_hand_for_a_linear_model(linear_all) -> None:  # type: ignore[no-untyped-def]
    est, df = linear_all
    assert est.effects_layout_.names == ("layers.0.weight", "layers.0.bias")
    # 21 000 rows: three chunks of the vectorised path
    big = pd.concat([df] * 35, ignore_index=True)
    x = big[MOOD_FEATURES].to_numpy(np.float64)
    xt = np.hstack([est.x_scaler_.transform(x), np.ones((len(x), 1), np.float32)])
    xt = xt.astype(np.float64)  # (n, F + 1): ∂f/∂θⁱ of a linear model
    rows = est.persons_.encode(list(big["user"]))
    v = est.effects_variance_matrix().astype(np.float64)[rows]  # (n, d)
    by_hand = np.sqrt(est.sigma2_ + (xt**2 * v).sum(1)) * float(est.y_scaler_.std)
    _, std = est.predict(big[MOOD_FEATURES], big["user"], return_std=True)
    np.testing.assert_allclose(std, by_hand, rtol=1e-5)
    # any variances the caller passes, e.g. a per-user update's
    rng = np.random.default_rng(0)
    v2 = rng.uniform(0.0, 0.5, (len(df), est.n_effects_)).astype(np.float32)
    effects = est.effects_matrix()[est.persons_.encode(list(df["user"]))]
    _, std2 = est.predict_with_effects(df[MOOD_FEATURES], effects, None, effects_variance=v2,
                                       return_std=True)
    xt2 = xt[: len(df)]
    np.testing.assert_allclose(
        std2, np.sqrt(est.sigma2_ + (xt2**2 * v2).sum(1)) * float(est.y_scaler_.std), rtol=1e-5)


def test_predict_with_effects_matches_predict(linear_all) -> None:  # type: ignore[no-untyped-def]
    est, df = linear_all
    x, users = df[MOOD_FEATURES], df["user"]
    rows = est.persons_.encode(list(users))
    effects = est.effects_matrix()[rows]
    variance = est.effects_variance_matrix()[rows]
    mean, std = est.predict(x, users, return_std=True)
    mean2, std2 = est.predict_with_effects(x, effects, np.ones(len(df), bool),
                                           effects_variance=variance, return_std=True)
    np.testing.assert_allclose(mean2, mean, rtol=1e-6)
    np.testing.assert_allclose(std2, std, rtol=1e-6)
    # the old behaviour without return_std: the mean array alone
    plain = est.predict_with_effects(x, effects, None)
    assert isinstance(plain, np.ndarray) and plain.shape == (len(df),)
    np.testing.assert_allclose(plain, mean, rtol=1e-6)

    # unknown rows: the fallback θ and the prior Σ, whatever was passed for them
    known = np.arange(len(df)) % 2 == 0
    junk_effects = np.where(known[:, None], effects, 1e3).astype(np.float32)
    junk_variance = np.where(known[:, None], variance, 1e3).astype(np.float32)
    mean3, std3 = est.predict_with_effects(x, junk_effects, known,
                                           effects_variance=junk_variance, return_std=True)
    mean_u, std_u = est.predict(x, ["nobody"] * len(df), return_std=True)
    np.testing.assert_allclose(mean3, np.where(known, mean, mean_u), rtol=1e-6)
    np.testing.assert_allclose(std3, np.where(known, std, std_u), rtol=1e-6)

    # no variances at all: the prior for every row (conservative), with each row's own mean
    mean4, std4 = est.predict_with_effects(x, effects, None, return_std=True)
    np.testing.assert_allclose(mean4, mean, rtol=1e-6)
    np.testing.assert_allclose(std4, std_u, rtol=1e-6)
    assert (std4 >= std - 1e-9).all()


def test_effects_variance_is_checked(linear_all) -> None:  # type: ignore[no-untyped-def]
    est, df = linear_all
    x = df[MOOD_FEATURES].head(3)
    effects = est.effects_matrix()[:3]
    with pytest.raises(ValueError, match="effects_variance must have shape"):
        est.predict_with_effects(x, effects, effects_variance=np.ones((3, 2)), return_std=True)
    with pytest.raises(ValueError, match="non-negative"):
        est.predict_with_effects(x, effects, effects_variance=-np.ones((3, est.n_effects_)),
                                 return_std=True)


@pytest.mark.parametrize("coverage", [0, 1, float("nan"), 2, -0.5, "0.9", None])
def test_bad_coverage_is_refused(linear_all, coverage) -> None:  # type: ignore[no-untyped-def]
    est, df = linear_all
    with pytest.raises(ValueError, match="coverage"):
        est.predict_interval(df[MOOD_FEATURES].head(3), df["user"].head(3), coverage=coverage)


def test_std_survives_save_and_load(linear_all, tmp_path) -> None:  # type: ignore[no-untyped-def]
    est, df = linear_all
    est.save(tmp_path / "m")
    loaded = NMERegressor.load(tmp_path / "m")
    users = list(df["user"].head(10)) + ["nobody"]
    x = df[MOOD_FEATURES].head(11)
    np.testing.assert_allclose(loaded.predict(x, users, return_std=True)[1],
                               est.predict(x, users, return_std=True)[1], rtol=1e-6)
