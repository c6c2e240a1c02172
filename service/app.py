"""The FastAPI application factory. Nothing is created at import time: ``create_app`` builds
the engine, session factory and caches in the lifespan, from the settings it is given.

Run it with ``nme-service serve`` or ``uvicorn --factory service.app:create_app``.
"""

from __future__ import annotations

import gc
import logging
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DisconnectionError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from service.api.deps import KeyCache
from service.api.prometheus import MetricsMiddleware, ServiceMetrics
from service.api.routes import (
    events,
    health,
    jobs,
    metrics,
    models,
    observations,
    predict,
    sequences,
    users,
)
from service.config import Settings
from service.db import make_engine, make_session_factory
from service.errors import ServiceError
from service.learning.serving import Predictor
from service.migrate import head_revision

log = logging.getLogger("service.api")

DESCRIPTION = """Personalised predictions with Neural Mixed Effects (NME).

Every route except `/healthz` and `/readyz` needs `Authorization: Bearer <key>`; keys carry the
scopes `predict`, `ingest` and/or `admin` (see `nme-service create-key`)."""


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app for ``settings`` (default: read from the environment)."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        torch_threads = torch.get_num_threads()
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        engine = make_engine(
            settings.sqlalchemy_url,
            connect_timeout=settings.db_connect_timeout_seconds,
            statement_timeout=settings.db_statement_timeout_seconds,
        )
        app.state.engine = engine
        app.state.session_factory = make_session_factory(engine)
        app.state.predictor = Predictor(artifact_dir=settings.artifact_dir, device=settings.device)
        app.state.key_cache = KeyCache(settings.auth_cache_seconds)
        app.state.expected_revision = head_revision()
        # Move everything alive now (torch, SQLAlchemy, pydantic: ~300k objects) out of the
        # garbage collector's reach: full collections scanning them were the p99 of a 1 000-user
        # batch (310 ms → 40 ms). freeze() is O(1); no collect() first, startup garbage is small.
        gc.freeze()
        try:
            yield
        finally:
            engine.dispose()
            # Process-wide knobs go back to what they were (tests run many apps in one process).
            gc.unfreeze()
            torch.set_num_threads(torch_threads)

    app = FastAPI(
        title="NME prediction service",
        version="1",
        description=DESCRIPTION,
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = ServiceMetrics(lambda: getattr(app.state, "engine", None))
    for module in (
        health, models, observations, predict, sequences, users, jobs, events, metrics
    ):
        app.include_router(module.router)
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)
    app.add_exception_handler(ServiceError, _service_error)
    for error in DATABASE_ERRORS:
        app.add_exception_handler(error, _database_unavailable)
    app.add_exception_handler(RequestValidationError, _validation_error)
    return app


async def _service_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServiceError)
    return JSONResponse(status_code=exc.status_code, content={"detail": exc.detail})


DATABASE_ERRORS = (OperationalError, InterfaceError, DisconnectionError, PoolTimeout)
"""What an unreachable, restarting or overloaded database raises (and statement timeouts)."""
RETRY_AFTER_SECONDS = 5


async def _database_unavailable(_request: Request, exc: Exception) -> JSONResponse:
    log.warning(f"database unavailable: {type(exc).__name__}", extra={"action": "503"})
    return JSONResponse(
        status_code=503,
        content={"detail": "the database is unavailable; retry after a few seconds"},
        headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
    )


async def _validation_error(_request: Request, exc: Exception) -> JSONResponse:
    # FastAPI's own handler echoes the offending input, and a NaN or ±inf input (Python's json
    # accepts them) cannot be serialised back: it would turn a 422 into a 500.
    assert isinstance(exc, RequestValidationError)
    return JSONResponse(
        status_code=422, content={"detail": _json_safe(jsonable_encoder(exc.errors()))}
    )


def _json_safe(value: Any) -> Any:
    """Replace non-finite floats (anywhere in a JSON-like value) by their string form."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(item) for item in value]
    return value
