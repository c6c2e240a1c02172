"""The worker process: claim a job, run it with a heartbeat, persist its outcome; repeat.

Lifecycle (``nme-service worker``):

- at start, and every ``NME_REFIT_CHECK_SECONDS``: requeue jobs of dead workers (stale
  heartbeat) and check the refit triggers; at start and every ``NME_MAINTENANCE_SECONDS``:
  retention (old versions, finished jobs, events, orphaned artifacts);
- claim the oldest due job (``fetch_job``: ``FOR UPDATE SKIP LOCKED`` on PostgreSQL) and commit
  the claim; a heartbeat thread refreshes ``heartbeat_at`` and writes the latest progress every
  ``NME_JOB_HEARTBEAT_SECONDS``;
- the job's result and its ``succeeded`` status commit in one transaction; an error retries it
  with back-off (``RetryPolicy``) until ``max_attempts``; errors that a retry cannot fix (a
  model without labels, a deleted model) fail it at once;
- SIGTERM/SIGINT: finish the running job, then exit (drain); a SIGKILL loses nothing but time:
  the job is requeued by the next worker once its heartbeat is stale;
- a database outage does not end the process: it logs once, retries with back-off (1 s
  doubling to 30 s) on fresh connections, and logs once more when the database is back.

On SQLite run one worker (writers are serialised and SKIP LOCKED does not exist there).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import DisconnectionError, InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from service.config import Settings
from service.db import make_engine, make_session_factory
from service.errors import ServiceError, public_message
from service.jobs import queue
from service.jobs.tasks import RUNNERS, Claim, JobContext, JobLost
from service.jobs.triggers import check_refit_triggers
from service.learning import history
from service.learning.serving import Predictor
from service.storage import retention
from service.storage.tables import Job, Model, utcnow

log = logging.getLogger("service.worker")

DATABASE_ERRORS = (OperationalError, InterfaceError, DisconnectionError)
"""What a database outage raises (connection refused, terminated, timed out)."""
OUTAGE_FIRST_WAIT = 1.0
OUTAGE_MAX_WAIT = 30.0
"""Back-off between reconnection attempts while the database is unreachable (seconds)."""



def reap_stalled_jobs(
    session: Session, *, stale_seconds: float, backoff_seconds: float
) -> queue.StalledOutcome:
    """Requeue the jobs of dead workers (:func:`service.jobs.queue.requeue_stalled_jobs`), and
    treat a refit that has now failed for good that way like any other permanent refit
    failure: a ``refit_failed`` event and back-off. Without it, a refit that kills its worker
    every time (out of memory, say) would be failed, re-triggered by the same labels, and
    kill workers again, forever. Flushes; the caller commits."""
    stalled = queue.requeue_stalled_jobs(session, stale_seconds=stale_seconds)
    for job_id in stalled.failed:
        job = session.get(Job, job_id)
        if job is None or job.kind != "refit":
            continue
        history.record_refit_failure(
            session, model_id=job.model_id, job_id=job.id,
            message=f"its worker died on each of {job.attempts} attempts ({job.error})",
            attempted_at=job.started_at or utcnow(), backoff_seconds=backoff_seconds,
        )
    return stalled


class Heartbeat:
    """A thread refreshing a claimed job's heartbeat and progress until stopped.

    ``lost`` is set when a heartbeat finds the claim gone; the training callback then aborts.
    """

    def __init__(
        self,
        session_factory: sessionmaker[Session],
        claim: Claim,
        interval: float,
        alive_file: Path | None,
    ) -> None:
        self._session_factory = session_factory
        self._claim = claim
        self._interval = interval
        self._alive_file = alive_file
        self._stop = threading.Event()
        self._progress: dict[str, Any] | None = None
        self._written: dict[str, Any] | None = None
        self.lost = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"heartbeat-{claim.job_id}", daemon=True
        )

    def set_progress(self, progress: dict[str, Any]) -> None:
        """Remember the latest progress (written with the next beat)."""
        self._progress = progress

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.beat()

    def beat(self) -> None:
        """One heartbeat (errors are logged; the next beat tries again)."""
        progress = self._progress
        try:
            with self._session_factory() as session:
                owned = queue.update_heartbeat(
                    session,
                    job_id=self._claim.job_id,
                    attempt=self._claim.attempt,
                    progress=progress if progress is not self._written else None,
                )
                session.commit()
            self._written = progress
            touch(self._alive_file)
            if not owned:
                self.lost.set()
        except Exception:  # a database hiccup must not kill the job
            log.exception("heartbeat failed", extra={"job": self._claim.job_id,
                                                     "action": "heartbeat"})


def touch(path: Path | None) -> None:
    """Update a liveness file's mtime (container health checks read it)."""
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()


class Worker:
    """Claims and runs jobs until stopped (SIGTERM drains) or, in burst mode, until idle."""

    def __init__(self, settings: Settings, *, name: str | None = None) -> None:
        self.settings = settings
        self.name = name or f"{socket.gethostname()}:{os.getpid()}"
        self.retry = queue.RetryPolicy(
            max_attempts=settings.job_max_attempts, base_delay=settings.job_retry_delay_seconds
        )
        self.engine = make_engine(settings.sqlalchemy_url)
        self.session_factory = make_session_factory(self.engine)
        self.predictor = Predictor(artifact_dir=settings.artifact_dir, device=settings.device)
        self.stopping = threading.Event()
        self._next_check = 0.0
        self._next_housekeeping = 0.0
        self._database_down_since: float | None = None

    def close(self) -> None:
        """Release the database connections."""
        self.engine.dispose()

    def install_signal_handlers(self) -> None:
        """SIGTERM and SIGINT stop the loop after the running job (drain)."""

        def stop(signum: int, _frame: object) -> None:
            log.info("stopping after the current job", extra={"action": "drain",
                                                              "signal": signum})
            self.stopping.set()

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)

    # ------------------------------------------------------------------------------ loop

    def run(self, *, burst: bool = False, max_jobs: int | None = None) -> int:
        """Run jobs; returns how many ran. ``burst``: return once no job is due."""
        log.info("worker started", extra={"action": "worker_start", "worker": self.name})
        done = 0
        outage_wait = 0.0
        while not self.stopping.is_set():
            try:
                self.maintain()
                claim = self.claim()
            except DATABASE_ERRORS as err:
                outage_wait = min(OUTAGE_MAX_WAIT, max(OUTAGE_FIRST_WAIT, 2 * outage_wait))
                self._database_down(err, outage_wait)
                self.stopping.wait(outage_wait)
                continue
            outage_wait = 0.0
            self._database_up()
            if claim is None:
                if burst:
                    break
                touch(self.settings.worker_alive_file)
                self.stopping.wait(self.settings.job_poll_seconds)
                continue
            self.run_job(claim)
            done += 1
            if max_jobs is not None and done >= max_jobs:
                break
        log.info("worker stopped", extra={"action": "worker_stop", "worker": self.name,
                                          "jobs": done})
        return done

    def _database_down(self, err: Exception, wait: float) -> None:
        # One log line per state change, not one per poll.
        if self._database_down_since is None:
            self._database_down_since = time.monotonic()
            log.error(
                f"database unreachable ({type(err).__name__}); retrying with back-off",
                extra={"action": "database_down", "worker": self.name},
            )
        self.engine.dispose()  # drop pooled connections the outage broke
        log.debug(f"database still unreachable; next try in {wait:.0f} s")

    def _database_up(self) -> None:
        if self._database_down_since is not None:
            seconds = time.monotonic() - self._database_down_since
            self._database_down_since = None
            log.warning(
                f"database reachable again after {seconds:.0f} s",
                extra={"action": "database_up", "worker": self.name},
            )

    def maintain(self, *, force: bool = False) -> None:
        """Requeue stalled jobs and check refit triggers, at most every refit_check_seconds;
        housekeeping (retention, orphaned artifacts) at most every maintenance_seconds.

        Raises the database's connection errors (the run loop backs off); anything else is
        logged and tried again next time."""
        now = time.monotonic()
        if not force and now < self._next_check:
            return
        self._next_check = now + self.settings.refit_check_seconds
        if force or now >= self._next_housekeeping:
            self._next_housekeeping = now + self.settings.maintenance_seconds
            self.housekeeping()
        try:
            with self.session_factory() as session:
                stalled = reap_stalled_jobs(
                    session, stale_seconds=self.settings.job_stale_seconds,
                    backoff_seconds=self.settings.refit_backoff_seconds,
                )
                session.commit()
            for job_id in stalled.requeued:
                log.warning("requeued a job of a dead worker",
                            extra={"job": job_id, "action": "requeue"})
            for job_id in stalled.failed:
                log.error("failed a job of a dead worker (no attempts left)",
                          extra={"job": job_id, "action": "fail"})
            with self.session_factory() as session:
                triggered = check_refit_triggers(
                    session,
                    min_new_labels=self.settings.refit_min_new_labels,
                    max_age_seconds=self.settings.refit_max_age_seconds,
                    max_attempts=self.settings.job_max_attempts,
                )
                session.commit()
            for item in triggered:
                log.info("refit queued: " + item.reason,
                         extra={"job": item.job_id, "action": "trigger", "model": item.model})
        except DATABASE_ERRORS:
            self._next_check = 0.0
            raise
        except Exception:  # e.g. a race with a concurrent enqueue: try again next time
            log.exception("maintenance failed", extra={"action": "maintain"})

    def housekeeping(self) -> None:
        """Retention: old versions beyond NME_KEEP_VERSIONS, finished jobs and events beyond
        NME_JOB_RETENTION_SECONDS, and artifact directories no version references."""
        settings = self.settings
        try:
            pruned: list[str] = []
            with self.session_factory() as session:
                for model_id in session.scalars(select(Model.id)):
                    pruned += retention.prune_versions(
                        session, model_id=model_id, keep=settings.keep_versions
                    )
                cutoff = utcnow() - timedelta(seconds=settings.job_retention_seconds)
                jobs, events = retention.prune_finished(session, older_than=cutoff)
                session.commit()
            retention.delete_artifacts(settings.artifact_dir, pruned)
            with self.session_factory() as session:
                orphans = retention.collect_orphans(
                    session, artifact_dir=settings.artifact_dir,
                    grace_seconds=settings.artifact_grace_seconds,
                )
            if pruned or jobs or events or orphans:
                log.info(
                    f"housekeeping: {len(pruned)} old versions, {jobs} finished jobs, {events} "
                    f"events and {len(orphans)} orphaned artifact directories deleted",
                    extra={"action": "housekeeping", "worker": self.name},
                )
        except DATABASE_ERRORS:
            self._next_housekeeping = 0.0
            raise
        except Exception:
            log.exception("housekeeping failed", extra={"action": "housekeeping"})

    def claim(self) -> Claim | None:
        """Claim the next due job and commit the claim."""
        with self.session_factory() as session:
            job = queue.fetch_job(session)
            if job is None:
                session.rollback()
                return None
            claim = Claim(job.id, job.attempts, job.kind, job.model_id, job.user_id,
                          job.max_attempts)
            session.commit()
        return claim

    # ------------------------------------------------------------------------------ one job

    def run_job(self, claim: Claim) -> str:
        """Run a claimed job and persist its outcome; returns the final status."""
        extra = {"job": claim.job_id, "kind": claim.kind, "attempt": claim.attempt,
                 "worker": self.name}
        log.info(f"{claim.kind} started", extra={**extra, "action": "start"})
        started = time.perf_counter()
        with Heartbeat(
            self.session_factory, claim, self.settings.job_heartbeat_seconds,
            self.settings.worker_alive_file,
        ) as heartbeat:

            def progress(update: dict[str, Any]) -> None:
                if heartbeat.lost.is_set():
                    raise JobLost(f"job {claim.job_id} was taken from this worker")
                heartbeat.set_progress(update)
                log.info(update.get("message", "progress"),
                         extra={**extra, "action": "progress", "progress": update})

            context = JobContext(
                session_factory=self.session_factory,
                predictor=self.predictor,
                artifact_dir=self.settings.artifact_dir,
                device=self.settings.device,
                max_attempts=self.settings.job_max_attempts,
                progress=progress,
                keep_versions=self.settings.keep_versions,
                refit_backoff_seconds=self.settings.refit_backoff_seconds,
                refit_chunk_rows=self.settings.refit_chunk_rows,
            )
            attempted_at = utcnow()
            try:
                result = RUNNERS[claim.kind](context, claim)
            except JobLost as err:
                log.warning(str(err), extra={**extra, "action": "lost"})
                return "lost"
            except Exception as err:
                return self._failed(
                    claim, err, extra, time.perf_counter() - started, attempted_at
                )
        seconds = round(time.perf_counter() - started, 3)
        log.info(result.progress.get("message", "done"),
                 extra={**extra, "action": "succeeded", "seconds": seconds,
                        "result_version": result.result_version})
        return "succeeded"

    def _failed(
        self, claim: Claim, err: Exception, extra: dict, seconds: float, attempted_at: datetime
    ) -> str:
        # The job row and the event log get a stable human message; the traceback (which may
        # quote SQL or data) goes to this process's log only.
        message = public_message(err)
        permanent = isinstance(err, ServiceError)  # a retry cannot fix bad data
        log.log(
            logging.ERROR if permanent else logging.WARNING,
            f"{claim.kind} failed: {type(err).__name__}: {err}",
            exc_info=not permanent,
            extra={**extra, "action": "error", "seconds": round(seconds, 3)},
        )
        try:
            with self.session_factory() as session:
                if not permanent and self.retry.should_retry(claim.attempt, claim.max_attempts):
                    delay = self.retry.delay(claim.attempt)
                    queue.retry_job(session, job_id=claim.job_id, attempt=claim.attempt,
                                    error=message, delay_seconds=delay)
                    status, action = "queued", "retry"
                else:
                    owned = queue.finish_job(session, job_id=claim.job_id, attempt=claim.attempt,
                                             status="failed", error=message)
                    if owned and claim.kind == "refit":
                        history.record_refit_failure(
                            session, model_id=claim.model_id, job_id=claim.job_id,
                            message=message, attempted_at=attempted_at,
                            backoff_seconds=self.settings.refit_backoff_seconds,
                        )
                    status, action = "failed", "fail"
                session.commit()
        except DATABASE_ERRORS:
            # The claim stays `running`; once its heartbeat is stale a worker requeues it.
            log.error("could not record the job's outcome: database unreachable",
                      extra={**extra, "action": "outcome_lost"})
            return "unrecorded"
        log.log(
            logging.WARNING if status == "queued" else logging.ERROR,
            message,
            extra={**extra, "action": action, "seconds": round(seconds, 3)},
        )
        return status


def run_worker(settings: Settings, *, burst: bool = False, name: str | None = None) -> int:
    """Build a worker for ``settings`` and run it (the CLI entry); returns jobs run."""
    worker = Worker(settings, name=name)
    try:
        return worker.run(burst=burst)
    finally:
        worker.close()
