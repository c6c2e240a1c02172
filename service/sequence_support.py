"""Sequence models (NME-CRF): labelled sequences for a refit, decoding, transition matrices.

Everything that differs between sequence models and the per-day models lives here; the refit
pipeline, the decode route and the user route call these functions.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
import torch
from sqlalchemy.orm import Session

from nme import NMESequenceTagger
from service import store
from service.errors import Conflict
from service.estimators import build_estimator
from service.tables import Model, utcnow

LabelledSequence = tuple[np.ndarray, list[str]]
"""``(features (L, F) float32, state names (L,))``."""


@dataclass(frozen=True)
class SequenceData:
    """A sequence model's labelled sequences, split per user in time order."""

    train: list[LabelledSequence]
    persons_train: list[str]
    val: list[LabelledSequence]
    persons_val: list[str]
    user_row_ids: dict[str, int]
    read_at: datetime

    @property
    def n_observations(self) -> int:
        """Sequences used in total (train + validation)."""
        return len(self.train) + len(self.val)


def load_sequence_data(
    session: Session, *, model: Model, split: Callable[[list[str]], np.ndarray]
) -> SequenceData:
    """Read labelled sequences (per user, in the order they arrived) and split them."""
    read_at = utcnow()
    rows = store.load_labelled_sequences(session, model_id=model.id)
    if not rows:
        raise Conflict(f"model {model.name!r} has no labelled sequences to train on")
    persons = [row.external_id for row in rows]
    sequences = [
        (
            np.array([[s[name] for name in model.features] for s in row.segments], np.float32),
            list(row.labels),
        )
        for row in rows
    ]
    is_val = split(persons)
    return SequenceData(
        train=[s for s, v in zip(sequences, is_val, strict=True) if not v],
        persons_train=[p for p, v in zip(persons, is_val, strict=True) if not v],
        val=[s for s, v in zip(sequences, is_val, strict=True) if v],
        persons_val=[p for p, v in zip(persons, is_val, strict=True) if v],
        user_row_ids={row.external_id: row.user_id for row in rows},
        read_at=read_at,
    )


def fit_sequences(
    model: Model,
    data: SequenceData,
    *,
    device: str,
    callback: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[NMESequenceTagger, dict[str, Any]]:
    """Fit the NME-CRF tagger; score segment accuracy per person on the validation split."""
    tagger = build_estimator(model, device=device)
    assert isinstance(tagger, NMESequenceTagger)
    has_val = len(data.val) > 0
    started = time.perf_counter()
    try:
        tagger.fit(
            data.train,
            data.persons_train,
            sequences_val=data.val if has_val else None,
            persons_val=data.persons_val if has_val else None,
            callback=callback,
        )
    except ValueError as err:  # e.g. a label path through a forbidden transition
        raise Conflict(f"model {model.name!r} cannot be trained: {err}") from err
    metrics: dict[str, Any] = {
        "score_name": "segment_accuracy",
        "val_score": None,
        "val_score_generic": None,
        "n_train": len(data.train),
        "n_val": len(data.val),
        "n_users": len(tagger.person_ids_),
        "epochs": len(tagger.history_),
        "best_epoch": int(tagger.best_epoch_),
        "fit_seconds": round(time.perf_counter() - started, 3),
    }
    if has_val:
        n = len(data.val)
        metrics["val_score"] = tagger.score_per_person(data.val, data.persons_val)
        metrics["val_score_generic"] = tagger.score_per_person(
            data.val,
            data.persons_val,
            effects=np.zeros((n, tagger.n_effects_), dtype=np.float32),
            known=np.zeros(n, dtype=bool),
        )
    return tagger, metrics


def decode(
    tagger: NMESequenceTagger, *, x: np.ndarray, effects: np.ndarray, known: np.ndarray
) -> tuple[list[str], float, np.ndarray]:
    """Viterbi path (state names), its score and the marginals ``(L, S)`` of one sequence.

    Args:
        x: ``(L, F)`` features; effects: ``(1, d)`` the user's θⁱ; known: ``(1,)``.
    """
    ((path, score, marginals),) = tagger.decode_with_effects([x], effects, known)
    return [str(state) for state in path], float(score), marginals


def transition_probabilities(
    tagger: NMESequenceTagger, effects: np.ndarray | None
) -> list[list[float]]:
    """softmax(T̄ + Tⁱ) per row for one user's θⁱ row ``(d,)`` (None: the generic T̄).

    Forbidden transitions get probability 0. Uses the tagger's ``_crf_scores``: the public
    ``transition_matrices`` reads θⁱ from the estimator's own table, which a served artifact
    does not carry (θⁱ lives in the database).
    """
    row = np.zeros((1, tagger.n_effects_), np.float32) if effects is None else effects[None]
    with torch.no_grad():
        rows = tagger._effects_tensor(row, None)
        transitions, _, _ = tagger._crf_scores(rows)
        transitions = transitions.expand(1, -1, -1)[0]  # (S, S)
        if tagger.allowed_ is not None:
            transitions = transitions.masked_fill(~tagger.allowed_, float("-inf"))
        probabilities = torch.softmax(transitions.double(), dim=-1)
    return probabilities.cpu().tolist()
