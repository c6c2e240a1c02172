"""Behaviour on simulated data with known person effects (paper §5 in miniature)."""

from __future__ import annotations

import pandas as pd
import pytest

from nme import NMERegressor
from nme.simulate import MOOD_FEATURES, simulate_mood

pytestmark = pytest.mark.slow
HP = {"hidden": (32, 32), "lr": 3e-3, "max_epochs": 150, "patience": 15, "batch_size": 256,
      "random_state": 0}


def held_out_rmse(
    method: str, placement: str, splits: tuple[pd.DataFrame, ...]
) -> tuple[float, NMERegressor]:
    train, val, test = splits
    f = MOOD_FEATURES
    est = NMERegressor(placement=placement, method=method, **HP).fit(
        train[f], train["mood"], train["user"], val[f], val["mood"], val["user"]
    )
    return -est.score_per_person(test[f], test["mood"], test["user"]), est


@pytest.fixture(scope="module")
def strong_effects(splitter) -> tuple[pd.DataFrame, ...]:  # type: ignore[no-untyped-def]
    return splitter(simulate_mood(n_persons=80, n_days=50, seed=11)[0])


@pytest.mark.parametrize("placement", ["last", "all"])
def test_nme_beats_generic_with_nonlinear_person_effects(placement: str, strong_effects) -> None:  # type: ignore[no-untyped-def]
    generic, _ = held_out_rmse("generic", "last", strong_effects)
    nme, _ = held_out_rmse("nme", placement, strong_effects)
    assert nme < 0.8 * generic, f"nme-{placement} {nme:.2f} vs generic {generic:.2f}"


def test_without_person_effects_nme_is_no_worse_and_sigma_shrinks(splitter) -> None:  # type: ignore[no-untyped-def]
    splits = splitter(simulate_mood(n_persons=60, n_days=50, seed=5, person_effects=0.0)[0])
    generic, _ = held_out_rmse("generic", "last", splits)
    nme, est = held_out_rmse("nme", "last", splits)
    assert nme <= 1.03 * generic
    sigmas = [r["Sigma_mean"] for r in est.history_]
    assert sigmas[-1] < 0.2 * sigmas[0]


def test_with_five_observations_per_person_specific_is_worse_than_nme(splitter) -> None:  # type: ignore[no-untyped-def]
    # 5 training days per person (9 days: 5 train, 2 validation, 2 test)
    df, _ = simulate_mood(n_persons=150, n_days=9, seed=8)
    splits = splitter(df)
    assert splits[0].groupby("user").size().max() == 5
    specific, _ = held_out_rmse("specific", "last", splits)
    nme, _ = held_out_rmse("nme", "last", splits)
    assert nme < specific, f"nme {nme:.2f} vs specific {specific:.2f}"
