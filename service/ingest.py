"""Ingest: validate a batch against the model's schema and upsert it.

The routes and the demo both call these, so simulated data goes through exactly the code that
real app backends hit.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy.orm import Session

from service import store
from service.errors import InvalidInput, invalid
from service.jobs.queue import enqueue_user_updates
from service.schemas import ObservationCreate, SequenceCreate
from service.tables import Model
from service.validation import (
    check_batch_size,
    check_labels,
    check_states,
    check_unique_keys,
    feature_matrix,
)


def ingest_observations(
    session: Session, *, model: Model, items: Sequence[ObservationCreate], max_batch: int
) -> store.UpsertCounts:
    """Validate and upsert daily observations; flushes, the caller commits."""
    check_batch_size(len(items), max_batch)
    if model.task == "sequence":
        raise InvalidInput(
            [
                invalid(
                    ["body", "items"],
                    f"model {model.name!r} is a sequence model: send sequences to /sequences",
                )
            ]
        )
    feature_matrix(
        model.features,
        [item.features for item in items],
        [["body", "items", i, "features"] for i in range(len(items))],
    )
    check_labels(
        model,
        [item.label for item in items],
        [["body", "items", i, "label"] for i in range(len(items))],
    )
    check_unique_keys([(item.user_id, item.day) for item in items], "(user_id, day)")
    user_ids = store.ensure_users(session, external_ids=[item.user_id for item in items])
    rows = [
        {
            "user_id": user_ids[item.user_id],
            "day": item.day,
            # Canonical key order: identical content serialises identically (SQLite compares
            # JSON as text when deciding whether a resend changed anything).
            "features": {name: item.features[name] for name in model.features},
            "label": item.label,
        }
        for item in items
    ]
    return store.upsert_observations(session, model_id=model.id, rows=rows)


def ingest_sequences(
    session: Session, *, model: Model, items: Sequence[SequenceCreate], max_batch: int
) -> store.UpsertCounts:
    """Validate and upsert labelled sequences; flushes, the caller commits."""
    check_batch_size(len(items), max_batch)
    if model.task != "sequence":
        raise InvalidInput(
            [
                invalid(
                    ["body", "items"],
                    f"model {model.name!r} is a {model.task} model: "
                    "send observations to /observations",
                )
            ]
        )
    for i, item in enumerate(items):
        feature_matrix(
            model.features,
            [segment.features for segment in item.segments],
            [["body", "items", i, "segments", k, "features"] for k in range(len(item.segments))],
        )
    check_states(
        model,
        [item.labels for item in items],
        [["body", "items", i, "labels"] for i in range(len(items))],
    )
    check_unique_keys(
        [(item.user_id, item.sequence_id) for item in items], "(user_id, sequence_id)"
    )
    user_ids = store.ensure_users(session, external_ids=[item.user_id for item in items])
    rows = [
        {
            "user_id": user_ids[item.user_id],
            "sequence_id": item.sequence_id,
            "segments": [
                {name: segment.features[name] for name in model.features}
                for segment in item.segments
            ],
            "labels": item.labels,
        }
        for item in items
    ]
    return store.upsert_sequences(session, model_id=model.id, rows=rows)


def queue_user_updates(
    session: Session, *, model: Model, counts: store.UpsertCounts, max_attempts: int = 3
) -> int:
    """Queue a coalesced per-user update for every user whose labels the ingest changed, in the
    ingest's own transaction (labels and their jobs commit together). Only models with an active
    version are updated per user; the others wait for their first refit. Returns jobs queued."""
    if not counts.labelled_users:
        return 0
    if store.get_active_version(session, model_id=model.id) is None:
        return 0
    return enqueue_user_updates(
        session, model_id=model.id, user_ids=counts.labelled_users, max_attempts=max_attempts
    )
