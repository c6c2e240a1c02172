"""Typed dependencies: the request's session, settings, predictor, model, and scope checks.

Handlers declare what they need (``session: SessionDep, key: AdminKey``) and stay one screen
long; everything here reads from ``app.state``, which ``create_app`` fills in its lifespan.
"""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request, status
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from service.api.prometheus import ServiceMetrics
from service.auth import hash_key, key_matches, key_prefix
from service.config import Settings
from service.errors import NotFound
from service.learning.serving import Predictor
from service.storage import store
from service.storage.tables import Model

# Dependencies that do no I/O are ``async def`` on purpose: FastAPI runs every sync dependency
# in its threadpool, and those hand-offs (two per sync generator) cost more than a prediction.


async def get_settings(request: Request) -> Settings:
    """The settings the app was created with."""
    return request.app.state.settings


async def get_session(request: Request) -> AsyncIterator[Session]:
    """One session per request; handlers commit, anything uncommitted is rolled back.

    Creating a session does no I/O (it connects on first use, in the handler's thread); closing
    it returns the connection to the pool.
    """
    session = request.app.state.session_factory()
    try:
        yield session
    finally:
        session.close()


async def get_predictor(request: Request) -> Predictor:
    """The process-wide artifact cache."""
    return request.app.state.predictor


async def get_metrics(request: Request) -> ServiceMetrics:
    """The app's Prometheus metrics."""
    return request.app.state.metrics


SettingsDep = Annotated[Settings, Depends(get_settings)]
MetricsDep = Annotated[ServiceMetrics, Depends(get_metrics)]
SessionDep = Annotated[Session, Depends(get_session)]
PredictorDep = Annotated[Predictor, Depends(get_predictor)]


# ---------------------------------------------------------------------------------- auth


@dataclass(frozen=True)
class Principal:
    """The caller: which key, and what it may do."""

    key_id: int
    name: str
    scopes: frozenset[str]


class KeyCache:
    """Verified keys, trusted for ``ttl`` seconds without a database round trip.

    Keyed by the key's hash, so the cache never holds plaintext. ``ttl=0`` disables it, and a
    revocation takes effect everywhere within ``ttl`` seconds.
    """

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._entries: dict[str, tuple[float, Principal]] = {}
        self._lock = threading.Lock()

    def get(self, digest: str) -> Principal | None:
        """A still-fresh principal for this key hash."""
        entry = self._entries.get(digest)
        if entry is None or entry[0] < time.monotonic():
            return None
        return entry[1]

    def put(self, digest: str, principal: Principal) -> None:
        """Remember a verified key."""
        if self.ttl > 0:
            with self._lock:
                if len(self._entries) > 10_000:  # bound memory against key spraying
                    self._entries.clear()
                self._entries[digest] = (time.monotonic() + self.ttl, principal)


bearer = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer nme_…`.")
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]


def _unauthorized(message: str) -> HTTPException:
    return HTTPException(
        status.HTTP_401_UNAUTHORIZED, message, headers={"WWW-Authenticate": "Bearer"}
    )


async def authenticate(
    request: Request, session: SessionDep, credentials: Credentials
) -> Principal:
    """The caller's principal: 401 without a key, or for an unknown, malformed or revoked one."""
    if credentials is None:
        raise _unauthorized("missing API key: send `Authorization: Bearer <key>`")
    token = credentials.credentials
    cache: KeyCache = request.app.state.key_cache
    digest = hash_key(token)
    principal = cache.get(digest)
    if principal is None:
        # The database look-up blocks: keep it off the event loop.
        principal = await run_in_threadpool(_verify_key, session, token)
        cache.put(digest, principal)
    return principal


def _verify_key(session: Session, token: str) -> Principal:
    prefix = key_prefix(token)
    key = store.get_api_key(session, prefix=prefix) if prefix else None
    if key is None or not key_matches(token, key.key_hash):
        raise _unauthorized("invalid API key")
    if key.revoked_at is not None:
        raise _unauthorized("this API key was revoked")
    return Principal(key_id=key.id, name=key.name, scopes=frozenset(key.scopes))


def require_scope(scope: str) -> Callable[[Principal], Coroutine[Any, Any, Principal]]:
    """A dependency admitting keys that carry ``scope`` (403 otherwise)."""

    async def check(principal: Annotated[Principal, Depends(authenticate)]) -> Principal:
        if scope not in principal.scopes:
            raise HTTPException(
                status.HTTP_403_FORBIDDEN, f"this API key lacks the {scope!r} scope"
            )
        return principal

    return check


AnyKey = Annotated[Principal, Depends(authenticate)]
PredictKey = Annotated[Principal, Depends(require_scope("predict"))]
IngestKey = Annotated[Principal, Depends(require_scope("ingest"))]
AdminKey = Annotated[Principal, Depends(require_scope("admin"))]


# ---------------------------------------------------------------------------------- models


def get_model(name: str, session: SessionDep) -> Model:
    """The model named in the path, or 404."""
    model = store.get_model(session, name=name)
    if model is None:
        raise NotFound(f"model {name!r} not found")
    return model


ModelDep = Annotated[Model, Depends(get_model)]
