"""Sequences of segments: ingest, and Viterbi decoding with the NME-CRF tagger."""

from __future__ import annotations

from fastapi import APIRouter

from service import store
from service.api.deps import (
    IngestKey,
    MetricsDep,
    ModelDep,
    PredictKey,
    PredictorDep,
    SessionDep,
    SettingsDep,
)
from service.errors import Conflict, InvalidInput, NotFound, invalid
from service.ingest import ingest_sequences, queue_user_updates
from service.predictor import decode_request, segment_matrix
from service.schemas import DecodePublic, DecodeRequest, IngestPublic, SequencesCreate
from service.validation import check_batch_size

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
    name: str,
    body: DecodeRequest,
    session: SessionDep,
    settings: SettingsDep,
    predictor: PredictorDep,
    metrics: MetricsDep,
) -> DecodePublic:
    """The most likely state path for one user's sequence, with θ̄ + θⁱ of that user."""
    check_batch_size(len(body.segments), settings.max_batch)
    found = store.get_model_with_active_version(session, name=name)
    if found is None:
        raise NotFound(f"model {name!r} not found")
    model, version = found
    if model.task != "sequence":
        raise InvalidInput(
            [invalid(["path", "name"], f"{name!r} is a {model.task} model: use /predict")]
        )
    x = segment_matrix(model, body)  # bad input is a 422 even before a version exists
    if version is None:
        raise Conflict(f"model {name!r} has no active version yet: run a refit first")
    loaded = predictor.load(version)
    answer = decode_request(session, model=model, loaded=loaded, request=body, x=x)
    metrics.count_predictions(model.name, int(answer.personalized), 1)
    return answer
