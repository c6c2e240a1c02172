"""/docs and /redoc work offline: their assets come from a package the service installs, the
pages reference no external URL, and they are open (as docs/service.md says)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.config import Settings

EXTERNAL = re.compile(r"""(?:src|href|url)\s*[=:(]\s*["']?(?:https?:)?//""", re.IGNORECASE)


@pytest.fixture
def offline_client() -> TestClient:
    """No database needed: the pages and assets never touch it."""
    return TestClient(create_app(Settings(database_url="sqlite://", artifact_dir=Path("unused"))))


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_pages_load_only_local_assets(offline_client: TestClient, page: str) -> None:
    response = offline_client.get(page)  # no key: the documentation is open
    assert response.status_code == 200
    html = response.text
    assert "http://" not in html and "https://" not in html
    assert not EXTERNAL.search(html)
    assets = re.findall(r"""(?:src|href)="([^"]+)\"""", html)
    assert assets, html
    for asset in assets:
        assert asset.startswith("/docs/assets/"), asset
        asset_response = offline_client.get(asset)
        assert asset_response.status_code == 200, asset
        assert len(asset_response.content) > 1000
    assert "/openapi.json" in html
    assert offline_client.get("/openapi.json").status_code == 200


def test_docs_can_be_switched_off() -> None:
    settings = Settings(database_url="sqlite://", artifact_dir=Path("unused"), api_docs=False)
    client = TestClient(create_app(settings))
    for path in ("/docs", "/redoc", "/openapi.json", "/docs/assets/swagger-ui.css"):
        assert client.get(path).status_code in (401, 404), path
