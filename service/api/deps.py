"""Typed dependencies: the request's session, settings, predictor, model, and scope checks.

Handlers declare what they need (``session: SessionDep, key: AdminKey``) and stay one screen
long; everything here reads from ``app.state``, which ``create_app`` fills in its lifespan.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Path, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from service.api.guard import PRINCIPAL, Principal, verify_key
from service.api.prometheus import ServiceMetrics
from service.api.schemas import MAX_ID, MAX_USER_ID_LENGTH, MODEL_NAME_PATTERN
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

bearer = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer nme_…`.")
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]


async def authenticate(request: Request, credentials: Credentials) -> Principal:
    """The caller's principal.

    :class:`service.api.guard.RequestGuard` verifies the key before the body is read and puts
    the principal in the request state; this dependency hands it to the handler (and declares
    the bearer scheme in the OpenAPI document). Without the guard in front (an app assembled by
    hand) it verifies the key itself.
    """
    principal = request.scope.get("state", {}).get(PRINCIPAL)
    if isinstance(principal, Principal):
        return principal
    token = credentials.credentials if credentials is not None else None
    return await verify_key(request.app.state, token)


def require_scope(scope: str) -> Callable[[Principal], Coroutine[Any, Any, Principal]]:
    """A dependency admitting keys that carry ``scope`` (403 otherwise)."""

    async def check(principal: Annotated[Principal, Depends(authenticate)]) -> Principal:
        if scope not in principal.scopes:
            raise HTTPException(
                status.HTTP_403_FORBIDDEN, f"this API key lacks the {scope!r} scope"
            )
        return principal

    check.required_scope = scope  # type: ignore[attr-defined]  # read by the rate limiter
    return check


authenticate.required_scope = "read"  # type: ignore[attr-defined]

async def require_unscoped_admin(
    principal: Annotated[Principal, Depends(require_scope("admin"))],
) -> Principal:
    """An admin key that reaches every model (403 for a key limited to named models): the
    routes that act beyond one model — creating models, /metrics, forgetting a user everywhere."""
    if principal.scoped:
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            "this API key is limited to named models; this route needs an unscoped admin key",
        )
    return principal


require_unscoped_admin.required_scope = "admin"  # type: ignore[attr-defined]

AnyKey = Annotated[Principal, Depends(authenticate)]
PredictKey = Annotated[Principal, Depends(require_scope("predict"))]
IngestKey = Annotated[Principal, Depends(require_scope("ingest"))]
AdminKey = Annotated[Principal, Depends(require_scope("admin"))]
UnscopedAdminKey = Annotated[Principal, Depends(require_unscoped_admin)]


# ---------------------------------------------------------------------------------- path parameters

ModelNameParam = Annotated[
    str, Path(pattern=MODEL_NAME_PATTERN, description="The model's name.", examples=["mood"])
]
VersionNumber = Annotated[
    int, Path(ge=1, le=MAX_ID, description="A version number of the model (1, 2, …).")
]
JobId = Annotated[int, Path(ge=1, le=MAX_ID, description="The job's id.")]
UserIdParam = Annotated[
    str,
    Path(
        min_length=1,
        max_length=MAX_USER_ID_LENGTH,
        description="The user's id, percent-encoded. Any stored id is found, also one from "
        "before the id rule (e.g. with `/`, sent as `%2F` or plain).",
        examples=["u1"],
    ),
]


# ---------------------------------------------------------------------------------- models


def check_model_access(principal: Principal, name: str) -> None:
    """404 — the same answer as for a model that does not exist — when the key is limited to
    other models: a scoped key does not learn that a model exists."""
    if not principal.may_use(name):
        raise NotFound(f"model {name!r} not found")


def get_model(
    name: ModelNameParam,
    session: SessionDep,
    principal: Annotated[Principal, Depends(authenticate)],
) -> Model:
    """The model named in the path, or 404 (also when the key may not reach it)."""
    check_model_access(principal, name)
    model = store.get_model(session, name=name)
    if model is None:
        raise NotFound(f"model {name!r} not found")
    return model


ModelDep = Annotated[Model, Depends(get_model)]


async def reachable_model_name(
    name: ModelNameParam, principal: Annotated[Principal, Depends(authenticate)]
) -> str:
    """The model name in the path, once the key may reach it (404 otherwise), checked before
    the body is validated: a scoped key learns nothing about other apps' models.

    ``async`` because it does no I/O: as a plain ``def`` FastAPI ran it in the threadpool, one
    more thread hand-off per prediction (about a tenth of a single-user predict's time)."""
    check_model_access(principal, name)
    return name


ReachableModelName = Annotated[str, Depends(reachable_model_name)]
