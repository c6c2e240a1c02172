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


# ------------------------------------------------------------------ invalid keys cost little


def key_look_ups(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every database look-up of a key prefix, recorded."""
    from service.api import guard

    seen: list[str] = []
    original = guard.store.get_api_key

    def spy(session, *, prefix):  # type: ignore[no-untyped-def]
        seen.append(prefix)
        return original(session, prefix=prefix)

    monkeypatch.setattr(guard.store, "get_api_key", spy)
    return seen


def test_a_repeated_bad_key_is_looked_up_once_per_cache_period(
    settings: Settings, auth: Callable, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = key_look_ups(monkeypatch)
    cached = settings.model_copy(update={"auth_cache_seconds": 60.0})
    with TestClient(create_app(cached)) as client:
        bad = {"Authorization": "Bearer nme_0123456789ab_" + "x" * 40}
        for _ in range(50):
            response = client.get("/v1/models", headers=bad)
            assert response.status_code == 401
            assert response.json()["detail"] == "invalid API key"
        assert len(seen) == 1
        assert client.get("/v1/models", headers=auth("predict")).status_code == 200


def test_spraying_random_keys_gets_429_without_database_look_ups(
    settings: Settings, auth: Callable, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = key_look_ups(monkeypatch)
    limits = {"failed_keys": {"rate": 0.001, "burst": 5}}
    cached = settings.model_copy(update={"auth_cache_seconds": 60.0})
    with limited_client(cached, limits) as client:
        # keys verified before the spray stay usable during it (cached)
        assert client.get("/v1/models", headers=auth("predict")).status_code == 200
        assert client.get("/v1/models", headers=auth("admin")).status_code == 200
        before = len(seen)
        statuses = []
        for i in range(30):
            header = {"Authorization": f"Bearer nme_{i:012x}_" + "y" * 40}
            statuses.append(client.get("/v1/models", headers=header).status_code)
        assert statuses[:5] == [401] * 5 and set(statuses[5:]) == {429}
        assert len(seen) - before == 5  # the refused ones cost no query
        refused = client.get("/v1/models", headers={"Authorization": "Bearer nme_ffffffffffff_z"})
        assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
        assert client.get("/v1/models", headers=auth("predict")).status_code == 200
        # a key this process has not verified yet waits too: the limit is per address
        assert client.get("/v1/models", headers=auth("ingest")).status_code == 429
        text = client.get("/metrics", headers=auth("admin")).text
        assert 'nme_rate_limited_total{key="(invalid keys)",scope="failed_keys"}' in text


def test_failed_key_limit_can_be_switched_off(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    with limited_client(settings, {"failed_keys": None}) as client:
        for i in range(40):
            header = {"Authorization": f"Bearer nme_{i:012x}_" + "y" * 40}
            assert client.get("/v1/models", headers=header).status_code == 401
