"""What a model knows about a user, and forgetting a user everywhere."""

from __future__ import annotations

from fastapi import APIRouter, Response, status

from service.api.deps import (
    AdminKey,
    ModelDep,
    PredictKey,
    PredictorDep,
    SessionDep,
    UnscopedAdminKey,
    UserIdParam,
)
from service.api.schemas import UserModelPublic
from service.errors import NotFound
from service.learning.serving import user_summary
from service.storage import store
from service.storage.codec import decode_effects

router = APIRouter(prefix="/v1", tags=["users"])


@router.get("/models/{name}/users/{user_id:path}", response_model=UserModelPublic)
def get_user(
    _key: PredictKey,
    model: ModelDep,
    user_id: UserIdParam,
    session: SessionDep,
    predictor: PredictorDep,
) -> UserModelPublic:
    """Number of labels, whether personalised, and the user's baseline shift (bias)."""
    user = store.get_user(session, external_id=user_id)
    if user is None:
        raise NotFound(f"user {user_id!r} not found")
    n_labels = store.count_labels(session, model_id=model.id, user_id=user.id)
    version = store.get_active_version(session, model_id=model.id)
    if version is None:
        return UserModelPublic(
            model=model.name,
            user_id=user_id,
            n_labels=n_labels,
            personalized=False,
            version=None,
            bias=None,
        )
    param = store.get_person_param(session, version_id=version.id, user_id=user.id)
    effects = None if param is None else decode_effects(param.effects)
    summary = user_summary(model, predictor.load(version), effects)
    return UserModelPublic(
        model=model.name,
        user_id=user_id,
        n_labels=n_labels,
        personalized=param is not None,
        version=version.version,
        bias=summary.bias,
        transitions=summary.transitions,
    )


@router.delete(
    "/models/{name}/users/{user_id:path}", status_code=status.HTTP_204_NO_CONTENT
)
def forget_user_in_model(
    _key: AdminKey, model: ModelDep, user_id: UserIdParam, session: SessionDep
) -> Response:
    """Forget a user in this model only: their observations, sequences and θⁱ rows in every
    version of the model, and the model's queued jobs for them. Other models keep what they
    know. A key limited to named models may do this for its models."""
    user = store.get_user(session, external_id=user_id)
    if user is None:
        raise NotFound(f"user {user_id!r} not found")
    store.forget_user_in_model(session, model_id=model.id, user_id=user.id)
    session.commit()
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.delete("/users/{user_id:path}", status_code=status.HTTP_204_NO_CONTENT)
def delete_user(_key: UnscopedAdminKey, user_id: UserIdParam, session: SessionDep) -> Response:
    """Forget a user everywhere: observations, sequences and θⁱ rows in every model and
    version (needs an admin key that reaches every model)."""
    user = store.get_user(session, external_id=user_id)
    if user is None:
        raise NotFound(f"user {user_id!r} not found")
    store.delete_user(session, user=user)
    session.commit()
    return Response(status_code=status.HTTP_204_NO_CONTENT)
