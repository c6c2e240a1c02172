"""``GET /metrics``: Prometheus text format, admin scope (scrape with a bearer token)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.api.deps import UnscopedAdminKey

router = APIRouter(tags=["metrics"])


@router.get("/metrics", response_class=Response)
def metrics(_key: UnscopedAdminKey, request: Request) -> Response:
    """Request, prediction, job and version metrics (see docs/service.md, Observability)."""
    registry = request.app.state.metrics.registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
