"""Liveness and readiness: the only routes open without an API key."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response, status
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from service.api.schemas import HealthPublic, ReadyPublic
from service.migrate import current_revision

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=HealthPublic)
async def healthz() -> HealthPublic:
    """The process is up (no database access: this is also the benchmark's bare route)."""
    return HealthPublic()


@router.get(
    "/readyz",
    response_model=ReadyPublic,
    responses={503: {"model": ReadyPublic, "description": "Database down or schema not at head"}},
)
def readyz(request: Request, response: Response) -> ReadyPublic:
    """The database answers and its schema is at the packaged head revision."""
    expected = request.app.state.expected_revision
    try:
        engine = request.app.state.engine
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
        revision = current_revision(engine)
        reachable = True
    except SQLAlchemyError:
        revision, reachable = None, False
    ready = reachable and revision == expected
    if not ready:
        response.status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    return ReadyPublic(
        status="ready" if ready else "unavailable",
        database=reachable,
        schema_revision=revision,
        expected_revision=expected,
    )
