"""Daily observations (features and optional labels): an idempotent upsert per (user, day)."""

from __future__ import annotations

from fastapi import APIRouter

from service.api.deps import IngestKey, ModelDep, SessionDep, SettingsDep
from service.api.limits import check_items
from service.api.schemas import IngestPublic, ObservationsCreate
from service.jobs.triggers import queue_user_updates
from service.learning.ingest import ingest_observations

router = APIRouter(prefix="/v1/models", tags=["ingest"])


@router.post("/{name}/observations", response_model=IngestPublic)
def post_observations(
    _key: IngestKey,
    model: ModelDep,
    body: ObservationsCreate,
    session: SessionDep,
    settings: SettingsDep,
) -> IngestPublic:
    """Insert or update observations; resending identical data changes nothing. Users whose
    labels changed get a background per-user update (see docs/service.md)."""
    check_items(body.items, settings)
    counts = ingest_observations(
        session, model=model, items=body.items, max_batch=settings.max_batch
    )
    if settings.user_updates_on_ingest:
        queue_user_updates(
            session, model=model, counts=counts, max_attempts=settings.job_max_attempts
        )
    session.commit()
    return IngestPublic(inserted=counts.inserted, updated=counts.updated)
