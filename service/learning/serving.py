"""Serving: the active version's estimator (cached per process), θⁱ fetched in one query, and
one batched forward pass per request.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
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


@dataclass(frozen=True)
class ActiveModel:
    """A model and its active version (None: none yet) as one process last read them.

    Both rows are detached from the session that read them (no lazy loads, nothing a later
    commit could expire), so request threads may share them read-only.
    """

    model: Model
    version: ModelVersion | None
    read_at: float
    """``time.monotonic()`` when the database said so."""


class Predictor:
    """Process-wide caches for serving: each model's active version, and the loaded artifact of
    that version.

    **Active version.** :meth:`active_model` reads a model with its active version from the
    database at most once per ``active_ttl`` seconds and process (``NME_ACTIVE_VERSION_TTL_
    SECONDS``); in between, a prediction costs no query for it. So an activation made by
    another process (the worker's refit, another API process, a rollback) is served here after
    at most ``active_ttl`` seconds — the documented staleness bound — while one made through
    this process's API (:meth:`forget`) takes effect on the next request. ``active_ttl=0``
    reads on every request. A request resolves the version once and answers wholly from it
    (artifact and θⁱ rows of that version), never from a mix.

    **Artifacts.** :meth:`load` keeps one loaded estimator per model, replaced when the version
    differs.
    """

    def __init__(
        self, *, artifact_dir: Path, device: str, active_ttl: float = 0.0, torch_threads: int = 0
    ) -> None:
        self._artifact_dir = artifact_dir
        self._device = device
        self._active_ttl = active_ttl
        self._torch_threads = torch_threads
        self._threads_configured = threading.local()
        self._cache: dict[int, LoadedVersion] = {}
        self._active: dict[str, ActiveModel] = {}
        self._generation = 0  # bumped by forget(): a read begun before it is not cached
        self._lock = threading.Lock()

    def active_model(self, session: Session, *, name: str) -> ActiveModel | None:
        """The model called ``name`` and its active version, at most ``active_ttl`` seconds old
        (None: no such model). A cache miss costs one query on ``session``."""
        entry = self._active.get(name)
        now = time.monotonic()
        if entry is not None and now - entry.read_at < self._active_ttl:
            return entry
        generation = self._generation
        found = store.get_model_with_active_version(session, name=name)
        if found is None:
            self._active.pop(name, None)
            return None
        model, version = found
        # Detach: the rows outlive this request's session and are read by other threads.
        session.expunge(model)
        if version is not None:
            session.expunge(version)
        entry = ActiveModel(model, version, now)
        with self._lock:
            # Concurrent misses may each store their read; any of them is fresh enough. A read
            # that began before a forget() may predate that activation: answer from it (the
            # request raced the activation) but do not keep it.
            if self._active_ttl > 0 and generation == self._generation:
                self._active[name] = entry
        return entry

    def load(self, version: ModelVersion) -> LoadedVersion:
        """The estimator of ``version``, loading (and hash-checking) it on first use.

        Called in the thread that then runs the forward pass, so it also applies
        ``torch_threads`` to that thread, once: torch's OpenMP thread count is per thread, and
        request threads started with the default (one per core), whose idle workers spin after
        each parallel region — a 100-user predict cost 11 ms of server CPU instead of 3–4 ms.
        """
        if self._torch_threads and not getattr(self._threads_configured, "done", False):
            torch.set_num_threads(self._torch_threads)
            self._threads_configured.done = True
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
        """Drop what this process knows of a model (after an activation through this
        process's API): the next request reads the active version from the database."""
        with self._lock:
            self._generation += 1
            self._cache.pop(model_id, None)
            for name, entry in list(self._active.items()):
                if entry.model.id == model_id:
                    self._active.pop(name, None)


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


def predict_rows(
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
    user's posterior variance of θⁱ (one more query; the prior Σ for unknown users).

    Predictions are not checked for finiteness here: a caller answering several requests from
    one batch checks each request's slice with :func:`not_finite`."""
    effects, known = gather_effects(session, loaded=loaded, user_ids=user_ids)
    kind = kind_of(model)
    variance = None
    if coverage is not None:
        variance = gather_variances(
            session, kind=kind, model=model, loaded=loaded, user_ids=user_ids, known=known
        )
    with loaded.lock:
        return kind.predict(
            model, loaded.estimator, x=x, effects=effects, known=known, user_ids=user_ids,
            coverage=coverage, variance=variance,
        )


def not_finite(predictions: Sequence[Prediction]) -> InvalidInput | None:
    """The 422 for the predictions that are not finite (indexes into ``predictions``), or
    None when all are."""
    bad = [i for i, p in enumerate(predictions) if not _finite(p)]
    if not bad:
        return None
    return InvalidInput(
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
