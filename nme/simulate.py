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


SEQUENCE_STATES = ["other", "aggressive", "dysphoric", "positive"]
"""States of :func:`simulate_sequences`, in the row/column order of its transition matrices."""

TRANSITION_COLUMNS = [f"p_{a}_{b}" for a in SEQUENCE_STATES for b in SEQUENCE_STATES]
"""Truth columns of :func:`simulate_sequences`: P(from a to b), row-major over the states."""

# Group transition probabilities (rows: from, columns: to, order SEQUENCE_STATES). Depressed
# persons move into and stay in aggressive/dysphoric more often and reach positive less; these
# differences are what the tests expect the learned person-specific transitions to recover.
_GROUP_TRANSITIONS = {
    "control": np.array([
        [0.60, 0.05, 0.10, 0.25],
        [0.40, 0.30, 0.10, 0.20],
        [0.40, 0.10, 0.30, 0.20],
        [0.30, 0.05, 0.05, 0.60],
    ]),
    "depressed": np.array([
        [0.45, 0.20, 0.25, 0.10],
        [0.20, 0.50, 0.20, 0.10],
        [0.20, 0.20, 0.50, 0.10],
        [0.35, 0.15, 0.15, 0.35],
    ]),
}


def _stationary(p: np.ndarray) -> np.ndarray:
    """Stationary distribution of a row-stochastic matrix ``p: (S, S)`` -> ``(S,)``."""
    vals, vecs = np.linalg.eig(p.T)
    v = np.abs(np.real(vecs[:, np.argmin(np.abs(vals - 1.0))]))
    return v / v.sum()


def simulate_sequences(
    n_persons: int = 100,
    n_sequences: int = 10,
    length: int = 30,
    seed: int = 0,
    depressed_share: float = 0.5,
    person_noise: float = 0.5,
    n_features: int = 6,
    signal: float = 1.0,
    noise: float = 1.0,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Labelled state sequences (e.g. turns of family conversations) with person-specific dynamics.

    Each person belongs to group ``"depressed"`` or ``"control"``; their transition matrix is
    the group's (see ``_GROUP_TRANSITIONS``) with log-normal noise per entry,
    Pⁱ ∝ P_group · exp(N(0, ``person_noise``²)), renormalised per row. A sequence starts in a
    state drawn from the person's stationary distribution and follows the Markov chain Pⁱ.

    Features of a segment in state s: the first four are ``signal``·onehot(s) + N(0, ``noise``²)
    (one noisy indicator per state), the remaining ``n_features - 4`` are pure noise. With the
    defaults a per-segment classifier is right only about half of the time, so the transitions
    (and a person's own transitions) carry much of the information.

    Returns:
        ``(data, truth)``. ``data``: one row per segment, sorted by person, sequence, position:
        ``person`` (str, ``"p0001"``…), ``sequence_id`` (int, unique over the data),
        ``position`` (0-based), ``f0``…``f{n_features-1}``, ``label`` (a state name).
        ``truth``: indexed by person, ``group`` and the true transition probabilities in
        :data:`TRANSITION_COLUMNS` (reshape to ``(n, 4, 4)`` for matrices).
    """
    if n_persons < 1 or n_sequences < 1 or length < 1:
        raise ValueError("n_persons, n_sequences and length must be at least 1")
    if n_features < len(SEQUENCE_STATES):
        raise ValueError(f"n_features must be at least {len(SEQUENCE_STATES)}")
    if not 0.0 <= depressed_share <= 1.0:
        raise ValueError("depressed_share must be in [0, 1]")
    rng = np.random.default_rng(seed)
    n_states = len(SEQUENCE_STATES)
    persons = np.array([f"p{k + 1:04d}" for k in range(n_persons)])
    n_depressed = int(round(depressed_share * n_persons))
    groups = np.array(["depressed"] * n_depressed + ["control"] * (n_persons - n_depressed))
    rng.shuffle(groups)
    base = np.stack([_GROUP_TRANSITIONS[g] for g in groups])  # (n, S, S)
    trans = base * np.exp(rng.normal(0.0, person_noise, base.shape))
    trans /= trans.sum(axis=-1, keepdims=True)

    n_seq = n_persons * n_sequences
    owner = np.repeat(np.arange(n_persons), n_sequences)  # (n_seq,)
    # Inverse-CDF sampling, vectorised over all sequences: the only loop runs over positions.
    first = np.stack([_stationary(t) for t in trans]).cumsum(-1)  # (n, S)
    cum = trans.cumsum(-1)  # (n, S, S)
    labels = np.empty((n_seq, length), dtype=np.int64)
    u = rng.random((n_seq, length))
    labels[:, 0] = (u[:, :1] > first[owner]).sum(-1)
    for t in range(1, length):
        rows = cum[owner, labels[:, t - 1]]  # (n_seq, S)
        labels[:, t] = (u[:, t : t + 1] > rows).sum(-1)
    labels = labels.clip(max=n_states - 1)  # guards the rounding of cumsum to 1 - eps

    flat = labels.ravel()
    x = rng.normal(0.0, noise, (flat.size, n_features))
    x[np.arange(flat.size), flat] += signal
    data = pd.DataFrame(
        {
            "person": persons[np.repeat(owner, length)],
            "sequence_id": np.repeat(np.arange(n_seq), length),
            "position": np.tile(np.arange(length), n_seq),
            **{f"f{k}": x[:, k].round(4) for k in range(n_features)},
            "label": np.asarray(SEQUENCE_STATES, dtype=object)[flat],
        }
    )
    truth = pd.DataFrame(
        trans.reshape(n_persons, -1), columns=TRANSITION_COLUMNS,
        index=pd.Index(persons, name="person"),
    )
    truth.insert(0, "group", groups)
    return data, truth
