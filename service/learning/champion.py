"""Champion/challenger: a refit's new version is activated only if it scores no worse than the
active version on the same held-out labels.

Both are scored per person (then averaged) on the refit's validation split, and both the same
way. The champion's stored θⁱ cannot be used as they are: per-user updates fit θⁱ on *all* of a
user's labels, validation labels included, which would hand the champion an unfair lead. So
each version is scored as it serves after per-user updates on the same training labels: its
θ̄, σ², Σ with each validation user's θⁱ re-estimated by the E-step (``fit_person``) on that
user's training split, starting from the version's own row for them. Identical training data
and seed therefore give identical scores (a tie activates: "not worse").
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy.orm import Session

from service.learning.kinds import TrainingData, kind_of
from service.storage import store
from service.storage.artifacts import load_verified
from service.storage.codec import decode_effects
from service.storage.tables import Model, ModelVersion

TIE_TOLERANCE = 1e-4
"""Relative slack (0.01 %) below which two scores count as equal: the E-step's L-BFGS stops at
a tolerance, so identical versions can differ in the 6th digit, and noise is not "worse"."""


@dataclass(frozen=True)
class Decision:
    """Whether to activate a challenger, and why."""

    activate: bool
    reason: str
    challenger_score: float | None
    champion_score: float | None
    champion_version: int | None

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly form (stored in the version's metrics and the job's progress)."""
        return asdict(self)


def decide(
    challenger_score: float | None,
    champion_score: float | None,
    champion_version: int | None,
    *,
    score_name: str,
    champion_error: str | None = None,
    baseline_score: float | None = None,
) -> Decision:
    """Activate unless the champion scored strictly better (higher is better).

    Without a champion, a first version activates only if it beats ``baseline_score`` (the
    trivial predictor: the training labels' mean, or their most frequent class or state) on
    the held-out labels. A challenger whose score is not finite never activates; a champion
    whose score is not finite never blocks a finite challenger.
    """

    def make(activate: bool, reason: str) -> Decision:
        return Decision(activate, reason, challenger_score, champion_score, champion_version)

    if challenger_score is not None and not math.isfinite(challenger_score):
        return make(False, f"{score_name} is not finite: kept as ready, not served")
    if champion_version is None:
        if challenger_score is None or baseline_score is None:
            return make(True, "no active version to compare with")
        if challenger_score > baseline_score:
            return make(
                True,
                f"no active version; {score_name} {challenger_score:.4g} beats the trivial "
                f"predictor's {baseline_score:.4g}",
            )
        return make(
            False,
            f"no active version, but {score_name} {challenger_score:.4g} does not beat the "
            f"trivial predictor's {baseline_score:.4g} (the training labels' mean or most "
            "frequent class) on the same validation labels; kept as ready",
        )
    if challenger_score is None:
        return make(True, "no validation labels: nothing to compare on")
    if champion_score is None:
        return make(True, f"version {champion_version} cannot be scored: {champion_error}")
    if not math.isfinite(champion_score):
        return make(True, f"version {champion_version}'s {score_name} is not finite")
    if challenger_score >= champion_score - TIE_TOLERANCE * max(1.0, abs(champion_score)):
        return make(
            True,
            f"{score_name} {challenger_score:.4g} is not worse than version "
            f"{champion_version}'s {champion_score:.4g}",
        )
    return make(
        False,
        f"{score_name} {challenger_score:.4g} is worse than active version "
        f"{champion_version}'s {champion_score:.4g} on the same validation labels; "
        "kept as ready (activate it manually if wanted)",
    )


def score_champion(
    session: Session,
    *,
    model: Model,
    champion: ModelVersion,
    data: TrainingData,
    artifact_dir: Path,
    device: str,
) -> float:
    """The active version's score on a refit's split (see module doc).

    Raises ``ValueError`` (or ``ArtifactCorrupt``) when the champion cannot score these labels,
    e.g. a class it never saw.
    """
    estimator = load_verified(
        artifact_dir, champion.artifact_path, champion.artifact_sha256, device
    )
    persons = sorted(set(data.persons_val))
    stored = store.fetch_person_params(session, version_id=champion.id, external_ids=persons)
    init = {p: decode_effects(raw) for p, raw in stored.items()}
    return e_step_score(model, estimator, data, init)


def score_challenger(model: Model, estimator: Any, data: TrainingData) -> float:
    """The new version's score on its own split, computed exactly like the champion's."""
    table = estimator.effects_matrix()  # (n_persons, d)
    init = {str(p): table[k] for k, p in enumerate(estimator.person_ids_)}
    return e_step_score(model, estimator, data, init)


def e_step_score(
    model: Model, estimator: Any, data: TrainingData, init: dict[str, np.ndarray]
) -> float:
    """Per-person validation score with each validation user's θⁱ re-estimated by the E-step on
    their training labels (from ``init[user]`` when given; users without training labels keep
    ``init`` or get the generic model)."""
    train_rows: dict[str, list[int]] = defaultdict(list)
    for k, person in enumerate(data.persons_train):
        train_rows[person].append(k)
    kind = kind_of(model)
    rows: dict[str, np.ndarray] = {}
    for person in sorted(set(data.persons_val)):
        start = init.get(person)
        index = train_rows.get(person, [])
        if not index:
            if start is not None:
                rows[person] = start
            continue
        rows[person] = estimator.fit_person(*kind.person_train_inputs(data, index), init=start)
    n_val = len(data.persons_val)
    effects = np.zeros((n_val, estimator.n_effects_), dtype=np.float32)  # (n_val, d)
    known = np.zeros(n_val, dtype=bool)
    for k, person in enumerate(data.persons_val):
        if person in rows:
            effects[k], known[k] = rows[person], True
    return kind.score(estimator, data, effects=effects, known=known)
