"""Sequences of segments: ingest, and Viterbi decoding with the NME-CRF tagger."""

from __future__ import annotations

from fastapi import APIRouter

from service.api.deps import (
    IngestKey,
    MetricsDep,
    ModelDep,
    PredictKey,
    PredictorDep,
    ReachableModelName,
    SessionDep,
    SettingsDep,
)
from service.api.limits import check_sequences
from service.api.schemas import DecodePublic, DecodeRequest, IngestPublic, SequencesCreate
from service.errors import Conflict, NotFound
from service.jobs.triggers import queue_user_updates
from service.learning.ingest import ingest_sequences
from service.learning.kinds import kind_of
from service.learning.serving import decode_sequence
from service.learning.validation import check_batch_size
from service.storage import store

router = APIRouter(prefix="/v1/models", tags=["sequences"])


@router.post("/{name}/sequences", response_model=IngestPublic)
def post_sequences(
    _key: IngestKey,
    model: ModelDep,
    body: SequencesCreate,
    session: SessionDep,
    settings: SettingsDep,
) -> IngestPublic:
    """Insert or update labelled sequences keyed on (user, sequence_id)."""
    check_sequences(
        [item.segments for item in body.items],
        [["body", "items", i, "segments"] for i in range(len(body.items))],
        settings,
    )
    counts = ingest_sequences(session, model=model, items=body.items, max_batch=settings.max_batch)
    if settings.user_updates_on_ingest:
        queue_user_updates(
            session, model=model, counts=counts, max_attempts=settings.job_max_attempts
        )
    session.commit()
    return IngestPublic(inserted=counts.inserted, updated=counts.updated)


@router.post("/{name}/decode", response_model=DecodePublic)
def decode(
    _key: PredictKey,
    name: ReachableModelName,
    body: DecodeRequest,
    session: SessionDep,
    settings: SettingsDep,
    predictor: PredictorDep,
    metrics: MetricsDep,
) -> DecodePublic:
    """The most likely state path for one user's sequence, with θ̄ + θⁱ of that user."""
    check_sequences([body.segments], [["body", "segments"]], settings)
    check_batch_size(len(body.segments), settings.max_batch)
    found = store.get_model_with_active_version(session, name=name)
    if found is None:
        raise NotFound(f"model {name!r} not found")
    model, version = found
    kind = kind_of(model)
    kind.require_route(model, "decode")
    x = kind.serving_input(model, body.segments)  # bad input is a 422 even before a version
    if version is None:
        raise Conflict(f"model {name!r} has no active version yet: run a refit first")
    loaded = predictor.load(version)
    decoded, personalized = decode_sequence(
        session, model=model, loaded=loaded, user_id=body.user_id, x=x
    )
    metrics.count_predictions(model.name, int(personalized), 1)
    states = [str(state) for state in loaded.estimator.states_]
    return DecodePublic(
        model=model.name,
        version=loaded.version,
        personalized=personalized,
        path=decoded.path,
        score=decoded.score,
        marginals=[dict(zip(states, row, strict=True)) for row in decoded.marginals.tolist()]
        if body.marginals
        else None,
    )
