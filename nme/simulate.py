"""Synthetic data with known generic and person-specific effects.

``simulate_mood`` is shaped like the paper's Figure 1: daily mood with a generic weekday/weekend
effect, a person-specific baseline, a person-specific weekly event (a nonlinear effect: it only
happens on that person's weekday) and a person-specific sensitivity to one feature, seen through
smartphone-like features.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

MOOD_FEATURES = ["weekday", "typing_speed", "screen_minutes", "gps_km"]


def simulate_mood(
    n_persons: int = 200,
    n_days: int = 60,
    seed: int = 0,
    person_effects: float = 1.0,
    noise: float = 3.0,
    start: str = "2026-01-05",
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Daily mood (0–100 scale) for ``n_persons`` × ``n_days``.

    mood = 50 + 4·weekend + 3·tanh(typing z) − 2·(screen z)²            (generic)
           + bᵢ + eᵢ·[weekday = dᵢ] + sᵢ·(gps z)                          (person-specific)
           + noise

    with bᵢ ~ N(0, 8²), eᵢ ~ N(0, 10²), dᵢ uniform over weekdays, sᵢ ~ N(0, 3²), all scaled by
    ``person_effects`` (0 gives a population without person effects).

    Returns:
        ``(data, truth)``. ``data`` has one row per person-day, sorted by user then day:
        ``user`` (str, ``"u0001"``…), ``day`` (datetime64; each person starts on one of the
        first seven days from ``start``), ``weekday`` (0 = Monday),
        ``typing_speed`` (chars/s), ``screen_minutes``, ``gps_km``, ``mood``. ``truth`` is
        indexed by user with columns ``baseline``, ``event_day``, ``event_size``,
        ``gps_slope``.
    """
    if n_persons < 1 or n_days < 1:
        raise ValueError("n_persons and n_days must be at least 1")
    rng = np.random.default_rng(seed)
    users = np.array([f"u{k + 1:04d}" for k in range(n_persons)])
    truth = pd.DataFrame(
        {
            "baseline": rng.normal(0, 8, n_persons) * person_effects,
            "event_day": rng.integers(0, 7, n_persons),
            "event_size": rng.normal(0, 10, n_persons) * person_effects,
            "gps_slope": rng.normal(0, 3, n_persons) * person_effects,
        },
        index=pd.Index(users, name="user"),
    )
    # people join on different days, so every person's first days cover different weekdays
    offset = rng.integers(0, 7, n_persons)
    p = np.repeat(np.arange(n_persons), n_days)
    day_index = offset[p] + np.tile(np.arange(n_days), n_persons)
    day = pd.Timestamp(start) + pd.to_timedelta(day_index, unit="D")
    weekday = day.day_of_week.to_numpy()
    day = day.to_numpy()
    n = n_persons * n_days
    # person-level habits make features differ between people, as real phone data does
    typing_mu = rng.normal(4.0, 0.8, n_persons)
    screen_mu = rng.normal(180, 40, n_persons)
    typing = typing_mu[p] + rng.normal(0, 0.6, n)
    screen = np.clip(screen_mu[p] + rng.normal(0, 45, n) + 30 * (weekday >= 5), 0, None)
    gps = rng.gamma(2.0, 3.0, n) + 4 * (weekday >= 5)
    z = lambda v: (v - v.mean()) / v.std()  # noqa: E731
    generic = 50 + 4 * (weekday >= 5) + 3 * np.tanh(z(typing)) - 2 * z(screen) ** 2
    specific = (
        truth["baseline"].values[p]
        + truth["event_size"].values[p] * (weekday == truth["event_day"].values[p])
        + truth["gps_slope"].values[p] * z(gps)
    )
    mood = generic + specific + rng.normal(0, noise, n)
    data = pd.DataFrame(
        {
            "user": users[p],
            "day": day,
            "weekday": weekday,
            "typing_speed": typing.round(3),
            "screen_minutes": screen.round(1),
            "gps_km": gps.round(2),
            "mood": mood.round(2),
        }
    )
    return data, truth
