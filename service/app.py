"""The FastAPI application factory. Nothing is created at import time: ``create_app`` builds
the engine, session factory and caches in the lifespan, from the settings it is given.

Run it with ``nme-service serve`` or ``uvicorn --factory service.app:create_app``.
"""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import torch
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError

from service.api.errors import (
    DATABASE_ERRORS,
    database_unavailable,
    service_error,
    validation_error,
)
from service.api.fastpath import PredictFastPath
from service.api.guard import KeyCache, RateLimiter, RequestGuard
from service.api.prometheus import MetricsMiddleware, ServiceMetrics
from service.api.routes import (
    docs,
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

DESCRIPTION = """Personalised predictions with Neural Mixed Effects (NME).

Every route except `/healthz`, `/readyz` and these documentation pages needs
`Authorization: Bearer <key>`; keys carry the scopes `predict`, `ingest` and/or `admin` (see
`nme-service create-key`). Requests are limited per key (429 with `Retry-After`) and in size
(bodies over `NME_MAX_BODY_BYTES`: 413); see docs/service.md for every limit."""


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
            pool_size=settings.db_pool_size,
        )
        app.state.engine = engine
        app.state.session_factory = make_session_factory(engine)
        app.state.predictor = Predictor(
            artifact_dir=settings.artifact_dir,
            device=settings.device,
            active_ttl=settings.active_version_ttl_seconds,
            torch_threads=settings.torch_threads,
        )
        app.state.key_cache = KeyCache(settings.auth_cache_seconds)
        app.state.predictions = predict.prediction_batcher(app.state)
        app.state.expected_revision = head_revision()
        # Move everything alive now (torch, SQLAlchemy, pydantic: ~300k objects) out of the
        # garbage collector's reach: full collections scanning them were the p99 of a 1 000-user
        # batch (310 ms → 40 ms). freeze() is O(1); no collect() first, startup garbage is small.
        gc.freeze()
        try:
            yield
        finally:
            await app.state.predictions.aclose()
            engine.dispose()
            # Process-wide knobs go back to what they were (tests run many apps in one process).
            gc.unfreeze()
            torch.set_num_threads(torch_threads)

    app = FastAPI(
        title="NME prediction service",
        version="1",
        description=DESCRIPTION,
        lifespan=lifespan,
        openapi_url="/openapi.json" if settings.api_docs else None,
        docs_url=None,  # served by routes.docs, with assets shipped in a package (no CDN)
        redoc_url=None,
        swagger_ui_oauth2_redirect_url=None,
    )
    app.state.settings = settings
    app.state.metrics = ServiceMetrics(lambda: getattr(app.state, "engine", None))
    for module in (
        health, models, observations, predict, sequences, users, jobs, events, metrics
    ):
        app.include_router(module.router)
    if settings.api_docs:
        docs.add_docs(app)
    # Added last = outermost: metrics see every answer, also the guard's 401/413/429. The fast
    # path sits behind the guard: it sees only requests with a verified key and a read body.
    if settings.predict_fast_path:
        app.add_middleware(PredictFastPath)
    app.add_middleware(
        RequestGuard,
        max_body_bytes=settings.max_body_bytes,
        limiter=RateLimiter(settings.rate_limits),
        on_refusal=app.state.metrics.count_rate_limited,
    )
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)
    app.add_exception_handler(ServiceError, service_error)
    for error in DATABASE_ERRORS:
        app.add_exception_handler(error, database_unavailable)
    app.add_exception_handler(RequestValidationError, validation_error)
    return app
