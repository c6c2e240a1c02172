"""Daily observations (features and optional labels): an idempotent upsert per (user, day)."""

from __future__ import annotations

from fastapi import APIRouter

from service.api.deps import IngestKey, ModelDep, SessionDep, SettingsDep
from service.ingest import ingest_observations
from service.schemas import IngestPublic, ObservationsCreate

router = APIRouter(prefix="/v1/models", tags=["ingest"])


@router.post("/{name}/observations", response_model=IngestPublic)
def post_observations(
    _key: IngestKey,
    model: ModelDep,
    body: ObservationsCreate,
    session: SessionDep,
    settings: SettingsDep,
) -> IngestPublic:
    """Insert or update observations; resending identical data changes nothing."""
    counts = ingest_observations(
        session, model=model, items=body.items, max_batch=settings.max_batch
    )
    session.commit()
    return IngestPublic(inserted=counts.inserted, updated=counts.updated)
