"""The per-user update: the E-step for one person.

θ̄, σ², Σ of the model's active version stay fixed; only the user's θⁱ is optimised on all of
their labels (``estimator.fit_person``), starting from their current row (a brand-new user
starts from the prior). The result replaces that user's row of the active version, so the next
prediction for them is personalised without a full refit.

:func:`fit_user` reads in one short transaction and fits with no transaction open;
:func:`write_user_fit` writes the row (flushes; the caller commits, e.g. together with the job's
status). :func:`update_user` does both and commits.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

import numpy as np
from sqlalchemy.orm import Session, sessionmaker

from service.errors import NotFound
from service.learning.kinds import kind_of
from service.learning.serving import Predictor
from service.storage import store
from service.storage.codec import decode_effects, encode_effects
from service.storage.tables import Model


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


@dataclass(frozen=True)
class UserFit:
    """A fitted θⁱ row ``(d,)`` for one user and version, not yet written (None: skipped)."""

    outcome: UserUpdateOutcome
    version_id: int | None
    model_id: int
    user_id: int
    theta: np.ndarray | None
    read_updated_at: datetime | None = None
    """The row's ``updated_at`` when the fit read it (None: no row): the write is a
    compare-and-set against it."""
    variance: np.ndarray | None = None
    """``(d,)`` the θⁱ posterior variance (prediction intervals), refreshed with the row."""


def fit_user(
    session_factory: sessionmaker[Session],
    predictor: Predictor,
    *,
    model_id: int,
    user_id: int,
) -> UserFit:
    """Re-fit one user's θⁱ in the active version on all of their usable labels."""
    started = time.perf_counter()
    with session_factory() as session:
        model = session.get(Model, model_id)
        if model is None:
            raise NotFound(f"model {model_id} not found")
        version = store.get_active_version(session, model_id=model_id)
        if version is None:
            outcome = UserUpdateOutcome(None, 0, 0.0, "skipped: the model has no active version")
            return UserFit(outcome, None, model_id, user_id, None)
        loaded = predictor.load(version)
        data = kind_of(model).user_data(
            session, model=model, user_id=user_id, estimator=loaded.estimator
        )
        current = store.get_person_param(session, version_id=version.id, user_id=user_id)
        init = None if current is None else decode_effects(current.effects)
        read_updated_at = None if current is None else current.updated_at
        version_id, number = version.id, version.version
    if data.n == 0:
        outcome = UserUpdateOutcome(
            number, 0, time.perf_counter() - started, "skipped: the user has no usable labels"
        )
        return UserFit(outcome, None, model_id, user_id, None)
    with loaded.lock:
        theta, variance = loaded.estimator.fit_person(  # (d,) each
            *data.inputs, init=init, return_variance=True
        )
    outcome = UserUpdateOutcome(
        number, data.n, time.perf_counter() - started,
        f"θⁱ of version {number} re-fitted on {data.n} labels",
    )
    return UserFit(
        outcome, version_id, model_id, user_id, np.asarray(theta), read_updated_at,
        variance=np.asarray(variance),
    )


def write_user_fit(session: Session, fit: UserFit) -> UserUpdateOutcome:
    """Write the fitted row (with ``n_obs``) unless it went stale; flushes, the caller commits.

    Nothing is written for a skipped update, for a user forgotten while the fit ran, or when
    another update wrote the row since this fit read it (the newer θⁱ stays). Returns the
    outcome to report.
    """
    if fit.theta is None or fit.version_id is None:
        return fit.outcome
    if not store.users_with_data(session, model_id=fit.model_id, user_ids=[fit.user_id]):
        return fit.outcome  # forgotten while we fitted: no row must bring them back
    written = store.replace_person_param(
        session,
        version_id=fit.version_id,
        user_id=fit.user_id,
        effects=encode_effects(fit.theta),
        n_obs=fit.outcome.n_labels,
        expected_updated_at=fit.read_updated_at,
        effects_var=None if fit.variance is None else encode_effects(fit.variance),
    )
    if written:
        return fit.outcome
    return replace(
        fit.outcome, reason="not written: a newer update of this user's θⁱ finished first"
    )


def update_user(
    session_factory: sessionmaker[Session],
    predictor: Predictor,
    *,
    model_id: int,
    user_id: int,
) -> UserUpdateOutcome:
    """Fit and write one user's θⁱ row, committing it."""
    fit = fit_user(session_factory, predictor, model_id=model_id, user_id=user_id)
    with session_factory() as session:
        outcome = write_user_fit(session, fit)
        session.commit()
    return outcome
