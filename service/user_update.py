"""The per-user update: the E-step for one person.

θ̄, σ², Σ of the model's active version stay fixed; only the user's θⁱ is optimised on all of
their labels (``estimator.fit_person``), starting from their current row (a brand-new user
starts from the prior). The result replaces that user's row of the active version, so the next
prediction for them is personalised without a full refit.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlalchemy.orm import Session, sessionmaker

from service import store
from service.errors import NotFound
from service.predictor import Predictor
from service.tables import Model, ModelVersion


@dataclass(frozen=True)
class UserUpdateOutcome:
    """What a per-user update did. ``version`` is None when it was skipped (``reason``)."""

    version: int | None
    n_labels: int
    seconds: float
    reason: str

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly form (the job's final progress)."""
        return {
            "stage": "done",
            "version": self.version,
            "n_labels": self.n_labels,
            "seconds": round(self.seconds, 4),
            "message": self.reason,
        }


def user_training_data(
    session: Session, *, model: Model, user_id: int, known_classes: list[str] | None
) -> tuple[Any, Any, int]:
    """All of one user's labels in the estimator's input form.

    Returns ``(X, y, n)``: ``X (n, F) float32`` and ``y (n,)`` for per-day models, or a list of
    ``(L, F)`` feature arrays and a list of label lists for sequence models. Classification
    labels of classes the version never saw are left out (only a refit can learn a new class).
    """
    if model.task == "sequence":
        rows = store.load_user_sequences(session, model_id=model.id, user_id=user_id)
        features = [
            np.array([[s[name] for name in model.features] for s in row.segments], np.float32)
            for row in rows
        ]
        return features, [list(row.labels) for row in rows], len(rows)
    rows = store.load_user_observations(session, model_id=model.id, user_id=user_id)
    if known_classes is not None:
        allowed = set(known_classes)
        rows = [row for row in rows if row.label in allowed]
    x = np.array([[row.features[name] for name in model.features] for row in rows], np.float32)
    x = x.reshape(len(rows), len(model.features))  # (n, F), also when n = 0
    dtype = np.float64 if model.task == "regression" else object
    return x, np.asarray([row.label for row in rows], dtype=dtype), len(rows)


def update_user(
    session_factory: sessionmaker[Session],
    predictor: Predictor,
    *,
    model_id: int,
    user_id: int,
    before_commit: Callable[[Session, UserUpdateOutcome], None] | None = None,
) -> UserUpdateOutcome:
    """Re-fit one user's θⁱ in the active version and upsert their row (with ``n_obs``).

    Reads in one short transaction, fits with no transaction open, writes in one transaction
    (``before_commit`` runs inside it: the worker finishes its job there).
    """
    started = time.perf_counter()
    with session_factory() as session:
        model = session.get(Model, model_id)
        if model is None:
            raise NotFound(f"model {model_id} not found")
        version = store.get_active_version(session, model_id=model_id)
        if version is None:
            outcome = UserUpdateOutcome(None, 0, 0.0, "skipped: the model has no active version")
            _commit(session, outcome, before_commit)
            return outcome
        loaded = predictor.load(version)
        estimator = loaded.estimator
        classes = [str(c) for c in estimator.classes_] if model.task == "classification" else None
        x, y, n = user_training_data(session, model=model, user_id=user_id, known_classes=classes)
        current = store.get_person_param(session, version_id=version.id, user_id=user_id)
        init = None if current is None else np.frombuffer(current.effects, dtype="<f4").copy()
    if n == 0:
        outcome = UserUpdateOutcome(version.version, 0, time.perf_counter() - started,
                                    "skipped: the user has no usable labels")
        with session_factory() as session:
            _commit(session, outcome, before_commit)
        return outcome
    with loaded.lock:
        theta = estimator.fit_person(x, y, init=init)  # (d,)
    outcome = UserUpdateOutcome(
        version.version, n, time.perf_counter() - started,
        f"θⁱ of version {version.version} re-fitted on {n} labels",
    )
    with session_factory() as session:
        _write_row(session, version, user_id, theta, n)
        _commit(session, outcome, before_commit)
    return outcome


def _write_row(
    session: Session, version: ModelVersion, user_id: int, theta: np.ndarray, n: int
) -> None:
    if store.get_user_by_id(session, user_id=user_id) is None:
        return  # forgotten while we fitted: no row must bring them back
    store.upsert_person_param(
        session,
        version_id=version.id,
        user_id=user_id,
        effects=np.asarray(theta, dtype="<f4").tobytes(),
        n_obs=n,
    )


def _commit(
    session: Session,
    outcome: UserUpdateOutcome,
    before_commit: Callable[[Session, UserUpdateOutcome], None] | None,
) -> None:
    if before_commit is not None:
        before_commit(session, outcome)
    session.commit()
