"""Bounded storage: old versions (with their θⁱ rows and artifacts), orphaned artifacts, stale
temporary directories, finished job rows and old events are deleted, never kept forever.

- :func:`prune_versions` keeps a model's active version and its newest ``keep`` others; it
  deletes older version rows (θⁱ rows cascade) in the caller's transaction, records a
  ``pruned`` event each, and returns their artifact paths: the caller deletes those files only
  after its commit succeeded (:func:`delete_artifacts`), so a rolled-back prune loses nothing.
- :func:`collect_orphans` deletes artifact directories that no version row references and that
  are older than a grace period (a refit between writing its artifact and committing its
  version must not lose it), and ``.tmp-*`` directories older than the same grace period.
- :func:`prune_finished` deletes succeeded and failed job rows, and events, older than a cutoff.
"""

from __future__ import annotations

import shutil
import time
from datetime import datetime
from pathlib import Path

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from service.storage import events
from service.storage.tables import Job, ModelVersion


def prune_versions(
    session: Session, *, model_id: int, keep: int, job_id: int | None = None
) -> list[str]:
    """Delete versions beyond the active one and the newest ``keep`` others (flushes).

    Returns the deleted versions' artifact paths (relative to the artifact directory).
    """
    versions = session.scalars(
        select(ModelVersion)
        .where(ModelVersion.model_id == model_id)
        .order_by(ModelVersion.version.desc())
    ).all()
    others = [v for v in versions if v.status != "active"]
    doomed = others[keep:]
    for version in doomed:
        events.add_event(
            session, model_id=model_id, kind="pruned", version=version.version, job_id=job_id,
            detail=f"version {version.version} deleted with its θⁱ rows and artifact "
            f"(retention keeps the active version and the newest {keep} others)",
        )
    if doomed:
        session.execute(
            delete(ModelVersion).where(ModelVersion.id.in_([v.id for v in doomed]))
        )
        for version in doomed:
            session.expunge(version)
        session.flush()
    return [v.artifact_path for v in doomed]


def delete_artifacts(artifact_dir: Path, relative_paths: list[str]) -> None:
    """Delete artifact directories whose version rows are gone (best effort)."""
    for relative in relative_paths:
        shutil.rmtree(artifact_dir / relative, ignore_errors=True)


def collect_orphans(session: Session, *, artifact_dir: Path, grace_seconds: float) -> list[str]:
    """Delete artifact and ``.tmp-*`` directories no version references, once they are older
    than ``grace_seconds``; returns what was deleted (relative paths)."""
    if not artifact_dir.is_dir():
        return []
    referenced = set(session.scalars(select(ModelVersion.artifact_path)))
    cutoff = time.time() - grace_seconds
    removed = []
    for model_dir in sorted(p for p in artifact_dir.iterdir() if p.is_dir()):
        for entry in sorted(p for p in model_dir.iterdir() if p.is_dir()):
            relative = f"{model_dir.name}/{entry.name}"
            if relative in referenced:
                continue
            try:
                old = entry.stat().st_mtime < cutoff
            except FileNotFoundError:
                continue
            if old:
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(relative)
    return removed


def prune_finished(session: Session, *, older_than: datetime) -> tuple[int, int]:
    """Delete finished jobs and events older than ``older_than``; returns both counts."""
    jobs = session.execute(
        delete(Job).where(Job.status.in_(("succeeded", "failed")), Job.finished_at < older_than)
    )
    return int(jobs.rowcount or 0), events.prune_events(session, older_than=older_than)  # type: ignore[attr-defined]
