"""Background jobs: queue a refit or a per-user update, and watch them (all admin).

``POST /v1/models/{name}/refit`` is the shorthand for queueing a refit; it answers 202 at once
and a worker (``nme-service worker``) trains, then activates the new version only if it is not
worse than the active one. ``nme-service refit --model NAME`` still trains synchronously.
"""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, status
from sqlalchemy.orm import Session

from service.api.deps import AdminKey, JobId, ModelDep, SessionDep, SettingsDep
from service.api.paging import DEFAULT_LIMIT, Cursor, Limit, decode_cursor, split_page
from service.api.schemas import JobCreate, JobEnvelope, JobPublic, JobsPublic
from service.errors import Conflict, NotFound
from service.jobs.queue import enqueue_job
from service.storage import events, store
from service.storage.tables import Job, Model

router = APIRouter(prefix="/v1", tags=["jobs"])


def job_public(job: Job, model_name: str, user_external_id: str | None) -> JobPublic:
    """A job row as the API shows it."""
    return JobPublic(
        id=job.id,
        kind=job.kind,  # type: ignore[arg-type]
        model=model_name,
        user_id=user_external_id,
        status=job.status,  # type: ignore[arg-type]
        attempts=job.attempts,
        progress=job.progress,
        result_version=job.result_version,
        error=job.error,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
    )


def _enqueue(
    session: Session, model: Model, body: JobCreate, max_attempts: int, actor: str
) -> JobEnvelope:
    user_id = None
    if body.kind == "user_update":
        assert body.user_id is not None
        user = store.get_user(session, external_id=body.user_id)
        if user is None:
            raise NotFound(f"user {body.user_id!r} not found")
        user_id = user.id
    elif not store.has_labels(session, model_id=model.id):
        raise Conflict(f"model {model.name!r} has no labels to train on")
    job, created = enqueue_job(
        session, kind=body.kind, model_id=model.id, user_id=user_id, max_attempts=max_attempts
    )
    if created and body.kind == "refit":
        events.add_event(
            session, model_id=model.id, kind="refit_queued", job_id=job.id, actor=actor,
            detail="refit requested through the API",
        )
    session.commit()
    return JobEnvelope(job=job_public(job, model.name, body.user_id))


@router.post(
    "/models/{name}/jobs", status_code=status.HTTP_202_ACCEPTED, response_model=JobEnvelope
)
def create_job(
    key: AdminKey, model: ModelDep, body: JobCreate, session: SessionDep, settings: SettingsDep
) -> JobEnvelope:
    """Queue a job; an equivalent queued job (same model, kind and user) is returned instead of
    a duplicate. 404 for an unknown user, 409 for a refit of a model without labels."""
    return _enqueue(session, model, body, settings.job_max_attempts, f"key:{key.name}")


@router.post(
    "/models/{name}/refit", status_code=status.HTTP_202_ACCEPTED, response_model=JobEnvelope
)
def refit(
    key: AdminKey, model: ModelDep, session: SessionDep, settings: SettingsDep
) -> JobEnvelope:
    """Queue a refit (champion/challenger activation); poll ``GET /v1/jobs/{id}``."""
    return _enqueue(
        session, model, JobCreate(kind="refit"), settings.job_max_attempts, f"key:{key.name}"
    )


@router.get("/models/{name}/jobs", response_model=JobsPublic)
def list_jobs(
    _key: AdminKey,
    model: ModelDep,
    session: SessionDep,
    status: Literal["queued", "running", "succeeded", "failed"] | None = None,
    kind: Literal["refit", "user_update"] | None = None,
    limit: Limit = DEFAULT_LIMIT,
    cursor: Cursor = None,
) -> JobsPublic:
    """A model's jobs, newest first, optionally filtered by status and kind (paged: see
    `next_cursor`)."""
    before = decode_cursor(cursor, int)
    rows = store.job_rows(
        session, model_id=model.id, status=status, kind=kind, before_id=before, limit=limit + 1
    )
    page, following = split_page(rows, limit, key=lambda row: row[0].id)
    return JobsPublic(
        data=[job_public(job, name, user) for job, name, user in page],
        count=store.count_jobs(session, model_id=model.id, status=status, kind=kind),
        next_cursor=following,
    )


@router.get("/jobs/{job_id}", response_model=JobPublic)
def get_job(key: AdminKey, job_id: JobId, session: SessionDep) -> JobPublic:
    """One job's status, attempts, progress, result version and error (404 for a job of a
    model the key may not reach)."""
    rows = store.job_rows(session, job_id=job_id, limit=1)
    if not rows or not key.may_use(rows[0][1]):
        raise NotFound(f"job {job_id} not found")
    job, name, user = rows[0]
    return job_public(job, name, user)
