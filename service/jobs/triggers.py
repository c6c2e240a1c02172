"""When jobs are queued without being asked for: a per-user update when a user's labels change,
and a refit when enough new labels accrued or the active version is old.

"New" labels are labelled observations or sequences added or changed after the model's last
refit *attempt* read its data (``models.refit_attempted_at``: activated, rejected or failed for
good) — or after the active version read its data, whichever is later. A rejected or failed
refit therefore counts as an attempt: nothing is queued again until labels change, and after
rejections or failures the next attempt waits for the model's back-off
(``models.refit_not_before``, see ``service.learning.history``). The age rule only fires when at
least one label is new (retraining on identical data would reproduce the same version).
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.orm import Session

from service.jobs.queue import enqueue_job, enqueue_user_updates, pending_refit
from service.storage import events, store
from service.storage.tables import Model, utcnow


@dataclass(frozen=True)
class Triggered:
    """A refit the check queued: for which model, its job id, and why."""

    model: str
    job_id: int
    reason: str


def check_refit_triggers(
    session: Session, *, min_new_labels: int, max_age_seconds: float, max_attempts: int = 3
) -> list[Triggered]:
    """Queue a refit for every model whose rule fires and that has none queued or running,
    with a ``refit_queued`` event naming the reason. Flushes; the caller commits."""
    triggered: list[Triggered] = []
    now = utcnow()
    for model in store.list_models(session):
        if model.refit_not_before is not None and now < model.refit_not_before:
            continue
        if pending_refit(session, model_id=model.id):
            continue
        active = store.get_active_version(session, model_id=model.id)
        since = model.refit_attempted_at
        if active is not None and (since is None or active.trained_until > since):
            since = active.trained_until
        new = store.count_labels_since(session, model_id=model.id, since=since)
        if new == 0:
            continue
        reason = None
        if min_new_labels and new >= min_new_labels:
            reason = f"{new} new labels (threshold {min_new_labels})"
        elif active is not None and max_age_seconds:
            age = (now - active.created_at).total_seconds()
            if age > max_age_seconds:
                reason = f"version {active.version} is {age:.0f} s old with {new} new labels"
        if reason is not None:
            job, created = enqueue_job(
                session, kind="refit", model_id=model.id, max_attempts=max_attempts
            )
            if not created:  # a refit was queued (by hand) since pending_refit looked
                continue
            events.add_event(
                session, model_id=model.id, kind="refit_queued", job_id=job.id,
                actor="trigger", detail=f"refit queued: {reason}",
                data={"new_labels": new},
            )
            triggered.append(Triggered(model.name, job.id, reason))
    return triggered


def queue_user_updates(
    session: Session, *, model: Model, counts: store.UpsertCounts, max_attempts: int = 3
) -> int:
    """Queue a coalesced per-user update for every user whose labels an ingest changed, in the
    ingest's own transaction (labels and their jobs commit together). Only models with an active
    version are updated per user; the others wait for their first refit. Returns jobs queued."""
    if not counts.labelled_users:
        return 0
    if store.get_active_version(session, model_id=model.id) is None:
        return 0
    return enqueue_user_updates(
        session, model_id=model.id, user_ids=counts.labelled_users, max_attempts=max_attempts
    )
