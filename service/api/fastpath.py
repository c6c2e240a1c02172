"""The hot route without the framework's per-request machinery: well-formed predictions go
straight from the request guard to the prediction coalescer.

A single-user prediction spent most of its server time in FastAPI, not in the model: matching
the path against every route, solving seven dependencies, and validating the body through the
generic machinery. :class:`PredictFastPath` is pure ASGI middleware behind
:class:`~service.api.guard.RequestGuard` (which has verified the key, taken the rate-limit token
and read the body). For ``POST /v1/models/{name}/predict`` it answers the requests it can be
sure of — the key carries ``predict`` and reaches the model, the name is valid, the body is
``application/json`` and validates as :class:`~service.api.schemas.PredictRequest` — through the
same :func:`~service.api.routes.predict.answer_batch` the route uses, and renders errors with
the app's own handlers. Everything else (a malformed body, a wrong key scope, another content
type) goes on to FastAPI unchanged, so every refusal keeps the exact answer of the declared route
(and the OpenAPI document still describes the route). ``NME_PREDICT_FAST_PATH=false`` turns it
off.
"""

from __future__ import annotations

import re

from pydantic import ValidationError
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Receive, Scope, Send

from service.api.errors import DATABASE_ERRORS, database_unavailable, service_error
from service.api.guard import PRINCIPAL, Principal, replay_body, walk_routes
from service.api.routes import predict
from service.api.schemas import MODEL_NAME_PATTERN, PredictRequest
from service.errors import ServiceError

_MODEL_NAME = re.compile(MODEL_NAME_PATTERN)
_JSON = re.compile(rb"application/json\s*(;.*)?", re.IGNORECASE | re.DOTALL)


class PredictFastPath:
    """Pure ASGI middleware answering well-formed predict requests (see the module docstring)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._route: BaseRoute | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or not scope["path"].endswith(
            "/predict"
        ):
            await self.app(scope, receive, send)
            return
        route = self._predict_route(scope)
        match, child = route.matches(scope)
        principal = scope.get("state", {}).get(PRINCIPAL)
        name = child.get("path_params", {}).get("name", "") if match == Match.FULL else ""
        if not (
            isinstance(principal, Principal)
            and "predict" in principal.scopes
            and principal.may_use(name)
            and _MODEL_NAME.fullmatch(name)
            and _is_json(scope)
        ):
            await self.app(scope, receive, send)
            return
        body = await _read_body(receive)
        if body is None:
            return  # the client went away
        try:
            request = PredictRequest.model_validate_json(body)
        except ValidationError:  # the route's validation answers it, in its own words
            await self.app(scope, replay_body(body, receive), send)
            return
        scope.update(child)  # route and path parameters: the metrics label it by template
        try:
            answer = await scope["app"].state.predictions.submit(name, request)
        except ServiceError as error:
            await (await service_error(None, error))(scope, receive, send)  # type: ignore[arg-type]
            return
        except DATABASE_ERRORS as error:
            await (await database_unavailable(None, error))(scope, receive, send)  # type: ignore[arg-type]
            return
        await send({
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(answer)).encode()),
            ],
        })
        await send({"type": "http.response.body", "body": answer})

    def _predict_route(self, scope: Scope) -> BaseRoute:
        if self._route is None:
            routes = walk_routes(scope["app"].router.routes)
            self._route = next(r for r in routes if getattr(r, "endpoint", None) is predict.predict)
        return self._route


def _is_json(scope: Scope) -> bool:
    for name, value in scope["headers"]:
        if name == b"content-type":
            return _JSON.fullmatch(value) is not None
    return False


async def _read_body(receive: Receive) -> bytes | None:
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)
