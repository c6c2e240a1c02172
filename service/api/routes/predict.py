"""Predictions for a batch of users from the model's active version."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np
from fastapi import APIRouter, Request, Response

from service.api.batching import Coalescer, Outcome
from service.api.deps import PredictKey, ReachableModelName
from service.api.errors import DATABASE_ERRORS
from service.api.limits import check_items
from service.api.prometheus import ServiceMetrics
from service.api.schemas import PredictionPublic, PredictionsPublic, PredictRequest
from service.config import Settings
from service.errors import Conflict, InvalidInput, NotFound, ServiceError, invalid
from service.learning.kinds import kind_of
from service.learning.kinds.base import Prediction
from service.learning.serving import Predictor, not_finite, predict_rows
from service.learning.validation import check_batch_size
from service.storage import store
from service.storage.tables import Model, ModelVersion

router = APIRouter(prefix="/v1/models", tags=["predict"])


@router.post("/{name}/predict", response_model=PredictionsPublic)
async def predict(
    _key: PredictKey, name: ReachableModelName, body: PredictRequest, request: Request
) -> Response:
    """Per user: the prediction on the label's scale (class and probabilities for
    classification) and whether the user was personalised; one forward pass per request.
    ``version`` says which version answered: the whole batch comes from that one version."""
    answer = await request.app.state.predictions.submit(name, body)
    return Response(answer, media_type="application/json")


def prediction_batcher(state: Any) -> Coalescer[str, PredictRequest, bytes]:
    """The app's coalescer of predict requests per model (see :mod:`service.api.batching`):
    concurrent requests for one model share a thread hop, the θⁱ query and the forward pass."""
    return Coalescer(
        lambda name, bodies: answer_batch(state, name, bodies),
        weight=lambda body: len(body.items),
        max_weight=state.settings.max_batch,
    )


def answer_batch(state: Any, name: str, bodies: list[PredictRequest]) -> list[Outcome[bytes]]:
    """Answer several predict requests for the model ``name`` together: one session, one θⁱ
    query and one forward pass per distinct ``interval`` (usually one), all from the one
    active version read here. Runs in a worker thread.

    Every request gets what it would have got alone — its JSON answer, or its own error: a
    request's bad items, its interval on a classifier or its non-finite predictions fail that
    request only (with indexes into its own items); a missing model, a model without a version
    or an unreachable database fail every request still open at that point. The checks run in
    the order a request alone would see them.
    """
    settings: Settings = state.settings
    predictor: Predictor = state.predictor
    outcomes: list[Outcome[bytes] | None] = [None] * len(bodies)
    waiting: list[int] = []
    for i, body in enumerate(bodies):
        try:
            check_batch_size(len(body.items), settings.max_batch)
            check_items(body.items, settings)
        except ServiceError as error:
            outcomes[i] = error
        else:
            waiting.append(i)
    try:
        if waiting:
            _answer_valid(state, predictor, name, bodies, waiting, outcomes)
    except (ServiceError, *DATABASE_ERRORS) as error:
        for i in waiting:
            if outcomes[i] is None:
                outcomes[i] = error
    return [outcome if outcome is not None else RuntimeError("unanswered") for outcome in outcomes]


def _answer_valid(
    state: Any,
    predictor: Predictor,
    name: str,
    bodies: list[PredictRequest],
    waiting: list[int],
    outcomes: list[Outcome[bytes] | None],
) -> None:
    """:func:`answer_batch` for the requests ``waiting`` whose items passed the limits; fills
    ``outcomes`` and raises the errors every request still open shares."""
    with state.session_factory() as session:
        store.autocommit_reads(session)  # reads only: no BEGIN/ROLLBACK round trips
        # The active version comes from the process-wide cache (at most NME_ACTIVE_VERSION_TTL_
        # SECONDS old, no query on a hit); the θⁱ query is then the batch's only statement.
        found = predictor.active_model(session, name=name)
        if found is None:
            raise NotFound(f"model {name!r} not found")
        model, version = found.model, found.version
        kind = kind_of(model)
        kind.require_route(model, "predict")
        for i in waiting:
            if bodies[i].interval is not None and not kind.supports_intervals:
                outcomes[i] = InvalidInput([invalid(
                    ["body", "interval"],
                    f"prediction intervals are for regression models; {name!r} is a "
                    f"{model.task} model (its probabilities say how sure it is)",
                )])
        if all(outcomes[i] is not None for i in waiting):
            return
        if version is None:
            raise Conflict(f"model {name!r} has no active version yet: run a refit first")
        loaded = predictor.load(version)
        groups: dict[float | None, list[tuple[int, np.ndarray]]] = defaultdict(list)
        for i in waiting:
            if outcomes[i] is not None:
                continue
            try:
                x = kind.serving_input(model, bodies[i].items)
            except ServiceError as error:
                outcomes[i] = error
            else:
                groups[bodies[i].interval].append((i, x))
        for coverage, members in groups.items():
            user_ids = [item.user_id for i, _ in members for item in bodies[i].items]
            x = members[0][1] if len(members) == 1 else np.concatenate([x for _, x in members])
            predictions = predict_rows(
                session, model=model, loaded=loaded, x=x, user_ids=user_ids, coverage=coverage
            )
            start = 0
            for i, part_x in members:
                part = predictions[start : start + len(part_x)]
                start += len(part_x)
                outcomes[i] = not_finite(part) or _render(state.metrics, model, version, part)


def _render(
    metrics: ServiceMetrics, model: Model, version: ModelVersion, predictions: list[Prediction]
) -> bytes:
    """One request's JSON answer (and its count in the metrics)."""
    metrics.count_predictions(
        model.name, sum(p.personalized for p in predictions), len(predictions)
    )
    answer = PredictionsPublic(
        model=model.name,
        version=version.version,
        predictions=[
            PredictionPublic(
                user_id=p.user_id,
                prediction=p.prediction,
                personalized=p.personalized,
                probabilities=p.probabilities,
                lower=p.lower,
                upper=p.upper,
            )
            for p in predictions
        ],
    )
    # Serialised here, in the worker thread: FastAPI would otherwise re-validate the (already
    # typed) answer against response_model on the event loop, which for a 1 000-user batch
    # costs more than the forward pass.
    return answer.model_dump_json(exclude_none=True).encode()
