"""What each kind of job does. Both runners write their result and mark the job succeeded in
ONE transaction (through the pipelines' ``before_commit`` hooks), so a crash can never leave a
result without a finished job or a finished job without its result.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from service.errors import NotFound
from service.jobs.queue import finish_job
from service.predictor import Predictor
from service.refit import refit_model
from service.tables import Model, ModelVersion
from service.user_update import UserUpdateOutcome, update_user


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
    """Re-fit one user's θⁱ in the active version (see ``service.user_update``)."""
    assert claim.user_id is not None
    results: list[JobResult] = []

    def before_commit(session: Session, outcome: UserUpdateOutcome) -> None:
        results.append(JobResult(outcome.as_dict(), outcome.version))
        _finish(session, claim, results[0])

    update_user(
        context.session_factory,
        context.predictor,
        model_id=claim.model_id,
        user_id=claim.user_id,
        before_commit=before_commit,
    )
    return results[0]


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

    results: list[JobResult] = []

    def before_commit(session: Session, version: ModelVersion) -> None:
        decision = version.metrics.get("champion_challenger", {})
        activated = version.status == "active"
        progress = {
            **last,
            "stage": "done",
            "activated": activated,
            "message": f"version {version.version} "
            + ("activated" if activated else "kept ready")
            + (f": {decision['reason']}" if decision else ""),
            "champion_challenger": decision or None,
        }
        results.append(JobResult(progress, version.version))
        _finish(session, claim, results[0])

    refit_model(
        context.session_factory,
        model_name=name,
        artifact_dir=context.artifact_dir,
        device=context.device,
        activate="if_not_worse",
        callback=on_epoch,
        before_commit=before_commit,
        max_attempts=context.max_attempts,
    )
    return results[0]


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
