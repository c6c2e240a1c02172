"""The refit pipeline: labelled data → per-user temporal split → fit → artifact → one
transaction writing the version and all θⁱ rows → activation.

``refit_model`` owns its transactions (read, then one write), so the CLI and the background
worker call it the same way; the worker asks for champion/challenger activation. The fit itself
runs outside any database transaction: ingest keeps working while a model trains.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import pandas as pd
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from service import sequence_support, store
from service.artifacts import ArtifactCorrupt, remove_artifact, write_artifact
from service.champion import Decision, decide, score_challenger, score_champion
from service.errors import Conflict, NotFound
from service.estimators import Estimator, build_estimator
from service.jobs.queue import enqueue_user_updates
from service.sequence_support import SequenceData
from service.tables import Model, ModelVersion, User, utcnow

VALIDATION_FRACTION = 0.2
"""Each user's last 20 % of labels (in time order) validate; the rest train."""

Callback = Callable[[dict[str, Any]], None]


class LabelledData(Protocol):
    """What recording a version needs from either kind of training data."""

    persons_train: list[str]
    user_row_ids: dict[str, int]
    read_at: Any

    @property
    def n_observations(self) -> int: ...


@dataclass(frozen=True)
class TrainingData:
    """A model's labelled observations split for one refit.

    ``x_*`` are ``(n, F)`` float32 in model feature order, ``y_*`` ``(n,)``, ``persons_*`` the
    users' external ids ``(n,)``.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    persons_train: list[str]
    x_val: np.ndarray
    y_val: np.ndarray
    persons_val: list[str]
    user_row_ids: dict[str, int]
    read_at: Any

    @property
    def n_observations(self) -> int:
        """Labels used in total (train + validation)."""
        return len(self.persons_train) + len(self.persons_val)


def temporal_split(persons: list[str], fraction: float = VALIDATION_FRACTION) -> np.ndarray:
    """Mark each user's last ``floor(fraction · nᵢ)`` rows as validation.

    Args:
        persons: ``(n,)`` user ids, grouped by user and in time order within a user.

    Returns:
        ``(n,) bool``: True for validation rows.
    """
    is_val = np.zeros(len(persons), dtype=bool)
    start = 0
    while start < len(persons):
        end = start
        while end < len(persons) and persons[end] == persons[start]:
            end += 1
        n_val = int((end - start) * fraction)
        is_val[end - n_val : end] = True
        start = end
    return is_val


def load_training_data(session: Session, *, model: Model) -> TrainingData | SequenceData:
    """Read a model's labels (observations, or sequences for a sequence model) and split each
    user's in time order."""
    if model.task == "sequence":
        return sequence_support.load_sequence_data(session, model=model, split=temporal_split)
    read_at = utcnow()
    rows = store.load_labelled_observations(session, model_id=model.id)
    if not rows:
        raise Conflict(f"model {model.name!r} has no labelled observations to train on")
    persons = [row.external_id for row in rows]
    x = np.array(
        [[row.features[name] for name in model.features] for row in rows], dtype=np.float32
    )
    labels = [row.label for row in rows]
    y = np.asarray(labels, dtype=np.float64 if model.task == "regression" else object)
    is_val = temporal_split(persons)
    return TrainingData(
        x_train=x[~is_val],
        y_train=y[~is_val],
        persons_train=[p for p, v in zip(persons, is_val, strict=True) if not v],
        x_val=x[is_val],
        y_val=y[is_val],
        persons_val=[p for p, v in zip(persons, is_val, strict=True) if v],
        user_row_ids={row.external_id: row.user_id for row in rows},
        read_at=read_at,
    )


def fit_estimator(
    model: Model,
    data: TrainingData | SequenceData,
    *,
    device: str,
    callback: Callback | None = None,
) -> tuple[Estimator, dict[str, Any]]:
    """Fit on the training split; score per person on the validation split.

    Returns the fitted estimator and the version's metrics: ``val_score`` (per-person averaged,
    higher is better: negative RMSE, accuracy or segment accuracy), the generic model's score
    on the same labels for comparison, and training bookkeeping.
    """
    if isinstance(data, SequenceData):
        return sequence_support.fit_sequences(model, data, device=device, callback=callback)
    if model.task == "classification" and len(set(data.y_train.tolist())) < 2:
        raise Conflict(f"model {model.name!r} needs labels of at least two classes to train")
    estimator = build_estimator(model, device=device)
    frame = pd.DataFrame(data.x_train, columns=model.features)
    has_val = len(data.persons_val) > 0
    started = time.perf_counter()
    try:
        estimator.fit(
            frame,
            data.y_train,
            data.persons_train,
            X_val=pd.DataFrame(data.x_val, columns=model.features) if has_val else None,
            y_val=data.y_val if has_val else None,
            persons_val=data.persons_val if has_val else None,
            callback=callback,
        )
    except ValueError as err:  # e.g. a placement naming no parameter of the network
        raise Conflict(f"model {model.name!r} cannot be trained: {err}") from err
    metrics: dict[str, Any] = {
        "score_name": "accuracy" if model.task == "classification" else "neg_rmse",
        "val_score": None,
        "val_score_generic": None,
        "n_train": len(data.persons_train),
        "n_val": len(data.persons_val),
        "n_users": len(estimator.person_ids_),
        "epochs": len(estimator.history_),
        "best_epoch": int(estimator.best_epoch_),
        "fit_seconds": round(time.perf_counter() - started, 3),
    }
    if has_val:
        metrics["val_score"] = estimator.score_per_person(data.x_val, data.y_val, data.persons_val)
        n_val = len(data.persons_val)
        metrics["val_score_generic"] = estimator.score_per_person(
            data.x_val,
            data.y_val,
            data.persons_val,
            effects=np.zeros((n_val, estimator.n_effects_), dtype=np.float32),
            known=np.zeros(n_val, dtype=bool),
        )
    return estimator, metrics


def record_version(
    session: Session,
    *,
    model: Model,
    data: LabelledData,
    estimator: Estimator,
    artifact_path: str,
    artifact_sha256: str,
    metrics: dict[str, Any],
    activate: bool,
) -> ModelVersion:
    """Write the version row and every trained user's θⁱ row (flushes; the caller commits)."""
    version = store.add_version(
        session,
        model_id=model.id,
        metrics=metrics,
        artifact_path=artifact_path,
        artifact_sha256=artifact_sha256,
        n_users=len(estimator.person_ids_),
        n_observations=data.n_observations,
        trained_until=data.read_at,
    )
    # Users forgotten while the model trained must not come back through their θⁱ.
    wanted = [data.user_row_ids[str(p)] for p in estimator.person_ids_]
    alive = set(session.scalars(select(User.id).where(User.id.in_(wanted))))
    counts: dict[str, int] = {}
    for person in data.persons_train:
        counts[person] = counts.get(person, 0) + 1
    effects = estimator.effects_matrix().astype("<f4")  # (n_persons, d)
    rows = [
        {"user_id": user_id, "effects": effects[k].tobytes(), "n_obs": counts[str(person)]}
        for k, (person, user_id) in enumerate(zip(estimator.person_ids_, wanted, strict=True))
        if user_id in alive
    ]
    store.add_person_params(session, version_id=version.id, rows=rows)
    if activate:
        store.activate_version(session, version=version)
    return version


ActivationRule = bool | Literal["if_not_worse"]
"""True: activate; False: leave ready; ``"if_not_worse"``: champion/challenger."""

FOLLOW_UP_MARGIN = timedelta(seconds=60)
"""Labels changed up to this long before a refit read its data get a follow-up per-user update:
an ingest stamps ``updated_at`` before it commits, so a label can be stamped just before the
read and still be invisible to it."""


def refit_model(
    session_factory: sessionmaker[Session],
    *,
    model_name: str,
    artifact_dir: Path,
    device: str,
    activate: ActivationRule = True,
    callback: Callback | None = None,
    before_commit: Callable[[Session, ModelVersion], None] | None = None,
    follow_up_updates: bool = True,
    max_attempts: int = 3,
) -> ModelVersion:
    """Run the whole pipeline for one model and return the new (committed) version.

    Args:
        activate: see :data:`ActivationRule`; the champion/challenger decision is stored in the
            version's ``metrics["champion_challenger"]``.
        before_commit: runs inside the final transaction after the version is written (the
            worker marks its job succeeded there, so version and job status commit together);
            raising from it rolls everything back.
        follow_up_updates: when the new version is activated, queue a per-user update for every
            user whose labels changed while it trained, so those labels reach its θⁱ.

    A failure before the final commit leaves no version row and no artifact behind, so a
    half-written version can never be activated.
    """
    with session_factory() as session:
        model = store.get_model(session, name=model_name)
        if model is None:
            raise NotFound(f"model {model_name!r} not found")
        data = load_training_data(session, model=model)
    estimator, metrics = fit_estimator(model, data, device=device, callback=callback)
    decision = None
    if activate == "if_not_worse":
        decision = _champion_challenger(
            session_factory, model=model, data=data, estimator=estimator, metrics=metrics,
            artifact_dir=artifact_dir, device=device,
        )
        metrics["champion_challenger"] = decision.as_dict()
    path, sha = write_artifact(estimator, artifact_dir=artifact_dir, model_name=model.name)
    try:
        with session_factory() as session:
            version = record_version(
                session,
                model=model,
                data=data,
                estimator=estimator,
                artifact_path=path,
                artifact_sha256=sha,
                metrics=metrics,
                activate=decision.activate if decision is not None else bool(activate),
            )
            if follow_up_updates and version.status == "active":
                users = store.users_with_labels_since(
                    session, model_id=model.id, since=data.read_at - FOLLOW_UP_MARGIN
                )
                enqueue_user_updates(
                    session, model_id=model.id, user_ids=users, max_attempts=max_attempts
                )
            if before_commit is not None:
                before_commit(session, version)
            session.commit()
            return version
    except BaseException:
        remove_artifact(artifact_dir, path)
        raise


def _champion_challenger(
    session_factory: sessionmaker[Session],
    *,
    model: Model,
    data: TrainingData | SequenceData,
    estimator: Estimator,
    metrics: dict[str, Any],
    artifact_dir: Path,
    device: str,
) -> Decision:
    with session_factory() as session:
        champion = store.get_active_version(session, model_id=model.id)
        champion_score, challenger_score, error = None, None, None
        if champion is not None and metrics["val_score"] is not None:
            challenger_score = score_challenger(estimator, data)
            try:
                champion_score = score_champion(
                    session, champion=champion, data=data, artifact_dir=artifact_dir,
                    device=device,
                )
            except (ValueError, ArtifactCorrupt) as err:
                error = str(err)
    return decide(
        challenger_score if champion is not None else metrics["val_score"],
        champion_score,
        champion.version if champion is not None else None,
        score_name=metrics["score_name"],
        champion_error=error,
    )
