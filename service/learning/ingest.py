"""Ingest: validate a batch against the model's schema and upsert it.

The routes and the demo both call these, so simulated data goes through exactly the code that
real app backends hit. What a valid item is depends on the model's kind.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy.orm import Session

from service.learning.kinds import kind_of
from service.learning.validation import check_batch_size
from service.storage import store
from service.storage.tables import Model


def ingest_observations(
    session: Session, *, model: Model, items: Sequence[Any], max_batch: int
) -> store.UpsertCounts:
    """Validate and upsert daily observations; flushes, the caller commits."""
    return _ingest(session, model=model, items=items, max_batch=max_batch, route="observations")


def ingest_sequences(
    session: Session, *, model: Model, items: Sequence[Any], max_batch: int
) -> store.UpsertCounts:
    """Validate and upsert labelled sequences; flushes, the caller commits."""
    return _ingest(session, model=model, items=items, max_batch=max_batch, route="sequences")


def _ingest(
    session: Session, *, model: Model, items: Sequence[Any], max_batch: int, route: str
) -> store.UpsertCounts:
    check_batch_size(len(items), max_batch)
    kind = kind_of(model)
    kind.require_route(model, route)
    return kind.ingest(session, model=model, items=items)
