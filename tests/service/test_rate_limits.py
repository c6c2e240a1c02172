"""Rate limits per API key: token buckets per scope, overrides per key, 429 with Retry-After,
a Prometheus counter of refusals."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest
from fastapi.testclient import TestClient

from service.api.guard import Principal, RateLimiter
from service.app import create_app
from service.config import RateLimit, RateLimits, Settings


def limited_client(settings: Settings, limits: dict) -> TestClient:
    return TestClient(create_app(settings.model_copy(update={"rate_limits": RateLimits(**limits)})))


@pytest.fixture
def tight(settings: Settings) -> Iterator[TestClient]:
    """Three reads per key, then (practically) none; admin calls unlimited."""
    limits = {"scopes": {"read": {"rate": 0.001, "burst": 3}, "admin": None}}
    with limited_client(settings, limits) as client:
        yield client


def test_over_the_limit_is_429_with_retry_after(tight: TestClient, auth: Callable) -> None:
    for _ in range(3):
        assert tight.get("/v1/models", headers=auth("predict")).status_code == 200
    response = tight.get("/v1/models", headers=auth("predict"))
    assert response.status_code == 429
    assert int(response.headers["retry-after"]) >= 1
    assert "rate limit" in response.json()["detail"]
    # buckets are per key: another key still has its own three
    assert tight.get("/v1/models", headers=auth("ingest")).status_code == 200
    # and per scope: the predict key's predict bucket is untouched (404: no such model)
    assert tight.get("/v1/models/nope/users/u1", headers=auth("predict")).status_code == 404


def test_refusals_are_counted_in_prometheus(tight: TestClient, auth: Callable) -> None:
    for _ in range(5):
        tight.get("/v1/models", headers=auth("predict"))
    text = tight.get("/metrics", headers=auth("admin")).text
    assert 'nme_rate_limited_total{key="predict",scope="read"} 2.0' in text
    assert 'nme_http_requests_total{method="GET",route="/v1/models",status="429"} 2.0' in text


def test_anonymous_requests_never_spend_a_keys_tokens(tight: TestClient, auth: Callable) -> None:
    for _ in range(10):
        assert tight.get("/v1/models").status_code == 401
    assert tight.get("/v1/models", headers=auth("predict")).status_code == 200


def test_per_key_overrides_by_name_and_prefix(
    settings: Settings, auth: Callable, keys: dict
) -> None:
    prefix = keys["ingest"].split("_")[1]
    limits = {
        "scopes": {"read": {"rate": 0.001, "burst": 1}},
        "keys": {"predict": {"read": None}, prefix: {"read": {"rate": 0.001, "burst": 2}}},
    }
    with limited_client(settings, limits) as client:
        for _ in range(5):  # unlimited by name
            assert client.get("/v1/models", headers=auth("predict")).status_code == 200
        codes = [client.get("/v1/models", headers=auth("ingest")).status_code for _ in range(3)]
        assert codes == [200, 200, 429]  # two by its prefix
        codes = [client.get("/v1/models", headers=auth("admin")).status_code for _ in range(2)]
        assert codes == [200, 429]  # the scope's setting


def test_disabled_limits_never_refuse(settings: Settings, auth: Callable) -> None:
    limits = {"enabled": False, "scopes": {"read": {"rate": 0.001, "burst": 1}}}
    with limited_client(settings, limits) as client:
        for _ in range(5):
            assert client.get("/v1/models", headers=auth("predict")).status_code == 200


def test_bucket_refills_at_its_rate() -> None:
    limiter = RateLimiter(RateLimits(scopes={"predict": RateLimit(rate=20.0, burst=2)}))
    key = Principal(key_id=1, name="k", scopes=frozenset({"predict"}))
    assert limiter.acquire(key, "predict") is None
    assert limiter.acquire(key, "predict") is None
    wait = limiter.acquire(key, "predict")
    assert wait is not None and 0 < wait <= 0.05
    time.sleep(0.06)
    assert limiter.acquire(key, "predict") is None


def test_defaults_exist_for_every_scope() -> None:
    limits = RateLimits()
    for scope in ("predict", "ingest", "admin", "read"):
        assert limits.limit_for(scope, prefix="x", name="y") is not None


def test_rate_limits_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "NME_RATE_LIMITS", '{"scopes": {"predict": {"rate": 5, "burst": 7}}, "keys": {"b": {}}}'
    )
    limits = Settings().rate_limits
    assert limits.limit_for("predict", prefix="p", name="n") == RateLimit(rate=5, burst=7)
    assert limits.limit_for("ingest", prefix="p", name="n") is not None  # default kept
