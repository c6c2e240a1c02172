"""A model's event log: every decision the learning loop takes (queued, trained, activated,
rejected, failed, rolled back, pruned, data skipped), with who took it and why.

Writers flush and never commit: an event commits with the change it describes, or not at all.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from service.storage.tables import ModelEvent, utcnow

SYSTEM = "system"
"""The actor of decisions the service takes by itself (triggers, champion/challenger)."""


def add_event(
    session: Session,
    *,
    model_id: int,
    kind: str,
    detail: str,
    actor: str = SYSTEM,
    version: int | None = None,
    job_id: int | None = None,
    data: dict[str, Any] | None = None,
) -> ModelEvent:
    """Record one event (flushes; it commits with the caller's transaction)."""
    event = ModelEvent(
        model_id=model_id,
        at=utcnow(),
        kind=kind,
        detail=detail,
        actor=actor[:100],
        version=version,
        job_id=job_id,
        data=data,
    )
    session.add(event)
    session.flush()
    return event


def list_events(
    session: Session,
    *,
    model_id: int,
    kind: str | None = None,
    before_id: int | None = None,
    limit: int = 100,
) -> list[ModelEvent]:
    """A model's events, newest first (ids below ``before_id`` only: the keyset page)."""
    statement = select(ModelEvent).where(ModelEvent.model_id == model_id)
    if kind is not None:
        statement = statement.where(ModelEvent.kind == kind)
    if before_id is not None:
        statement = statement.where(ModelEvent.id < before_id)
    return list(session.scalars(statement.order_by(ModelEvent.id.desc()).limit(limit)))


def count_events(session: Session, *, model_id: int, kind: str | None = None) -> int:
    """How many events a model has (of ``kind``, when given)."""
    statement = select(func.count()).select_from(ModelEvent).where(ModelEvent.model_id == model_id)
    if kind is not None:
        statement = statement.where(ModelEvent.kind == kind)
    return int(session.scalar(statement) or 0)


def prune_events(session: Session, *, older_than: datetime) -> int:
    """Delete events recorded before ``older_than``; returns how many."""
    result = session.execute(delete(ModelEvent).where(ModelEvent.at < older_than))
    return int(result.rowcount or 0)  # type: ignore[attr-defined]
