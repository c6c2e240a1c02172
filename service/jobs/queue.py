"""The job queue on the ``jobs`` table (procrastinate-style).

A job moves queued → running → succeeded | failed. Claiming is one statement: the oldest due
queued job is picked ``FOR UPDATE SKIP LOCKED`` (PostgreSQL; SQLite serialises writers and
ignores the clause), marked running with its attempt number bumped, and returned. The attempt
number then identifies the claim: every later write of the worker (heartbeat, progress, finish)
matches on ``(id, attempts, status = 'running')``, so a worker that lost its job (declared dead
and requeued) can no longer change it.

Coalescing: ``coalesce_key`` (``refit:<model>`` or ``user_update:<model>:<user>``) is unique
among *queued* jobs (a partial unique index), so "at most one pending per model (and user)" is
the database's job, and a job that is already running does not absorb new work.

All functions flush or execute but never commit: the caller commits once.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

from sqlalchemy import and_, exists, func, select, text, update
from sqlalchemy.orm import Session, aliased

from service.storage.store import dialect_insert
from service.storage.tables import Job, utcnow

JobKind = Literal["refit", "user_update"]


@dataclass(frozen=True)
class RetryPolicy:
    """How often a failed job is retried, and how long to wait before each retry.

    ``delay(attempt)`` is ``base_delay · factor^(attempt - 1)``, capped at ``max_delay``.
    """

    max_attempts: int = 3
    base_delay: float = 5.0
    factor: float = 2.0
    max_delay: float = 600.0

    def delay(self, attempt: int) -> float:
        """Seconds to wait after the ``attempt``-th attempt failed."""
        return min(self.max_delay, self.base_delay * self.factor ** max(0, attempt - 1))

    def should_retry(self, attempts: int, max_attempts: int | None = None) -> bool:
        """Whether a job that failed on attempt ``attempts`` gets another one."""
        return attempts < (max_attempts if max_attempts is not None else self.max_attempts)


PRIORITIES: dict[str, int] = {"refit": 0, "user_update": 10}
"""Lower runs first: a refit is never stuck behind thousands of queued user updates."""


def coalesce_key(kind: JobKind, model_id: int, user_id: int | None = None) -> str:
    """The key that makes pending jobs of one kind unique per model (and user)."""
    return f"refit:{model_id}" if kind == "refit" else f"user_update:{model_id}:{user_id}"


def _job_row(
    kind: JobKind, model_id: int, user_id: int | None, max_attempts: int, now: datetime
) -> dict[str, Any]:
    return {
        "kind": kind,
        "model_id": model_id,
        "user_id": user_id,
        "status": "queued",
        "priority": PRIORITIES[kind],
        "attempts": 0,
        "max_attempts": max_attempts,
        "coalesce_key": coalesce_key(kind, model_id, user_id),
        "run_after": now,
        "created_at": now,
    }


def enqueue_job(
    session: Session,
    *,
    kind: JobKind,
    model_id: int,
    user_id: int | None = None,
    max_attempts: int = 3,
    run_after: datetime | None = None,
) -> tuple[Job, bool]:
    """Queue a job unless an equivalent one is already queued.

    Returns ``(job, created)``: the new job, or the queued one it coalesced into.
    """
    if (kind == "user_update") != (user_id is not None):
        raise ValueError("a user_update job needs a user_id, a refit job must not have one")
    now = utcnow()
    row = _job_row(kind, model_id, user_id, max_attempts, now)
    if run_after is not None:
        row["run_after"] = run_after
    statement = (
        dialect_insert(session, Job.__table__)
        .values(**row)
        .on_conflict_do_nothing(
            index_elements=["coalesce_key"], index_where=text("status = 'queued'")
        )
        .returning(Job.__table__.c.id)
    )
    new_id = session.execute(statement).scalar()
    if new_id is not None:
        job = session.get(Job, new_id)
        assert job is not None
        return job, True
    existing = session.scalar(
        select(Job).where(Job.coalesce_key == row["coalesce_key"], Job.status == "queued")
    )
    if existing is None:  # the queued one was claimed in between: queue a fresh one
        return enqueue_job(
            session,
            kind=kind,
            model_id=model_id,
            user_id=user_id,
            max_attempts=max_attempts,
            run_after=run_after,
        )
    return existing, False


def enqueue_user_updates(
    session: Session, *, model_id: int, user_ids: Iterable[int], max_attempts: int = 3
) -> int:
    """Queue one coalesced ``user_update`` per user in ONE statement; returns how many were new.

    Users are inserted in id order, so concurrent ingests touching the same users wait on each
    other's index entries in the same order and cannot deadlock.
    """
    wanted = sorted(set(user_ids))
    if not wanted:
        return 0
    now = utcnow()
    statement = (
        dialect_insert(session, Job.__table__)
        .on_conflict_do_nothing(
            index_elements=["coalesce_key"], index_where=text("status = 'queued'")
        )
        .returning(Job.__table__.c.id)
    )
    rows = [_job_row("user_update", model_id, u, max_attempts, now) for u in wanted]
    return len(session.execute(statement, rows).scalars().all())


def fetch_job(session: Session, *, kinds: Iterable[str] | None = None) -> Job | None:
    """Claim the most urgent due queued job in one statement, or None if there is none.

    Order: priority (refits before user updates), then the oldest due. A job whose twin (same
    coalesce key: the same model, or the same model and user) is running is skipped, so two
    updates of one user never run at once — the queued one supersedes anything older and runs
    after the running one finished.

    ``UPDATE … WHERE id = (SELECT id … FOR UPDATE SKIP LOCKED LIMIT 1) RETURNING …``: concurrent
    workers on PostgreSQL skip each other's candidate rows instead of waiting on them, and no
    job is ever claimed twice. The caller commits right away (that publishes the claim).
    """
    now = utcnow()
    running = aliased(Job)
    candidate = select(Job.id).where(
        Job.status == "queued",
        Job.run_after <= now,
        ~exists().where(running.coalesce_key == Job.coalesce_key, running.status == "running"),
    )
    if kinds is not None:
        candidate = candidate.where(Job.kind.in_(list(kinds)))
    candidate = candidate.order_by(Job.priority, Job.run_after, Job.id).limit(1).with_for_update(
        skip_locked=True
    )
    statement = (
        update(Job)
        .where(Job.id == candidate.scalar_subquery(), Job.status == "queued")
        .values(
            status="running",
            attempts=Job.attempts + 1,
            started_at=now,
            heartbeat_at=now,
            finished_at=None,
        )
        .returning(Job)
        .execution_options(synchronize_session=False)
    )
    job = session.execute(statement).scalar()
    if job is not None:
        session.refresh(job)  # the identity map may hold an older copy of the row
    return job


def _claimed(job_id: int, attempt: int) -> Any:
    return and_(Job.id == job_id, Job.attempts == attempt, Job.status == "running")


def update_heartbeat(
    session: Session, *, job_id: int, attempt: int, progress: dict[str, Any] | None = None
) -> bool:
    """Refresh a running job's heartbeat (and progress); False if the claim was lost."""
    values: dict[str, Any] = {"heartbeat_at": utcnow()}
    if progress is not None:
        values["progress"] = progress
    result = session.execute(
        update(Job)
        .where(_claimed(job_id, attempt))
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    return result.rowcount == 1  # type: ignore[attr-defined]


def finish_job(
    session: Session,
    *,
    job_id: int,
    attempt: int,
    status: Literal["succeeded", "failed"],
    progress: dict[str, Any] | None = None,
    result_version: int | None = None,
    error: str | None = None,
) -> bool:
    """Mark a claimed job succeeded or failed; False if the claim was lost (nothing written).

    Job runners call this inside the transaction that writes their result, so "the result
    exists" and "the job succeeded" commit together.
    """
    values: dict[str, Any] = {
        "status": status,
        "finished_at": utcnow(),
        "error": error,
        "result_version": result_version,
    }
    if progress is not None:
        values["progress"] = progress
    result = session.execute(
        update(Job)
        .where(_claimed(job_id, attempt))
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    return result.rowcount == 1  # type: ignore[attr-defined]


def retry_job(
    session: Session, *, job_id: int, attempt: int, error: str, delay_seconds: float
) -> bool:
    """Put a claimed job that failed back in the queue after ``delay_seconds``.

    If an equivalent job was queued meanwhile (coalescing), this one is failed as superseded
    instead: the queued one does the same work. False if the claim was lost.
    """
    if _has_queued_twin(session, job_id):
        return finish_job(
            session, job_id=job_id, attempt=attempt, status="failed",
            error=f"{error} (not retried: an equivalent job is queued)",
        )
    result = session.execute(
        update(Job)
        .where(_claimed(job_id, attempt))
        .values(
            status="queued",
            error=error,
            heartbeat_at=None,
            run_after=utcnow() + timedelta(seconds=delay_seconds),
        )
        .execution_options(synchronize_session=False)
    )
    return result.rowcount == 1  # type: ignore[attr-defined]


def _has_queued_twin(session: Session, job_id: int) -> bool:
    twin = aliased(Job)
    return bool(
        session.scalar(
            select(
                exists().where(
                    twin.coalesce_key == select(Job.coalesce_key)
                    .where(Job.id == job_id)
                    .scalar_subquery(),
                    twin.status == "queued",
                    twin.id != job_id,
                )
            )
        )
    )


@dataclass(frozen=True)
class StalledOutcome:
    """What :func:`requeue_stalled_jobs` did: job ids requeued and job ids failed."""

    requeued: list[int]
    failed: list[int]


def requeue_stalled_jobs(
    session: Session, *, stale_seconds: float, retry: RetryPolicy | None = None
) -> StalledOutcome:
    """Requeue running jobs whose heartbeat is older than ``stale_seconds`` (dead workers).

    A job on its last attempt, or with an equivalent job already queued, is failed instead.
    Rows are locked ``FOR UPDATE SKIP LOCKED``, so two workers doing this at once split the work.
    """
    cutoff = utcnow() - timedelta(seconds=stale_seconds)
    stalled = session.scalars(
        select(Job)
        .where(Job.status == "running", Job.heartbeat_at < cutoff)
        .order_by(Job.id)
        .with_for_update(skip_locked=True)
    ).all()
    requeued: list[int] = []
    failed: list[int] = []
    for job in stalled:
        reason = f"worker lost (no heartbeat since {job.heartbeat_at:%Y-%m-%dT%H:%M:%SZ})"
        policy = retry or RetryPolicy(max_attempts=job.max_attempts)
        if policy.should_retry(job.attempts, job.max_attempts) and not _has_queued_twin(
            session, job.id
        ):
            job.status, job.error, job.heartbeat_at = "queued", reason, None
            job.run_after = utcnow()
            requeued.append(job.id)
        else:
            job.status, job.error, job.finished_at = "failed", reason, utcnow()
            failed.append(job.id)
    session.flush()
    return StalledOutcome(requeued=requeued, failed=failed)


def queue_depth(session: Session) -> dict[tuple[str, str], int]:
    """Number of jobs per ``(kind, status)`` (for metrics and the CLI)."""
    rows = session.execute(
        select(Job.kind, Job.status, func.count()).group_by(Job.kind, Job.status)
    )
    return {(kind, status): int(n) for kind, status, n in rows}


def pending_refit(session: Session, *, model_id: int) -> bool:
    """Whether the model has a refit queued or running."""
    return bool(
        session.scalar(
            select(
                exists().where(
                    Job.model_id == model_id,
                    Job.kind == "refit",
                    Job.status.in_(("queued", "running")),
                )
            )
        )
    )
