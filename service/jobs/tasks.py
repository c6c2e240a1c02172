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
from service.learning import refit
from service.learning.serving import Predictor
from service.learning.user_update import fit_user, write_user_fit
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
    result = JobResult(fit.outcome.as_dict(), fit.outcome.version)
    with context.session_factory() as session:
        write_user_fit(session, fit)
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
    )
    with refit.keep_artifact_if_committed(trained), context.session_factory() as session:
        version = record_with_follow_ups(session, trained, max_attempts=context.max_attempts)
        result = JobResult(refit_progress(version, last), version.version)
        _finish(session, claim, result)
        session.commit()
    return result


def record_with_follow_ups(
    session: Session, trained: refit.TrainedVersion, *, max_attempts: int, follow_up: bool = True
) -> ModelVersion:
    """Record a trained version and, when it becomes active (and ``follow_up``), queue a
    per-user update for every user whose labels changed while it trained, so those labels reach
    its θⁱ (flushes)."""
    version = refit.record_version(session, trained)
    if follow_up and version.status == "active":
        users = refit.users_to_follow_up(session, trained)
        enqueue_user_updates(
            session, model_id=trained.model.id, user_ids=users, max_attempts=max_attempts
        )
    return version


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
) -> ModelVersion:
    """A refit outside the worker (``nme-service refit``, the demo): train, then commit the
    version, its θⁱ rows and the follow-up user updates in one transaction."""
    trained = refit.train_version(
        session_factory, model_name=model_name, artifact_dir=artifact_dir, device=device,
        activate=activate, callback=callback,
    )
    with refit.keep_artifact_if_committed(trained), session_factory() as session:
        version = record_with_follow_ups(
            session, trained, max_attempts=max_attempts, follow_up=follow_up_updates
        )
        session.commit()
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
