"""Container files are kept correct by construction (no Docker engine here): parse and check."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_compose_defines_postgres_migrate_api_worker() -> None:
    services = compose()["services"]
    assert set(services) == {"postgres", "migrate", "api", "worker"}
    for name in ("postgres", "api", "worker"):
        assert "healthcheck" in services[name], name
        assert set(services[name]["healthcheck"]) >= {"test", "interval", "retries"}


def test_compose_startup_order() -> None:
    services = compose()["services"]
    assert services["migrate"]["command"] == ["nme-service", "migrate"]
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("api", "worker"):
        depends = services[name]["depends_on"]
        assert depends["migrate"]["condition"] == "service_completed_successfully"


def test_compose_services_share_the_database_and_artifacts() -> None:
    services = compose()["services"]
    urls = {services[n]["environment"]["NME_DATABASE_URL"] for n in ("migrate", "api", "worker")}
    assert len(urls) == 1 and urls.pop().startswith("postgresql://")
    volumes = [services[n]["volumes"] for n in ("api", "worker")]
    assert volumes[0] == volumes[1]
    assert set(compose()["volumes"]) >= {"pgdata", "artifacts"}


def test_dockerfile_is_cpu_by_default_with_a_cuda_build_arg() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^ARG BASE_IMAGE=python:3\.1\d-slim", text, re.M)
    assert re.search(r"^ARG TORCH_INDEX_URL=https://download\.pytorch\.org/whl/cpu", text, re.M)
    assert "HEALTHCHECK" in text
    assert re.search(r"^USER \w+", text, re.M)
    assert 'CMD ["nme-service", "serve"' in text


def test_dockerignore_keeps_local_state_out() -> None:
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", "var", ".git"} <= set(ignored)
