"""Serving: the active version's estimator (cached per process), θⁱ fetched in one query, and
one batched forward pass per request.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy.orm import Session

from service.errors import InvalidInput, invalid
from service.learning.kinds import Estimator, kind_of
from service.learning.kinds.base import Decoded, Prediction, UserSummary
from service.learning.validation import MAX_REPORTED_ERRORS
from service.storage import store
from service.storage.artifacts import load_verified
from service.storage.codec import decode_rows
from service.storage.tables import Model, ModelVersion


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
    estimator: Estimator
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
                # Replacing the entry drops the last reference to the old estimator; it has no
                # reference cycles, so it is freed at once (no gc.freeze() here: frozen objects
                # are never collected, and each replaced model would leak).
                self._cache[version.model_id] = entry
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
        raws = [stored[u] for u, k in zip(user_ids, known, strict=True) if k]
        effects[known] = decode_rows(raws, d)
    return effects, known


def predict_batch(
    session: Session,
    *,
    model: Model,
    loaded: LoadedVersion,
    x: np.ndarray,
    user_ids: Sequence[str],
    coverage: float | None = None,
) -> list[Prediction]:
    """Predictions for a batch ``x (n, F)``: one θⁱ query and one forward pass, never a loop
    over users. With ``coverage`` (e.g. 0.9), also each prediction's interval, from σ² and the
    user's posterior variance of θⁱ (one more query; the prior Σ for unknown users)."""
    effects, known = gather_effects(session, loaded=loaded, user_ids=user_ids)
    kind = kind_of(model)
    variance = None
    if coverage is not None:
        variance = gather_variances(
            session, kind=kind, model=model, loaded=loaded, user_ids=user_ids, known=known
        )
    with loaded.lock:
        predictions = kind.predict(
            model, loaded.estimator, x=x, effects=effects, known=known, user_ids=user_ids,
            coverage=coverage, variance=variance,
        )
    bad = [i for i, p in enumerate(predictions) if not _finite(p)]
    if bad:
        raise InvalidInput(
            [
                invalid(
                    ["body", "items", i, "features"],
                    "the model's prediction for these features is not finite (they lie far "
                    "outside what it was trained on)",
                    "finite",
                )
                for i in bad[:MAX_REPORTED_ERRORS]
            ]
        )
    return predictions


def gather_variances(
    session: Session,
    *,
    kind: Any,
    model: Model,
    loaded: LoadedVersion,
    user_ids: Sequence[str],
    known: np.ndarray,
) -> np.ndarray:
    """``(n, d) float32`` the θⁱ posterior variances of a batch's users, in ONE query; rows
    of unknown users are ignored by the estimator (prior Σ), rows stored before variances
    existed get the prior Σ too (wider intervals, never narrower)."""
    stored = store.fetch_person_variances(
        session, version_id=loaded.version_id, external_ids=user_ids
    )
    d = loaded.n_effects
    variance = np.zeros((len(user_ids), d), dtype=np.float32)
    have = np.fromiter(
        (stored.get(u) is not None for u in user_ids), dtype=bool, count=len(user_ids)
    )
    if have.any():
        variance[have] = decode_rows([stored[u] for u, h in zip(user_ids, have, strict=True)
                                      if h], d)
    legacy = known & ~have
    if legacy.any():
        with loaded.lock:
            variance[legacy] = kind.prior_variance(loaded.estimator, len(model.features))
    return variance


def _finite(prediction: Prediction) -> bool:
    values = list((prediction.probabilities or {}).values())
    values += [v for v in (prediction.lower, prediction.upper) if v is not None]
    if isinstance(prediction.prediction, float):
        values.append(prediction.prediction)
    return all(math.isfinite(v) for v in values)


def decode_sequence(
    session: Session, *, model: Model, loaded: LoadedVersion, user_id: str, x: np.ndarray
) -> tuple[Decoded, bool]:
    """Viterbi path, score and marginals of one user's sequence ``x (L, F)``, and whether the
    user was personalised."""
    effects, known = gather_effects(session, loaded=loaded, user_ids=[user_id])
    with loaded.lock:
        decoded = kind_of(model).decode(loaded.estimator, x=x, effects=effects, known=known)
    if not (math.isfinite(decoded.score) and np.isfinite(decoded.marginals).all()):
        raise InvalidInput(
            [
                invalid(
                    ["body", "segments"],
                    "the model's scores for these segments are not finite (their features lie "
                    "far outside what it was trained on)",
                    "finite",
                )
            ]
        )
    return decoded, bool(known[0])


def user_summary(model: Model, loaded: LoadedVersion, effects: np.ndarray | None) -> UserSummary:
    """What a user's θⁱ row ``(d,)`` (None: the generic model) means, for the user route."""
    with loaded.lock:
        return kind_of(model).user_summary(model, loaded.estimator, effects)
