"""A model's history: every decision the learning loop took, newest first (admin)."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter

from service.api.deps import AdminKey, ModelDep, SessionDep
from service.api.paging import DEFAULT_LIMIT, Cursor, Limit, decode_cursor, split_page
from service.api.schemas import EventPublic, EventsPublic
from service.storage import events
from service.storage.tables import EVENT_KINDS

router = APIRouter(prefix="/v1/models", tags=["events"])

EventKind = Literal[EVENT_KINDS]  # type: ignore[valid-type]  # the tables' list, one source


@router.get("/{name}/events", response_model=EventsPublic)
def list_events(
    _key: AdminKey,
    model: ModelDep,
    session: SessionDep,
    kind: EventKind | None = None,
    limit: Limit = DEFAULT_LIMIT,
    cursor: Cursor = None,
) -> EventsPublic:
    """Which version served when, and why: refits queued (with the trigger's reason), versions
    trained, activated, rejected (with both scores), failed, rolled back and pruned, and data a
    refit left out. Optionally filtered by ``kind``; paged (see `next_cursor`)."""
    before = decode_cursor(cursor, int)
    rows = events.list_events(
        session, model_id=model.id, kind=kind, before_id=before, limit=limit + 1
    )
    page, following = split_page(rows, limit, key=lambda event: event.id)
    return EventsPublic(
        data=[EventPublic.model_validate(event, from_attributes=True) for event in page],
        count=events.count_events(session, model_id=model.id, kind=kind),
        next_cursor=following,
    )
