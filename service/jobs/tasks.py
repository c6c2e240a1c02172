"""What each kind of job does. The runners own the write transaction: the pipeline returns
its result (a trained version, a fitted θⁱ row), and the runner writes it, queues what follows
from it and marks the job succeeded in ONE transaction, so a crash can never leave a result
without a finished job or a finished job without its result.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from service.errors import NotFound
from service.jobs.queue import enqueue_user_updates, finish_job
from service.learning import history, refit
from service.learning.kinds.base import REFIT_CHUNK_ROWS
from service.learning.serving import Predictor
from service.learning.user_update import fit_user, write_user_fit
from service.storage import retention
from service.storage.tables import Model, ModelVersion


class JobLost(RuntimeError):
    """The worker no longer owns the job (declared dead and requeued, or the job was deleted)."""


@dataclass(frozen=True)
class Claim:
    """A claimed job: ``attempt`` identifies this worker's claim in every later write."""

    job_id: int
    attempt: int
    kind: str
    model_id: int
    user_id: int | None
    max_attempts: int


@dataclass(frozen=True)
class JobContext:
    """What job runners need from the worker."""

    session_factory: sessionmaker[Session]
    predictor: Predictor
    artifact_dir: Path
    device: str
    max_attempts: int
    progress: Callable[[dict[str, Any]], None]
    keep_versions: int = 5
    refit_backoff_seconds: float = 600.0
    refit_chunk_rows: int = REFIT_CHUNK_ROWS


@dataclass(frozen=True)
class JobResult:
    """A succeeded job's final progress and the version it produced or updated."""

    progress: dict[str, Any]
    result_version: int | None


def _finish(session: Session, claim: Claim, result: JobResult) -> None:
    if not finish_job(
        session,
        job_id=claim.job_id,
        attempt=claim.attempt,
        status="succeeded",
        progress=result.progress,
        result_version=result.result_version,
    ):
        raise JobLost(f"job {claim.job_id} attempt {claim.attempt} is no longer ours")


def run_user_update(context: JobContext, claim: Claim) -> JobResult:
    """Re-fit one user's θⁱ in the active version (see ``service.learning.user_update``)."""
    assert claim.user_id is not None
    fit = fit_user(
        context.session_factory, context.predictor, model_id=claim.model_id, user_id=claim.user_id
    )
    with context.session_factory() as session:
        outcome = write_user_fit(session, fit)
        result = JobResult(outcome.as_dict(), outcome.version)
        _finish(session, claim, result)
        session.commit()
    return result


def run_refit(context: JobContext, claim: Claim) -> JobResult:
    """Train a new version; activate it only if it is not worse than the active one."""
    with context.session_factory() as session:
        model = session.get(Model, claim.model_id)
        if model is None:
            raise NotFound(f"model {claim.model_id} not found")
        name, max_epochs = model.name, model.training.get("max_epochs")
    last: dict[str, Any] = {}

    def on_epoch(record: dict[str, Any]) -> None:
        last.clear()
        last.update(epoch_progress(record, max_epochs))
        context.progress(dict(last))

    trained = refit.train_version(
        context.session_factory,
        model_name=name,
        artifact_dir=context.artifact_dir,
        device=context.device,
        activate="if_not_worse",
        callback=on_epoch,
        chunk_rows=context.refit_chunk_rows,
    )
    with (
        refit.keep_artifact_if_committed(context.session_factory, trained),
        context.session_factory() as session,
    ):
        version, pruned = commit_refit(
            session, trained, job_id=claim.job_id, actor="worker",
            max_attempts=context.max_attempts, keep_versions=context.keep_versions,
            backoff_seconds=context.refit_backoff_seconds,
        )
        result = JobResult(refit_progress(version, last), version.version)
        _finish(session, claim, result)
        session.commit()
    retention.delete_artifacts(context.artifact_dir, pruned)
    return result


def commit_refit(
    session: Session,
    trained: refit.TrainedVersion,
    *,
    job_id: int | None,
    actor: str,
    max_attempts: int,
    keep_versions: int,
    backoff_seconds: float,
    follow_up: bool = True,
) -> tuple[ModelVersion, list[str]]:
    """Everything a trained version writes, in the caller's transaction (flushes): the version
    and its θⁱ rows; when it becomes active (and ``follow_up``), a per-user update for every
    user whose labels changed while it trained, so those labels reach its θⁱ; the model's events
    and refit-trigger memory; retention. Returns the version and the artifact paths of pruned
    versions, to delete once the transaction committed."""
    version = refit.record_version(session, trained)
    if follow_up and version.status == "active":
        users = refit.users_to_follow_up(session, trained)
        enqueue_user_updates(
            session, model_id=trained.model.id, user_ids=users, max_attempts=max_attempts
        )
    history.record_refit(
        session, trained, version, job_id=job_id, actor=actor, backoff_seconds=backoff_seconds
    )
    pruned = retention.prune_versions(
        session, model_id=trained.model.id, keep=keep_versions, job_id=job_id
    )
    return version, pruned


def refit_model(
    session_factory: sessionmaker[Session],
    *,
    model_name: str,
    artifact_dir: Path,
    device: str,
    activate: refit.ActivationRule = True,
    callback: Callable[[dict[str, Any]], None] | None = None,
    follow_up_updates: bool = True,
    max_attempts: int = 3,
    keep_versions: int = 5,
    actor: str = "cli",
    chunk_rows: int = REFIT_CHUNK_ROWS,
) -> ModelVersion:
    """A refit outside the worker (``nme-service refit``, the demo): train, then commit the
    version, its θⁱ rows, the follow-up user updates, its events and retention in one
    transaction."""
    trained = refit.train_version(
        session_factory, model_name=model_name, artifact_dir=artifact_dir, device=device,
        activate=activate, callback=callback, chunk_rows=chunk_rows,
    )
    with (
        refit.keep_artifact_if_committed(session_factory, trained),
        session_factory() as session,
    ):
        version, pruned = commit_refit(
            session, trained, job_id=None, actor=actor, max_attempts=max_attempts,
            keep_versions=keep_versions, backoff_seconds=0.0, follow_up=follow_up_updates,
        )
        session.commit()
    retention.delete_artifacts(artifact_dir, pruned)
    return version


def refit_progress(version: ModelVersion, last: dict[str, Any]) -> dict[str, Any]:
    """A finished refit's final progress: the last epoch's numbers and what was decided."""
    decision = version.metrics.get("champion_challenger", {})
    activated = version.status == "active"
    return {
        **last,
        "stage": "done",
        "activated": activated,
        "message": f"version {version.version} "
        + ("activated" if activated else "kept ready")
        + (f": {decision['reason']}" if decision else ""),
        "champion_challenger": decision or None,
    }


def epoch_progress(record: dict[str, Any], max_epochs: int | None) -> dict[str, Any]:
    """A training record as job progress: ``{"stage": "training", "message": "epoch 7/50",
    "epoch": 7, "max_epochs": 50, "train_loss": …, "val_loss": …, "val_metric": …}``."""
    epoch = int(record.get("epoch", 0))
    progress: dict[str, Any] = {
        "stage": "training",
        "message": f"epoch {epoch}/{max_epochs}" if max_epochs else f"epoch {epoch}",
        "epoch": epoch,
        "max_epochs": max_epochs,
    }
    for key in ("train_loss", "val_loss", "val_metric"):
        value = record.get(key)
        if isinstance(value, int | float):
            progress[key] = round(float(value), 6)
    return progress


RUNNERS: dict[str, Callable[[JobContext, Claim], JobResult]] = {
    "refit": run_refit,
    "user_update": run_user_update,
}
