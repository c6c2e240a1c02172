"""Model definitions and their versions (listing, activation/rollback)."""

from __future__ import annotations

from fastapi import APIRouter, status
from sqlalchemy.exc import IntegrityError

from service.api.deps import (
    AdminKey,
    AnyKey,
    ModelDep,
    PredictorDep,
    SessionDep,
    SettingsDep,
    UnscopedAdminKey,
    VersionNumber,
)
from service.api.limits import check_model_size
from service.api.paging import DEFAULT_LIMIT, Cursor, Limit, decode_cursor, split_page
from service.api.schemas import (
    ModelCreate,
    ModelPublic,
    ModelsPublic,
    VersionPublic,
    VersionsPublic,
)
from service.errors import Conflict, NotFound
from service.learning import history
from service.learning.kinds import kind_for
from service.learning.kinds.base import ParameterBudget
from service.storage import store
from service.storage.artifacts import artifact_problem
from service.storage.tables import Model

router = APIRouter(prefix="/v1/models", tags=["models"])


def model_public(model: Model, active_version: int | None) -> ModelPublic:
    """A model row as the API shows it."""
    return ModelPublic(
        name=model.name,
        task=model.task,
        features=model.features,
        classes=model.classes,
        states=model.states,
        architecture=model.architecture,
        training=model.training,
        label_range=model.label_range,
        active_version=active_version,
        created_at=model.created_at,
    )


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=ModelPublic,
    responses={409: {"description": "A model of that name exists (also when two requests race "
                     "for the same new name: exactly one gets the 201)."}},
)
def create_model(
    _key: UnscopedAdminKey, body: ModelCreate, session: SessionDep, settings: SettingsDep
) -> ModelPublic:
    """Define a model: task, ordered features, classes/states, architecture, training.

    The definition is checked by building its network (shapes only): a placement naming no
    parameter, settings the estimator refuses, or a network over the parameter budget
    (`NME_MAX_GENERIC_PARAMETERS`, `NME_MAX_PERSON_PARAMETERS`) are a 422 naming the field."""
    check_model_size(body, settings)
    if store.get_model(session, name=body.name) is not None:
        raise Conflict(f"model {body.name!r} already exists")
    architecture, training = kind_for(body.task).resolve_settings(
        # Only what the client sent: an explicit "anneal": null differs from leaving it out.
        body.architecture.model_dump(exclude_unset=True),
        body.training.model_dump(exclude_unset=True),
        n_features=len(body.features),
        labels=body.classes or body.states,  # the schema allows one of them per task
        budget=ParameterBudget(settings.max_generic_parameters, settings.max_person_parameters),
    )
    try:
        model = store.add_model(
            session,
            name=body.name,
            task=body.task,
            features=body.features,
            classes=body.classes,
            states=body.states,
            architecture=architecture,
            training=training,
            label_range=body.label_range,
        )
        session.commit()
    except IntegrityError as err:  # a concurrent request created the same name first
        session.rollback()
        raise Conflict(f"model {body.name!r} already exists") from err
    return model_public(model, None)


@router.get("", response_model=ModelsPublic)
def list_models(
    key: AnyKey, session: SessionDep, limit: Limit = DEFAULT_LIMIT, cursor: Cursor = None
) -> ModelsPublic:
    """Models by name, with their active version (paged: see `next_cursor`). A key limited to
    named models lists only those."""
    after = decode_cursor(cursor, str)
    rows = store.list_models(session, after_name=after, limit=limit + 1, names=key.models)
    models, following = split_page(rows, limit, key=lambda m: m.name)
    active = store.active_version_numbers(session, model_ids=[m.id for m in models])
    return ModelsPublic(
        data=[model_public(m, active.get(m.id)) for m in models],
        count=store.count_models(session, names=key.models),
        next_cursor=following,
    )


@router.get("/{name}", response_model=ModelPublic)
def get_model(_key: AnyKey, model: ModelDep, session: SessionDep) -> ModelPublic:
    """One model."""
    active = store.get_active_version(session, model_id=model.id)
    return model_public(model, active.version if active else None)


@router.get("/{name}/versions", response_model=VersionsPublic)
def list_versions(
    _key: AnyKey,
    model: ModelDep,
    session: SessionDep,
    limit: Limit = DEFAULT_LIMIT,
    cursor: Cursor = None,
) -> VersionsPublic:
    """A model's versions, newest first (paged: see `next_cursor`)."""
    before = decode_cursor(cursor, int)
    rows = store.list_versions(session, model_id=model.id, before_version=before, limit=limit + 1)
    versions, following = split_page(rows, limit, key=lambda v: v.version)
    return VersionsPublic(
        data=[VersionPublic.model_validate(v, from_attributes=True) for v in versions],
        count=store.count_versions(session, model_id=model.id),
        next_cursor=following,
    )


@router.post(
    "/{name}/versions/{version}/activate",
    response_model=VersionPublic,
    responses={
        409: {
            "description": "The version's artifact is missing or corrupt, or a concurrent "
            "activation of this model won the race."
        }
    },
)
def activate_version(
    key: AdminKey,
    model: ModelDep,
    version: VersionNumber,
    session: SessionDep,
    predictor: PredictorDep,
    settings: SettingsDep,
) -> VersionPublic:
    """Serve predictions from ``version`` (also the rollback to an older version).

    The version's artifact is checked first (present, sha256 as recorded): 409 otherwise.
    Concurrent activations of one model are serialised on the model's row; the last one wins.
    The model's event log records the activation (``rolled_back`` for an older version) with
    the key's name."""
    row = store.get_version(session, model_id=model.id, version=version)
    if row is None:
        raise NotFound(f"model {model.name!r} has no version {version}")
    problem = artifact_problem(settings.artifact_dir, row.artifact_path, row.artifact_sha256)
    if problem is not None:
        raise Conflict(f"version {version} cannot be served: {problem}")
    try:
        store.lock_model(session, model_id=model.id)
        previous = store.get_active_version(session, model_id=model.id)
        if previous is None or previous.id != row.id:
            store.activate_version(session, version=row)
            history.record_activation(
                session, model_id=model.id, version=row, previous=previous,
                actor=f"key:{key.name}",
            )
        session.commit()
    except IntegrityError as err:  # the one-active index; the model-row lock should prevent it
        session.rollback()
        raise Conflict(f"a concurrent activation of model {model.name!r} won; retry") from err
    predictor.forget(model.id)
    return VersionPublic.model_validate(row, from_attributes=True)
