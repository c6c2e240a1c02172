"""What a refit attempt leaves behind besides its version: the model's event log and the refit
trigger's memory.

Every attempt — activated, rejected or permanently failed — moves ``models.refit_attempted_at``
(labels changed after it are "new" to the trigger). Rejections and failures also count in
``models.refit_failures`` and push ``models.refit_not_before`` out exponentially, so a model
whose refits keep losing (or failing) is retried less and less often instead of every check;
an activation resets both. All functions flush; they commit with the caller's transaction.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy.orm import Session

from service.learning.refit import TrainedVersion
from service.storage import events
from service.storage.tables import Model, ModelVersion, utcnow

MAX_BACKOFF = timedelta(days=1)
"""The longest wait between two refit attempts of a model that keeps failing."""


def backoff(failures: int, base_seconds: float) -> timedelta:
    """Wait before the next attempt after ``failures`` consecutive rejections or failures:
    ``base · 2^(failures − 1)``, at most a day (0 for no failures)."""
    if failures <= 0 or base_seconds <= 0:
        return timedelta(0)
    return min(MAX_BACKOFF, timedelta(seconds=base_seconds * 2 ** min(failures - 1, 30)))


def record_refit(
    session: Session,
    trained: TrainedVersion,
    version: ModelVersion,
    *,
    job_id: int | None,
    actor: str,
    backoff_seconds: float,
) -> None:
    """Events for a recorded version (what training left out, trained, activated or rejected)
    and the trigger's memory of the attempt."""
    model = session.get(Model, trained.model.id)
    if model is None:
        return
    for warning in trained.data.warnings:
        events.add_event(
            session, model_id=model.id, kind=warning.kind, detail=warning.detail,
            actor=actor, version=version.version, job_id=job_id, data=warning.data,
        )
    metrics = trained.metrics
    score = metrics.get("val_score")
    events.add_event(
        session, model_id=model.id, kind="version_trained", actor=actor,
        version=version.version, job_id=job_id,
        detail=f"version {version.version} trained on {version.n_observations} labels of "
        f"{version.n_users} users"
        + (f"; validation {metrics['score_name']} {score:.4g}" if score is not None else ""),
        data={"score_name": metrics.get("score_name"), "val_score": score,
              "val_score_generic": metrics.get("val_score_generic")},
    )
    decision = trained.decision
    reason = decision.reason if decision is not None else "activated as asked"
    scores = None if decision is None else {
        "challenger_score": decision.challenger_score,
        "champion_score": decision.champion_score,
        "champion_version": decision.champion_version,
    }
    if version.status == "active":
        events.add_event(
            session, model_id=model.id, kind="activated", actor=actor, version=version.version,
            job_id=job_id, detail=f"version {version.version} activated: {reason}", data=scores,
        )
        model.refit_failures, model.refit_not_before = 0, None
    elif decision is not None and not decision.activate:
        events.add_event(
            session, model_id=model.id, kind="rejected", actor=actor, version=version.version,
            job_id=job_id, detail=f"version {version.version} not activated: {reason}",
            data=scores,
        )
        _count_failure(model, backoff_seconds)
    model.refit_attempted_at = max_time(model.refit_attempted_at, trained.data.read_at)
    session.flush()


def record_refit_failure(
    session: Session,
    *,
    model_id: int,
    job_id: int | None,
    message: str,
    attempted_at: datetime,
    backoff_seconds: float,
) -> None:
    """A refit that failed for good: an event with its (human) reason, and back-off."""
    model = session.get(Model, model_id)
    if model is None:
        return
    _count_failure(model, backoff_seconds)
    model.refit_attempted_at = max_time(model.refit_attempted_at, attempted_at)
    wait = model.refit_not_before - utcnow() if model.refit_not_before else timedelta(0)
    events.add_event(
        session, model_id=model.id, kind="refit_failed", job_id=job_id,
        detail=f"refit failed: {message}; next automatic attempt after new labels, "
        f"in {wait.total_seconds():.0f} s at the earliest",
        data={"failures_in_a_row": model.refit_failures},
    )
    session.flush()


def record_activation(
    session: Session,
    *,
    model_id: int,
    version: ModelVersion,
    previous: ModelVersion | None,
    actor: str,
) -> None:
    """A manual activation: ``rolled_back`` to an older version, else ``activated``."""
    older = previous is not None and version.version < previous.version
    was = f" (was version {previous.version})" if previous is not None else ""
    events.add_event(
        session, model_id=model_id, kind="rolled_back" if older else "activated", actor=actor,
        version=version.version,
        detail=f"version {version.version} activated by hand{was}",
    )


def _count_failure(model: Model, backoff_seconds: float) -> None:
    model.refit_failures = (model.refit_failures or 0) + 1
    model.refit_not_before = utcnow() + backoff(model.refit_failures, backoff_seconds)


def max_time(current: datetime | None, new: datetime) -> datetime:
    """The later of two times (None counts as earliest)."""
    return new if current is None or new > current else current
