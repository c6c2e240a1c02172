"""Refits. Synchronous for now; the background-worker issue turns this into an enqueued job
(202 + job id) running the same pipeline (``service.refit.refit_model``)."""

from __future__ import annotations

from fastapi import APIRouter, Request

from service.api.deps import AdminKey, ModelDep, SessionDep, SettingsDep
from service.refit import refit_model
from service.schemas import RefitPublic

router = APIRouter(prefix="/v1/models", tags=["jobs"])


@router.post("/{name}/refit", response_model=RefitPublic)
def refit(
    _key: AdminKey, model: ModelDep, session: SessionDep, request: Request, settings: SettingsDep
) -> RefitPublic:
    """Train a new version on all labels so far and activate it (blocks until done)."""
    # Release the request's connection: training takes a while and manages its own sessions.
    session.close()
    version = refit_model(
        request.app.state.session_factory,
        model_name=model.name,
        artifact_dir=settings.artifact_dir,
        device=settings.device,
    )
    return RefitPublic(version=version.version, status=version.status, metrics=version.metrics)
