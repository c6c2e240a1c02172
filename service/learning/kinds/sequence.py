"""Sequence models (NME-CRF): a sequence of segments per item, one state name per segment.
Trained with ``nme.NMESequenceTagger``; ingested at ``/sequences``; served at ``/decode``
(Viterbi path, score, marginals); the user route shows a user's transition matrix.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, ClassVar, Protocol

import numpy as np
import torch
from sqlalchemy.orm import Session

from nme import NMESequenceTagger, crf
from service.errors import Conflict, InvalidInput, invalid
from service.learning.kinds.base import (
    ARCHITECTURE_KEYS,
    PINNED_TRAINING_KEYS,
    REFIT_CHUNK_ROWS,
    Callback,
    Decoded,
    ModelKind,
    TrainingWarning,
    UserData,
    UserSummary,
    sent,
    split_persons,
    temporal_split,
)
from service.learning.validation import MAX_REPORTED_ERRORS, check_unique_keys, feature_matrix
from service.storage import store
from service.storage.tables import Model, utcnow

LabelledSequence = tuple[np.ndarray, list[str]]
"""``(features (L, F) float32, state names (L,))``."""


class SegmentItem(Protocol):
    """One segment of a sequence, as the routes receive it."""

    features: dict[str, float]


class SequenceItem(Protocol):
    """One labelled (or unlabelled) sequence, as the ingest route receives it."""

    user_id: str
    sequence_id: str
    segments: Sequence[SegmentItem]
    labels: list[str] | None


@dataclass(frozen=True)
class SequenceData:
    """A model's labelled sequences, split per user in time order."""

    train: list[LabelledSequence]
    persons_train: list[str]
    val: list[LabelledSequence]
    persons_val: list[str]
    user_row_ids: dict[str, int]
    read_at: datetime
    warnings: list[TrainingWarning] = field(default_factory=list)

    @property
    def n_observations(self) -> int:
        """Sequences used in total (train + validation)."""
        return len(self.train) + len(self.val)


def _segments_matrix(model: Model, segments: Sequence[dict[str, float]]) -> np.ndarray:
    """``(L, F) float32`` of stored segments, in model feature order."""
    return np.array([[s[name] for name in model.features] for s in segments], np.float32)


class SequenceKind(ModelKind):
    """Sequences in, Viterbi paths out."""

    task = "sequence"
    estimator_class = NMESequenceTagger
    architecture_keys = ARCHITECTURE_KEYS + ("learn_start_end", "forbidden_transitions")
    # σ² = ½ became the tagger's default with the exact Tⁱ E-step: older models keep theirs
    pinned_training_keys = PINNED_TRAINING_KEYS + ("sigma2",)
    score_name = "segment_accuracy"
    routes: ClassVar[frozenset[str]] = frozenset({"sequences", "decode"})

    def _extra_defaults(self) -> dict[str, Any]:
        return {"forbidden_transitions": None}

    def _set_outputs(self, estimator: Any, labels: list[str] | None) -> None:
        estimator.states_ = list(labels or [])

    def _estimator_kwargs(
        self, architecture: dict[str, Any], training: dict[str, Any], states: list[str] | None
    ) -> dict[str, Any]:
        kwargs = super()._estimator_kwargs(architecture, training, states)
        forbidden = kwargs.pop("forbidden_transitions")
        kwargs["allowed"] = [tuple(pair) for pair in forbidden] if forbidden else None
        kwargs["states"] = states
        return kwargs

    # ------------------------------------------------------------------ ingest

    def check_states(
        self,
        model: Model,
        labels: Sequence[Sequence[str] | None],
        locs: Sequence[list[str | int]],
    ) -> None:
        """Sequence labels must be the model's state names (422 per offending sequence)."""
        states = set(model.states or [])
        errors = []
        for path, loc in zip(labels, locs, strict=True):
            unknown = sorted(set(path or []) - states)
            if unknown:
                errors.append(
                    invalid(
                        loc,
                        f"unknown states: {', '.join(unknown)}; "
                        f"expected one of {', '.join(model.states or [])}",
                        "label",
                    )
                )
            if len(errors) >= MAX_REPORTED_ERRORS:
                break
        if errors:
            raise InvalidInput(errors)

    def check_transitions(
        self,
        model: Model,
        labels: Sequence[Sequence[str] | None],
        locs: Sequence[list[str | int]],
    ) -> None:
        """No label path may use a forbidden transition (422 naming the pair and position):
        such a sequence has zero probability under the model and would fail every refit."""
        errors = []
        for path, loc in zip(labels, locs, strict=True):
            position = first_forbidden(model, path)
            if position is not None:
                pair = (path[position - 1], path[position])  # type: ignore[index]
                errors.append(
                    invalid(
                        [*loc, position],
                        f"transition {pair[0]!r} → {pair[1]!r} (segments {position - 1} → "
                        f"{position}) is forbidden in this model",
                        "forbidden_transition",
                    )
                )
            if len(errors) >= MAX_REPORTED_ERRORS:
                break
        if errors:
            raise InvalidInput(errors)

    def ingest(
        self, session: Session, *, model: Model, items: Sequence[SequenceItem]
    ) -> store.UpsertCounts:
        """Validate labelled sequences against the model's schema and upsert them."""
        for i, item in enumerate(items):
            feature_matrix(
                model.features,
                [segment.features for segment in item.segments],
                [
                    ["body", "items", i, "segments", k, "features"]
                    for k in range(len(item.segments))
                ],
            )
        labels = [item.labels for item in items]
        locs: list[list[str | int]] = [["body", "items", i, "labels"] for i in range(len(items))]
        self.check_states(model, labels, locs)
        self.check_transitions(model, labels, locs)
        check_unique_keys(
            [(item.user_id, item.sequence_id) for item in items], "(user_id, sequence_id)"
        )
        user_ids = store.ensure_users(session, external_ids=[item.user_id for item in items])
        rows = [
            {
                "user_id": user_ids[item.user_id],
                "sequence_id": item.sequence_id,
                "segments": [
                    {name: segment.features[name] for name in model.features}
                    for segment in item.segments
                ],
                **({"labels": item.labels} if sent(item, "labels") else {}),
            }
            for item in items
        ]
        return store.upsert_sequences(session, model_id=model.id, rows=rows)

    # ------------------------------------------------------------------ training

    def load_training_data(
        self, session: Session, *, model: Model, chunk_rows: int = REFIT_CHUNK_ROWS
    ) -> SequenceData:
        """Labelled sequences, per user in the order they arrived, split per user in time
        (read whole: ``chunk_rows`` is not used; sequences are few and long)."""
        read_at = utcnow()
        rows = store.load_labelled_sequences(session, model_id=model.id)
        # Stored before forbidden transitions were refused at ingest: train without them.
        skipped = [row for row in rows if first_forbidden(model, row.labels) is not None]
        rows = [row for row in rows if first_forbidden(model, row.labels) is None]
        if not rows:
            raise Conflict(f"model {model.name!r} has no labelled sequences to train on")
        persons = [row.external_id for row in rows]
        sequences = [(_segments_matrix(model, row.segments), list(row.labels)) for row in rows]
        is_val = temporal_split(persons)
        persons_train, persons_val = split_persons(persons, is_val)
        return SequenceData(
            train=[s for s, v in zip(sequences, is_val, strict=True) if not v],
            persons_train=persons_train,
            val=[s for s, v in zip(sequences, is_val, strict=True) if v],
            persons_val=persons_val,
            user_row_ids={row.external_id: row.user_id for row in rows},
            read_at=read_at,
            warnings=[_skipped_warning(skipped)] if skipped else [],
        )

    def _fit(
        self,
        model: Model,
        estimator: NMESequenceTagger,
        data: SequenceData,
        callback: Callback | None,
    ) -> None:
        has_val = len(data.val) > 0
        estimator.fit(
            data.train,
            data.persons_train,
            sequences_val=data.val if has_val else None,
            persons_val=data.persons_val if has_val else None,
            callback=callback,
        )

    def score(
        self,
        estimator: NMESequenceTagger,
        data: SequenceData,
        *,
        effects: np.ndarray | None = None,
        known: np.ndarray | None = None,
    ) -> float:
        return float(
            estimator.score_per_person(data.val, data.persons_val, effects=effects, known=known)
        )

    def baseline_score(self, data: SequenceData) -> float | None:
        """Per-person segment accuracy of always answering the most frequent training state."""
        if not data.val:
            return None
        states, counts = np.unique(
            np.concatenate([np.asarray(labels) for _, labels in data.train]), return_counts=True
        )
        majority = states[np.argmax(counts)]
        hits: dict[str, list[int]] = {}
        for person, (_, labels) in zip(data.persons_val, data.val, strict=True):
            tally = hits.setdefault(person, [0, 0])
            tally[0] += int(np.sum(np.asarray(labels) == majority))
            tally[1] += len(labels)
        return float(np.mean([right / total for right, total in hits.values()]))

    def person_train_inputs(self, data: SequenceData, index: list[int]) -> tuple[Any, Any]:
        chosen = [data.train[k] for k in index]
        return [x for x, _ in chosen], [labels for _, labels in chosen]

    # ------------------------------------------------------------------ per-user update

    def user_data(
        self, session: Session, *, model: Model, user_id: int, estimator: Any
    ) -> UserData:
        rows = [
            row
            for row in store.load_user_sequences(session, model_id=model.id, user_id=user_id)
            if first_forbidden(model, row.labels) is None
        ]
        features = [_segments_matrix(model, row.segments) for row in rows]
        return UserData(inputs=(features, [list(row.labels) for row in rows]), n=len(rows))

    # ------------------------------------------------------------------ serving

    def serving_input(self, model: Model, items: Sequence[SegmentItem]) -> np.ndarray:
        return feature_matrix(
            model.features,
            [segment.features for segment in items],
            [["body", "segments", k, "features"] for k in range(len(items))],
        )

    def decode(
        self,
        estimator: NMESequenceTagger,
        *,
        x: np.ndarray,
        effects: np.ndarray,
        known: np.ndarray,
    ) -> Decoded:
        ((path, score, marginals),) = estimator.decode_with_effects([x], effects, known)
        return Decoded([str(state) for state in path], float(score), marginals)

    def user_summary(
        self, model: Model, estimator: NMESequenceTagger, effects: np.ndarray | None
    ) -> UserSummary:
        return UserSummary(transitions=transition_probabilities(estimator, effects))


def first_forbidden(model: Model, path: Sequence[str] | None) -> int | None:
    """Index k of the first segment whose transition from segment k-1 is forbidden, or None."""
    forbidden = model.architecture.get("forbidden_transitions") or []
    if not path or not forbidden:
        return None
    pairs = {(a, b) for a, b in forbidden}
    for k in range(1, len(path)):
        if (path[k - 1], path[k]) in pairs:
            return k
    return None


def _skipped_warning(rows: Sequence[Any]) -> TrainingWarning:
    users = sorted({row.external_id for row in rows})
    shown = ", ".join(repr(u) for u in users[:10]) + (" …" if len(users) > 10 else "")
    return TrainingWarning(
        kind="sequences_skipped",
        detail=f"{len(rows)} labelled sequence(s) use a forbidden transition and were left out "
        f"of training (users {shown}); re-send them with valid labels",
        data={"n_sequences": len(rows), "users": users[:100]},
    )


def transition_probabilities(
    tagger: NMESequenceTagger, effects: np.ndarray | None
) -> list[list[float]]:
    """The label chain T̄ + Tⁱ define (``NMESequenceTagger.transition_matrices``' default
    reading, :func:`nme.crf.label_chain`) for one user's θⁱ row ``(d,)`` (None: the generic
    T̄): rows from-state, columns to-state, forbidden transitions 0.

    Uses the tagger's ``_crf_scores``: the public ``transition_matrices`` reads θⁱ from the
    estimator's own table, which a served artifact does not carry (θⁱ lives in the database).
    """
    row = np.zeros((1, tagger.n_effects_), np.float32) if effects is None else effects[None]
    with torch.no_grad():
        rows = tagger._effects_tensor(row, None)
        transitions, _, _ = tagger._crf_scores(rows)
        transitions = transitions.expand(1, -1, -1)  # (1, S, S)
        probabilities = crf.label_chain(transitions, tagger.allowed_)[0]
    return probabilities.cpu().tolist()
