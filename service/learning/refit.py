"""The refit pipeline: labelled data → per-user temporal split → fit → champion/challenger →
artifact, then one transaction writing the version and all θⁱ rows.

Two steps, so that whoever runs a refit owns its write transaction:

- :func:`train_version` reads the model's labels in a short transaction, fits with no
  transaction open (ingest keeps working while a model trains), optionally scores the active
  version against the new one, and writes the artifact. It writes nothing to the database.
- :func:`record_version` writes the version row and every trained user's θⁱ row and, if asked,
  activates it; it flushes and the caller commits, together with whatever else must commit
  with it (the job runner: follow-up user updates and the job's own status). Wrap the write in
  :func:`keep_artifact_if_committed` so that a failed write leaves no artifact behind.

``service.jobs.tasks`` composes both: in the worker's job runner, and as ``refit_model`` for
callers without a job (the CLI, the demo).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from service.errors import Conflict, NotFound
from service.learning.champion import Decision, decide, score_challenger, score_champion
from service.learning.kinds import Estimator, TrainingData, kind_of
from service.learning.kinds.base import (
    REFIT_CHUNK_ROWS,
    Callback,
    non_finite_parts,
    temporal_split,
)
from service.storage import store
from service.storage.artifacts import ArtifactCorrupt, remove_artifact, write_artifact
from service.storage.tables import Model, ModelVersion

__all__ = [
    "ActivationRule",
    "TrainedVersion",
    "fit_estimator",
    "keep_artifact_if_committed",
    "record_version",
    "temporal_split",
    "train_version",
    "users_to_follow_up",
]

ActivationRule = bool | Literal["if_not_worse"]
"""True: activate; False: leave ready; ``"if_not_worse"``: champion/challenger."""

FOLLOW_UP_MARGIN = timedelta(seconds=60)
"""Labels changed up to this long before a refit read its data get a follow-up per-user update:
an ingest stamps ``updated_at`` before it commits, so a label can be stamped just before the
read and still be invisible to it."""


@dataclass(frozen=True)
class TrainedVersion:
    """A fitted, scored version whose artifact is on disk but not yet in the database.

    ``activate`` is the decision to apply when recording it; ``decision`` the champion/challenger
    verdict behind it (None when the caller chose without a comparison).
    """

    model: Model
    data: TrainingData
    estimator: Estimator
    metrics: dict[str, Any]
    artifact_dir: Path
    artifact_path: str
    artifact_sha256: str
    activate: bool
    decision: Decision | None


def fit_estimator(
    model: Model, data: TrainingData, *, device: str, callback: Callback | None = None
) -> tuple[Estimator, dict[str, Any]]:
    """Fit the model's kind of estimator on the training split and score it on validation
    (see ``ModelKind.fit``)."""
    return kind_of(model).fit(model, data, device=device, callback=callback)


def check_finite(model: Model, estimator: Estimator, metrics: dict[str, Any]) -> None:
    """A version whose statistics, weights or validation score are not finite is never
    recorded (409: a retry on the same labels would fail the same way)."""
    broken = non_finite_parts(estimator)
    if broken:
        raise Conflict(
            f"the refit of model {model.name!r} produced non-finite values in "
            f"{', '.join(broken[:5])}; no version was recorded (check the labels)"
        )
    score = metrics.get("val_score")
    if score is not None and not math.isfinite(score):
        raise Conflict(
            f"the refit of model {model.name!r} scored a non-finite {metrics['score_name']} on "
            "its validation labels; no version was recorded"
        )


def train_version(
    session_factory: sessionmaker[Session],
    *,
    model_name: str,
    artifact_dir: Path,
    device: str,
    activate: ActivationRule = True,
    callback: Callback | None = None,
    chunk_rows: int = REFIT_CHUNK_ROWS,
) -> TrainedVersion:
    """Read, fit, decide and write the artifact (nothing is written to the database).

    Args:
        activate: see :data:`ActivationRule`; the champion/challenger decision is stored in the
            metrics as ``champion_challenger``.
        chunk_rows: labelled rows read per chunk (``NME_REFIT_CHUNK_ROWS``).
    """
    with session_factory() as session:
        model = store.get_model(session, name=model_name)
        if model is None:
            raise NotFound(f"model {model_name!r} not found")
        data = kind_of(model).load_training_data(session, model=model, chunk_rows=chunk_rows)
    estimator, metrics = fit_estimator(model, data, device=device, callback=callback)
    check_finite(model, estimator, metrics)
    decision = None
    if activate == "if_not_worse":
        decision = _champion_challenger(
            session_factory, model=model, data=data, estimator=estimator, metrics=metrics,
            artifact_dir=artifact_dir, device=device,
        )
        metrics["champion_challenger"] = decision.as_dict()
    path, sha = write_artifact(estimator, artifact_dir=artifact_dir, model_name=model.name)
    return TrainedVersion(
        model=model,
        data=data,
        estimator=estimator,
        metrics=metrics,
        artifact_dir=artifact_dir,
        artifact_path=path,
        artifact_sha256=sha,
        activate=decision.activate if decision is not None else bool(activate),
        decision=decision,
    )


def record_version(session: Session, trained: TrainedVersion) -> ModelVersion:
    """Write the version row and every trained user's θⁱ row, activating the version when
    ``trained.activate`` (flushes; the caller commits)."""
    data, estimator = trained.data, trained.estimator
    version = store.add_version(
        session,
        model_id=trained.model.id,
        metrics=trained.metrics,
        artifact_path=trained.artifact_path,
        artifact_sha256=trained.artifact_sha256,
        n_users=len(estimator.person_ids_),
        n_observations=data.n_observations,
        trained_until=data.read_at,
    )
    # Users forgotten while the model trained (everywhere, or in this model) must not come
    # back through their θⁱ. Per-user look-ups run in pandas' hash tables, not Python loops.
    persons = pd.Index(estimator.person_ids_).astype(str)  # (U,) the table's row order
    known = pd.Series(list(data.user_row_ids.values()), index=list(data.user_row_ids.keys()))
    wanted = known.reindex(persons).to_numpy(dtype=np.int64)  # (U,) user row ids
    counts = pd.Series(np.asarray(data.persons_train, dtype=object)).value_counts()
    n_obs = counts.reindex(persons).to_numpy(dtype=np.int64)  # (U,) training labels each
    alive = store.users_with_data(session, model_id=trained.model.id, user_ids=wanted.tolist())
    keep = np.isin(wanted, np.fromiter(alive, dtype=np.int64, count=len(alive)))  # (U,)
    store.add_person_param_arrays(
        session,
        version_id=version.id,
        user_ids=wanted[keep],
        effects=estimator.effects_matrix()[keep],  # (U', d)
        effects_var=estimator.effects_variance_matrix()[keep],  # (U', d), Laplace posterior
        n_obs=n_obs[keep],
    )
    if trained.activate:
        store.activate_version(session, version=version)
    return version


def users_to_follow_up(session: Session, trained: TrainedVersion) -> list[int]:
    """Row ids of users whose labels changed while the version trained: once it is active,
    a per-user update brings those labels into their θⁱ."""
    return store.users_with_labels_since(
        session, model_id=trained.model.id, since=trained.data.read_at - FOLLOW_UP_MARGIN
    )


@contextmanager
def keep_artifact_if_committed(
    session_factory: sessionmaker[Session], trained: TrainedVersion
) -> Iterator[None]:
    """Around the transaction that records ``trained``: if it fails, delete the artifact —
    but only once a fresh look at the database shows its version is not there. A commit can
    fail on the client after the server committed (a dropped connection); deleting then would
    leave an active version without its artifact. When the database cannot be asked, the
    artifact stays, and the orphan collector removes it later if it is unreferenced."""
    try:
        yield
    except BaseException:
        if version_is_absent(session_factory, trained.artifact_path):
            remove_artifact(trained.artifact_dir, trained.artifact_path)
        raise


def version_is_absent(session_factory: sessionmaker[Session], artifact_path: str) -> bool:
    """True only when the database answers that no version references ``artifact_path``."""
    try:
        with session_factory() as session:
            found = session.scalar(
                select(ModelVersion.id).where(ModelVersion.artifact_path == artifact_path)
            )
    except Exception:  # unreachable: we do not know, so keep the artifact
        return False
    return found is None


def _champion_challenger(
    session_factory: sessionmaker[Session],
    *,
    model: Model,
    data: TrainingData,
    estimator: Estimator,
    metrics: dict[str, Any],
    artifact_dir: Path,
    device: str,
) -> Decision:
    with session_factory() as session:
        champion = store.get_active_version(session, model_id=model.id)
        champion_score, challenger_score, error = None, None, None
        baseline = None
        if champion is None and metrics["val_score"] is not None:
            baseline = kind_of(model).baseline_score(data)
        if champion is not None and metrics["val_score"] is not None:
            challenger_score = score_challenger(model, estimator, data)
            try:
                champion_score = score_champion(
                    session, model=model, champion=champion, data=data,
                    artifact_dir=artifact_dir, device=device,
                )
            except (ValueError, ArtifactCorrupt) as err:
                error = str(err)
    return decide(
        challenger_score if champion is not None else metrics["val_score"],
        champion_score,
        champion.version if champion is not None else None,
        score_name=metrics["score_name"],
        champion_error=error,
        baseline_score=baseline,
    )

