"""Model artifacts: a directory with ``weights.safetensors`` and ``config.json``.

Artifacts are written to a temporary sibling directory and renamed into place, so a reader never
sees a half-written one. ``config.json`` carries ``schema_version``; readers refuse versions they
do not know with a clear :class:`ArtifactError`.

Versions: 1 — θ̄, normalisation, σ², Σ, θⁱ (optional), person ids, history. 2 (written now) adds
the persons' posterior variances (``effects_variance``, beside ``effects``), ``n_iter`` and
``converged``, and the constructor's newer parameters (``e_step``, ``tol``,
``n_iter_no_change``). Version 1 still loads: the missing parameters take their defaults and
every person's posterior variance is the prior Σ.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "weights.safetensors"


class ArtifactError(ValueError):
    """The artifact is missing, corrupt, of another schema version, or does not fit its config."""


def write_artifact(path: str | os.PathLike, config: dict, tensors: dict[str, torch.Tensor]) -> Path:
    """Write ``config`` and ``tensors`` atomically to directory ``path``.

    An existing artifact at ``path`` is replaced; any other non-empty directory is refused, so
    a mistyped path never wipes unrelated files.
    """
    path = Path(path)
    if path.exists() and not (path / CONFIG_FILE).is_file():
        if not path.is_dir() or any(path.iterdir()):
            raise ArtifactError(f"refusing to overwrite {path}: it exists and is not an artifact")
        path.rmdir()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        # safetensors refuses shared or non-contiguous storage
        save_file(
            {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()},
            str(tmp / WEIGHTS_FILE),
        )
        body = json.dumps({"schema_version": SCHEMA_VERSION, **config}, indent=2)
        (tmp / CONFIG_FILE).write_text(body + "\n")
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def read_artifact(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read an artifact directory; raises :class:`ArtifactError` with the reason."""
    path = Path(path)
    if not path.is_dir():
        raise ArtifactError(f"no model artifact at {path} (expected a directory)")
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (path / name).is_file():
            raise ArtifactError(f"artifact {path} is missing {name}")
    try:
        config = json.loads((path / CONFIG_FILE).read_text())
    except json.JSONDecodeError as err:
        raise ArtifactError(f"artifact {path}: {CONFIG_FILE} is not valid JSON ({err})") from err
    version = config.get("schema_version")
    if version not in READABLE_VERSIONS:
        raise ArtifactError(
            f"artifact {path} has schema version {version!r}; this nme reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}"
        )
    try:
        tensors = load_file(str(path / WEIGHTS_FILE))
    except Exception as err:  # safetensors raises its own error types
        raise ArtifactError(f"artifact {path}: cannot read {WEIGHTS_FILE} ({err})") from err
    return config, tensors


def artifact_sha256(path: str | os.PathLike) -> str:
    """sha256 over the artifact's files (names and contents, in name order)."""
    digest = hashlib.sha256()
    for file in sorted(Path(path).iterdir()):
        if file.is_file():
            digest.update(file.name.encode())
            digest.update(file.read_bytes())
    return digest.hexdigest()
