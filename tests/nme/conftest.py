"""Fixtures for the modelling core: small simulated mood data split in time within person."""

from __future__ import annotations

import pandas as pd
import pytest

from nme.data import temporal_split
from nme.simulate import MOOD_FEATURES, simulate_mood


def split_mood(df: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """First 60 % of each person's days train, next 20 % validate, last 20 % test."""
    part = temporal_split(df["user"].to_numpy(), (0.6, 0.2, 0.2))
    return df[part == 0], df[part == 1], df[part == 2]


@pytest.fixture(scope="session")
def splitter():  # type: ignore[no-untyped-def]
    """The within-person 60/20/20 split, as a fixture so test modules need no imports."""
    return split_mood


@pytest.fixture(scope="session")
def mood_splits() -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    df, _ = simulate_mood(n_persons=60, n_days=50, seed=3)
    return split_mood(df)


@pytest.fixture(scope="session")
def features() -> list[str]:
    return list(MOOD_FEATURES)
