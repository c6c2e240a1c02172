"""Serving: the active version's estimator (cached per process), θⁱ fetched in one query, and
one batched forward pass per request.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy.orm import Session

from service import sequence_support, store
from service.artifacts import load_verified
from service.schemas import DecodePublic, DecodeRequest, PredictionPublic, PredictItem
from service.tables import Model, ModelVersion
from service.validation import feature_matrix


@dataclass(frozen=True)
class LoadedVersion:
    """An estimator loaded from a version's artifact.

    ``lock`` serialises forward passes through one estimator. The core's general path for
    per-sample parameters (``torch.func.functional_call`` under ``vmap``) swaps tensors on the
    shared module while it runs, and two request threads inside it at once corrupted each
    other's batches (seen as 500s in the benchmark); only its linear-layer fast path is
    thread-local. Database access and validation still run concurrently.
    """

    version_id: int
    version: int
    estimator: Any
    lock: threading.Lock = field(default_factory=threading.Lock, compare=False, repr=False)

    @property
    def n_effects(self) -> int:
        """Length d of one θⁱ row."""
        return int(self.estimator.n_effects_)


class Predictor:
    """Process-wide cache of loaded artifacts: one entry per model, for its active version.

    Each request reads the active version from the database, so an activation made by any
    process (rollback included) is picked up on the next request: the entry is replaced when
    the version id differs.
    """

    def __init__(self, *, artifact_dir: Path, device: str) -> None:
        self._artifact_dir = artifact_dir
        self._device = device
        self._cache: dict[int, LoadedVersion] = {}
        self._lock = threading.Lock()

    def load(self, version: ModelVersion) -> LoadedVersion:
        """The estimator of ``version``, loading (and hash-checking) it on first use."""
        entry = self._cache.get(version.model_id)
        if entry is not None and entry.version_id == version.id:
            return entry
        with self._lock:  # concurrent first requests load the artifact once
            entry = self._cache.get(version.model_id)
            if entry is None or entry.version_id != version.id:
                estimator = load_verified(
                    self._artifact_dir,
                    version.artifact_path,
                    version.artifact_sha256,
                    self._device,
                )
                entry = LoadedVersion(version.id, version.version, estimator)
                self._cache[version.model_id] = entry
                gc.freeze()  # the estimator is long-lived: keep full collections short
            return entry

    def forget(self, model_id: int) -> None:
        """Drop a model's cached estimator (e.g. after an activation in this process)."""
        with self._lock:
            self._cache.pop(model_id, None)


def gather_effects(
    session: Session, *, loaded: LoadedVersion, user_ids: Sequence[str]
) -> tuple[np.ndarray, np.ndarray]:
    """θⁱ rows for a batch's users, fetched in ONE query.

    Returns:
        ``effects (n, d) float32`` (zeros for unknown users) and ``known (n,) bool``.
    """
    stored = store.fetch_person_params(session, version_id=loaded.version_id, external_ids=user_ids)
    d = loaded.n_effects
    effects = np.zeros((len(user_ids), d), dtype=np.float32)
    known = np.fromiter((u in stored for u in user_ids), dtype=bool, count=len(user_ids))
    if known.any():
        # one buffer for all known rows: no per-user numpy calls
        raw = b"".join(stored[u] for u, k in zip(user_ids, known, strict=True) if k)
        flat = np.frombuffer(raw, dtype="<f4")
        assert flat.size == int(known.sum()) * d, f"θⁱ rows do not have {d} values each"
        effects[known] = flat.reshape(-1, d)
    return effects, known


def predict_items(
    session: Session, *, model: Model, loaded: LoadedVersion, items: Sequence[PredictItem]
) -> list[PredictionPublic]:
    """Predictions for a batch: one θⁱ query and one forward pass, never a loop over users."""
    x = feature_matrix(
        model.features,
        [item.features for item in items],
        [["body", "items", i, "features"] for i in range(len(items))],
    )
    user_ids = [item.user_id for item in items]
    effects, known = gather_effects(session, loaded=loaded, user_ids=user_ids)
    estimator = loaded.estimator
    if model.task == "classification":
        with loaded.lock:
            proba = estimator.predict_proba_with_effects(x, effects, known)  # (n, n_classes)
        classes = [str(c) for c in estimator.classes_]
        best = proba.argmax(axis=1)
        return [
            PredictionPublic(
                user_id=user_id,
                prediction=classes[best[i]],
                personalized=bool(known[i]),
                probabilities=_class_map(model, classes, proba[i]),
            )
            for i, user_id in enumerate(user_ids)
        ]
    with loaded.lock:
        values = estimator.predict_with_effects(x, effects, known)  # (n,)
    return [
        PredictionPublic(user_id=user_id, prediction=float(values[i]), personalized=bool(known[i]))
        for i, user_id in enumerate(user_ids)
    ]


def _class_map(model: Model, trained: list[str], proba: np.ndarray) -> dict[str, float]:
    # A class with no training labels is absent from the estimator: probability 0.
    by_name = dict(zip(trained, proba.tolist(), strict=True))
    return {name: float(by_name.get(name, 0.0)) for name in model.classes or trained}


def user_bias(
    model: Model, loaded: LoadedVersion, effects: np.ndarray | None
) -> float | dict[str, float]:
    """A user's baseline shift from their θⁱ row (``effects (d,)``, None for the generic)."""
    row = np.zeros((1, loaded.n_effects), dtype=np.float32) if effects is None else effects[None]
    with loaded.lock:
        bias = loaded.estimator.person_bias(row)
    if model.task == "classification":
        classes = [str(c) for c in loaded.estimator.classes_]
        return {name: float(value) for name, value in zip(classes, bias[0], strict=True)}
    return float(bias[0])


def segment_matrix(model: Model, request: DecodeRequest) -> np.ndarray:
    """``(L, F)`` features of a decode request's segments (422 naming schema mismatches)."""
    return feature_matrix(
        model.features,
        [segment.features for segment in request.segments],
        [["body", "segments", k, "features"] for k in range(len(request.segments))],
    )


def decode_request(
    session: Session,
    *,
    model: Model,
    loaded: LoadedVersion,
    request: DecodeRequest,
    x: np.ndarray,
) -> DecodePublic:
    """Viterbi path, score and optional marginals of one user's sequence ``x (L, F)``."""
    effects, known = gather_effects(session, loaded=loaded, user_ids=[request.user_id])
    with loaded.lock:
        path, score, marginals = sequence_support.decode(
            loaded.estimator, x=x, effects=effects, known=known
        )
    states = [str(state) for state in loaded.estimator.states_]
    return DecodePublic(
        model=model.name,
        version=loaded.version,
        personalized=bool(known[0]),
        path=path,
        score=score,
        marginals=[dict(zip(states, row, strict=True)) for row in marginals.tolist()]
        if request.marginals
        else None,
    )


def user_transitions(loaded: LoadedVersion, effects: np.ndarray | None) -> list[list[float]]:
    """A sequence model user's transition probabilities (rows: from-state, in ``states``)."""
    with loaded.lock:
        return sequence_support.transition_probabilities(loaded.estimator, effects)
