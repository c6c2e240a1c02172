"""Cheap refusals before a request costs anything: the API key, the rate limit, the body size.

FastAPI reads and parses a request's body before any dependency runs, so authentication in a
dependency comes too late: an anonymous client could make the server parse megabytes of JSON
just to be told 401. :class:`RequestGuard` is pure ASGI middleware in front of the app that, in
this order and before the body is read:

1. finds the route (to know which scope it needs; routes without a key dependency — health
   checks, the documentation pages — are open) and verifies the bearer key against the same
   key cache and database look-up the dependencies use (off the event loop): **401**;
2. takes a token from the key's bucket for that scope (:class:`RateLimiter`): **429** with
   ``Retry-After``;
3. refuses a declared ``Content-Length`` over ``NME_MAX_BODY_BYTES``, then reads the body while
   counting (chunked bodies have no length to trust): **413**.

Only then does the app see the request, with the body replayed from memory. The verified
principal travels in the request state, so the ``authenticate`` dependency does not look the key
up a second time.
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import anyio.to_thread
from fastapi.routing import APIRoute
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker
from starlette.exceptions import HTTPException
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.errors import RETRY_AFTER_SECONDS
from service.auth import hash_key, key_matches, key_prefix
from service.config import RateLimit, RateLimits
from service.storage import store

PRINCIPAL = "nme_principal"
"""Where the guard leaves the verified caller in the request state."""


@dataclass(frozen=True)
class Principal:
    """The caller: which key, and what it may do."""

    key_id: int
    name: str
    scopes: frozenset[str]
    prefix: str = ""
    models: frozenset[str] | None = None
    """The model names the key may reach; None: every model."""

    def may_use(self, model_name: str) -> bool:
        """Whether the key reaches the model called ``model_name``."""
        return self.models is None or model_name in self.models

    @property
    def scoped(self) -> bool:
        """Whether the key is limited to named models."""
        return self.models is not None


class KeyCache:
    """Verified keys, trusted for ``ttl`` seconds without a database round trip.

    Keyed by the key's hash, so the cache never holds plaintext. ``ttl=0`` disables it, and a
    revocation takes effect everywhere within ``ttl`` seconds.
    """

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._entries: dict[str, tuple[float, Principal | str]] = {}
        self._lock = threading.Lock()

    def get(self, digest: str) -> Principal | str | None:
        """A still-fresh principal for this key hash, or the 401 message it got (a refusal is
        remembered as long as a verification: the same bad key costs one look-up per ``ttl``,
        and an unknown key cannot become valid — keys are random)."""
        entry = self._entries.get(digest)
        if entry is None or entry[0] < time.monotonic():
            return None
        return entry[1]

    def put(self, digest: str, outcome: Principal | str) -> None:
        """Remember a verified key, or the message a refused one got."""
        if self.ttl > 0:
            with self._lock:
                if len(self._entries) > 10_000:  # bound memory against key spraying
                    self._entries.clear()
                self._entries[digest] = (time.monotonic() + self.ttl, outcome)


def unauthorized(message: str) -> HTTPException:
    """A 401 that tells the client to send a bearer key."""
    return HTTPException(401, message, headers={"WWW-Authenticate": "Bearer"})


async def verify_key(
    state: Any, token: str | None, before_look_up: Callable[[], None] | None = None
) -> Principal:
    """The principal of ``token`` (401 when missing, unknown, malformed or revoked).

    ``state`` is the app's state (``key_cache``, ``session_factory``). A cache miss looks the
    key up in a worker thread, never on the event loop; ``before_look_up`` runs first and may
    refuse (the guard's limit on failed look-ups per client).
    """
    if not token:
        raise unauthorized("missing API key: send `Authorization: Bearer <key>`")
    cache: KeyCache = state.key_cache
    digest = hash_key(token)
    known = cache.get(digest)
    if isinstance(known, str):
        raise unauthorized(known)
    if known is not None:
        return known
    if before_look_up is not None:
        before_look_up()
    try:
        principal = await anyio.to_thread.run_sync(_look_up, state.session_factory, token)
    except SQLAlchemyError as err:
        raise HTTPException(
            503, "the key database is unavailable; retry later",
            headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
        ) from err
    except HTTPException as refusal:
        cache.put(digest, str(refusal.detail))
        raise
    cache.put(digest, principal)
    return principal


def _look_up(session_factory: sessionmaker[Session], token: str) -> Principal:
    prefix = key_prefix(token)
    if prefix is None:
        raise unauthorized("invalid API key")
    with session_factory() as session:
        key = store.get_api_key(session, prefix=prefix)
    if key is None or not key_matches(token, key.key_hash):
        raise unauthorized("invalid API key")
    if key.revoked_at is not None:
        raise unauthorized("this API key was revoked")
    return Principal(
        key_id=key.id,
        name=key.name,
        scopes=frozenset(key.scopes),
        prefix=prefix,
        models=frozenset(key.models) if key.models is not None else None,
    )


# ---------------------------------------------------------------------------------- rate limits


class RateLimiter:
    """Token buckets per (API key, scope), in this process.

    A bucket holds up to ``burst`` tokens and refills at ``rate`` per second; a request takes
    one. Buckets live in process memory (no database or network round trip per request), so
    with N API processes behind a load balancer a key may get up to N times its limit: at most
    ``N · (burst + rate · t)`` requests in any t seconds. Used only from the event loop's thread.
    """

    def __init__(self, limits: RateLimits) -> None:
        self.limits = limits
        self._buckets: dict[tuple[int, str], list[float]] = {}  # [tokens, last refill]
        self._failures: dict[str, list[float]] = {}  # per client address, same layout

    def failed_look_ups_wait(self, client: str) -> float | None:
        """None while ``client`` may have another key looked up, else the seconds until its
        bucket of failed look-ups (:attr:`RateLimits.failed_keys`) has a token again."""
        limit = self.limits.failed_keys
        if not self.limits.enabled or limit is None:
            return None
        tokens = self._refill_failures(client, limit)
        return None if tokens >= 1.0 else (1.0 - tokens) / limit.rate

    def record_failed_look_up(self, client: str) -> None:
        """Charge ``client`` one token for a key look-up that ended in 401."""
        limit = self.limits.failed_keys
        if not self.limits.enabled or limit is None:
            return
        tokens = self._refill_failures(client, limit)
        self._failures[client][0] = max(0.0, tokens - 1.0)

    def _refill_failures(self, client: str, limit: RateLimit) -> float:
        """The client's failure bucket refilled to now; returns its tokens."""
        now = time.monotonic()
        if len(self._failures) > 100_000:  # bound memory against address spraying
            self._failures.clear()
        bucket = self._failures.setdefault(client, [float(limit.burst), now])
        bucket[0] = min(float(limit.burst), bucket[0] + (now - bucket[1]) * limit.rate)
        bucket[1] = now
        return bucket[0]

    def acquire(self, principal: Principal, scope: str) -> float | None:
        """Take a token: None when granted, else the seconds until one is available."""
        if not self.limits.enabled:
            return None
        limit = self.limits.limit_for(scope, prefix=principal.prefix, name=principal.name)
        if limit is None:
            return None
        now = time.monotonic()
        bucket = self._buckets.get((principal.key_id, scope))
        if bucket is None:
            bucket = self._buckets[(principal.key_id, scope)] = [float(limit.burst), now]
        tokens = min(float(limit.burst), bucket[0] + (now - bucket[1]) * limit.rate)
        bucket[1] = now
        if tokens >= 1.0:
            bucket[0] = tokens - 1.0
            return None
        bucket[0] = tokens
        return (1.0 - tokens) / limit.rate


# ---------------------------------------------------------------------------------- the guard


def walk_routes(routes: Sequence[BaseRoute]) -> Iterator[BaseRoute]:
    """Every route under ``routes``, descending into included routers (recent FastAPI keeps an
    included router as one node that holds ``original_router``)."""
    for route in routes:
        original = getattr(route, "original_router", None)
        if original is not None:
            yield from walk_routes(original.routes)
        else:
            yield route


def required_scope(route: BaseRoute) -> str | None:
    """The scope a route's key dependency demands (``read``: any key), None for open routes."""
    if not isinstance(route, APIRoute):
        return None  # documentation pages and their assets

    def search(dependant: Any) -> str | None:
        for dependency in dependant.dependencies:
            found = getattr(dependency.call, "required_scope", None) or search(dependency)
            if found:
                return found
        return None

    return search(route.dependant)


MATCH_MEMORY = 4096
"""Distinct (method, path) pairs whose route the guard remembers before it starts over."""

_CONTENT_LENGTH = re.compile(rb"[0-9]{1,20}")


class RequestGuard:
    """Pure ASGI middleware: authentication, rate limit and body size, before the body is read
    (see the module docstring)."""

    def __init__(
        self, app: ASGIApp, *, max_body_bytes: int, limiter: RateLimiter, on_refusal: Any
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.limiter = limiter
        self.on_refusal = on_refusal  # (scope, key name) -> None: counts 429s
        self._routes: list[tuple[BaseRoute, str | None]] | None = None
        self._matched: dict[tuple[str, str, str], tuple[BaseRoute | None, str | None]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route, needed = self._match(scope)
        try:
            length = _content_length(scope)
            if route is not None and needed is None:  # open: health checks, documentation
                await self.app(scope, receive, send)
                return
            token = _bearer_token(scope)
            client = (scope.get("client") or ("unknown", 0))[0]

            looked_up = False

            def check_failures() -> None:
                nonlocal looked_up
                looked_up = True
                wait = self.limiter.failed_look_ups_wait(client)
                if wait is not None:
                    self.on_refusal("failed_keys", "(invalid keys)")
                    raise HTTPException(
                        429, f"too many invalid API keys from this address; retry in "
                        f"{wait:.2f} s", headers={"Retry-After": str(max(1, math.ceil(wait)))},
                    )

            try:
                principal = await verify_key(scope["app"].state, token, check_failures)
            except HTTPException as refusal:
                if refusal.status_code == 401 and looked_up:  # cached refusals cost nothing
                    self.limiter.record_failed_look_up(client)
                raise
            wait = self.limiter.acquire(principal, needed or "read")
            if wait is not None:
                self.on_refusal(needed or "read", principal.name)
                raise HTTPException(
                    429,
                    f"rate limit of this API key for {needed or 'read'} requests exceeded; "
                    f"retry in {wait:.2f} s",
                    headers={"Retry-After": str(max(1, math.ceil(wait)))},
                )
            if length is not None and length > self.max_body_bytes:
                raise self._too_large()
            body = await self._read_body(receive)
        except HTTPException as refusal:
            if route is not None:
                scope["route"] = route  # the metrics label it with its template
            await _send_error(send, refusal)
            return
        if body is None:
            return  # the client went away before sending its body
        scope.setdefault("state", {})[PRINCIPAL] = principal
        await self.app(scope, replay_body(body, receive), send)

    def _too_large(self) -> HTTPException:
        return HTTPException(
            413, f"request body exceeds {self.max_body_bytes} bytes (NME_MAX_BODY_BYTES)"
        )

    async def _read_body(self, receive: Receive) -> bytes | None:
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                raise self._too_large()
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    def _match(self, scope: Scope) -> tuple[BaseRoute | None, str | None]:
        """The route a request goes to and the scope it needs (a path that matches no route
        needs a key: an anonymous client learns nothing about which paths exist).

        Remembered per (method, path): matching tries every route's pattern in turn, which
        for the routes at the end of the list (predict) cost more than the key check. The
        routes never change after start-up; the memory is bounded against path spraying."""
        key = (scope["method"], scope.get("root_path", ""), scope["path"])
        found = self._matched.get(key)
        if found is not None:
            return found
        if self._routes is None:
            app = scope["app"]
            self._routes = [(r, required_scope(r)) for r in walk_routes(app.router.routes)]
        found = (None, "read")
        for route, needed in self._routes:
            match, _child = route.matches(scope)
            if match == Match.FULL:
                found = (route, needed)
                break
            if match == Match.PARTIAL and found[0] is None:
                found = (route, needed)
        if len(self._matched) >= MATCH_MEMORY:
            self._matched.clear()
        self._matched[key] = found
        return found


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            if _CONTENT_LENGTH.fullmatch(value) is None:
                raise HTTPException(400, "invalid Content-Length header")
            return int(value)
    return None


def _bearer_token(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, credentials = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and credentials.strip():
                return credentials.strip()
            return None
    return None


def replay_body(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that hands the app the buffered body, then passes through (disconnects)."""
    pending = True

    async def replay() -> Message:
        nonlocal pending
        if pending:
            pending = False
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _send_error(send: Send, error: HTTPException) -> None:
    payload = json.dumps({"detail": error.detail}, ensure_ascii=True).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(payload)).encode()),
    ]
    headers += [(k.lower().encode(), v.encode("latin-1")) for k, v in (error.headers or {}).items()]
    await send({"type": "http.response.start", "status": error.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": payload})
