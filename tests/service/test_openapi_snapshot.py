"""The wire contract, frozen: the app's OpenAPI document must equal the committed snapshot.

A change to a route, a schema, a status code or a description shows up here as a diff. When the
change is intended, regenerate the snapshot and commit it with the change that made it:

    NME_UPDATE_OPENAPI_SNAPSHOT=1 .venv/bin/python -m pytest tests/service/test_openapi_snapshot.py
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from service.app import create_app
from service.config import Settings

SNAPSHOT = Path(__file__).parent / "snapshots" / "openapi.json"


def _document() -> str:
    app = create_app(Settings(database_url="sqlite://", artifact_dir=Path("unused")))
    return json.dumps(app.openapi(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def test_openapi_document_matches_snapshot() -> None:
    document = _document()
    if os.environ.get("NME_UPDATE_OPENAPI_SNAPSHOT") == "1":
        SNAPSHOT.write_text(document, encoding="utf-8")
    assert SNAPSHOT.exists(), "no snapshot: run with NME_UPDATE_OPENAPI_SNAPSHOT=1 once"
    assert document == SNAPSHOT.read_text(encoding="utf-8"), (
        "the OpenAPI document changed; if intended, regenerate the snapshot (see module doc)"
    )
