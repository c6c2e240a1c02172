"""Model-version artifacts on disk: atomic writes, content hashes, verified loads.

An artifact is a directory (``weights.safetensors`` + ``config.json``, written by the ``nme``
estimator). Paths in the database are relative to ``NME_ARTIFACT_DIR`` so the directory can be
mounted elsewhere (e.g. in a container).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from nme import load_estimator


class ArtifactCorrupt(RuntimeError):
    """The artifact on disk does not match the sha256 recorded for its version."""


def artifact_sha256(path: Path) -> str:
    """SHA-256 over the artifact's files (sorted relative names and contents)."""
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(file.relative_to(path).as_posix().encode() + b"\0")
        with file.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def write_artifact(estimator: Any, *, artifact_dir: Path, model_name: str) -> tuple[str, str]:
    """Save θ̄ (no θⁱ) under a temporary name, then rename it into place.

    A crash leaves at most a ``.tmp-*`` directory, never a half-written artifact under a real
    name. Returns ``(path relative to artifact_dir, sha256)``.
    """
    parent = artifact_dir / model_name
    parent.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    name = f"{stamp}-{uuid.uuid4().hex[:8]}"
    temporary = parent / f".tmp-{name}"
    try:
        estimator.save(temporary, include_effects=False)
        sha = artifact_sha256(temporary)
        _fsync_tree(temporary)
        os.rename(temporary, parent / name)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return f"{model_name}/{name}", sha


def remove_artifact(artifact_dir: Path, relative_path: str) -> None:
    """Delete an artifact whose version was never recorded (best effort)."""
    shutil.rmtree(artifact_dir / relative_path, ignore_errors=True)


def load_verified(artifact_dir: Path, relative_path: str, sha256: str, device: str) -> Any:
    """Load an artifact after checking its hash against the database's."""
    path = artifact_dir / relative_path
    if not path.is_dir():
        raise ArtifactCorrupt(f"artifact {path} is missing")
    actual = artifact_sha256(path)
    if actual != sha256:
        raise ArtifactCorrupt(f"artifact {path} has sha256 {actual}, expected {sha256}")
    return load_estimator(path, device=device)


def artifact_problem(artifact_dir: Path, relative_path: str, sha256: str) -> str | None:
    """Why an artifact cannot be served (missing, or another sha256), or None if it can."""
    path = artifact_dir / relative_path
    if not path.is_dir():
        return "its artifact is missing"
    if artifact_sha256(path) != sha256:
        return "its artifact does not match the recorded sha256"
    return None


def _fsync_tree(path: Path) -> None:
    # The rename is only a durable commit point if the files reached the disk first.
    for file in path.iterdir():
        with file.open("rb") as handle:
            os.fsync(handle.fileno())
