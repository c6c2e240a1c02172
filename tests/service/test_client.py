"""``NMEClient`` / ``AsyncNMEClient``: end to end through the app, typed errors, retries."""

from __future__ import annotations

import asyncio
import email.utils
import time
from collections.abc import Callable

import httpx
import pytest
from fastapi.testclient import TestClient

from service.client import (
    AsyncNMEClient,
    Conflict,
    InvalidRequest,
    NMEClient,
    NotFound,
    Predictions,
    RetryPolicy,
    Unavailable,
    retry_after,
)
from tests.service.factories import features, model_payload, run_jobs, simulated_items

Auth = Callable[[str], dict[str, str]]
FAST = RetryPolicy(attempts=3, base=0.0, max_wait=0.0)


def sdk(client: TestClient, keys: dict[str, str], role: str = "all") -> NMEClient:
    """A client that sends through the in-process app."""
    return NMEClient("http://testserver", keys[role], http=client, retry=FAST)


def test_an_app_backend_day_through_the_client(client: TestClient, keys: dict) -> None:
    nme = sdk(client, keys)
    created = nme.create_model(model_payload())
    assert created["name"] == "mood" and created["active_version"] is None
    with pytest.raises(Conflict):  # no version yet
        nme.predict("mood", [{"user_id": "u0001", "features": features()}])
    result = nme.ingest("mood", simulated_items())
    assert result.inserted == 240 and result.updated == 0
    job = nme.refit("mood")
    run_jobs(client)
    assert nme.wait_for_job(job["id"], timeout=5, poll=0.01)["status"] == "succeeded"
    answer = nme.predict("mood", [{"user_id": "u0001", "features": features()},
                                  {"user_id": "stranger", "features": features()}])
    assert isinstance(answer, Predictions) and answer.version == 1
    assert [p.personalized for p in answer.predictions] == [True, False]
    assert isinstance(answer.predictions[0].prediction, float)
    assert answer.predictions[0].lower is None  # intervals only when asked
    sure, unsure = nme.predict("mood", [{"user_id": "u0001", "features": features()},
                                        {"user_id": "stranger", "features": features()}],
                               interval=0.9).predictions
    for p in (sure, unsure):
        assert p.lower is not None and p.upper is not None and p.lower < p.prediction < p.upper
    assert unsure.upper - unsure.lower > sure.upper - sure.lower  # type: ignore[operator]
    with pytest.raises(InvalidRequest) as refused:
        nme.predict("mood", [{"user_id": "u0001", "features": features()}], interval=1.0)
    assert refused.value.field == "interval"
    assert nme.user("mood", "u0001")["personalized"] is True
    events = list(nme.events("mood", page_size=1))
    assert [e["kind"] for e in events][-1] == "refit_queued" and len(events) >= 3
    assert [v["version"] for v in nme.versions("mood")] == [1]
    assert [m["name"] for m in nme.models(page_size=1)] == ["mood"]
    nme.forget_user("u0001")
    with pytest.raises(NotFound):
        nme.user("mood", "u0001")


def test_errors_carry_the_offending_field(client: TestClient, keys: dict) -> None:
    nme = sdk(client, keys)
    nme.create_model(model_payload())
    item = {"user_id": "u1", "day": "2026-01-01", "features": features(), "label": "high"}
    with pytest.raises(InvalidRequest) as caught:
        nme.ingest("mood", [item])
    assert caught.value.status == 422 and caught.value.field == "items.0.label"
    with pytest.raises(NotFound):
        nme.model("no-such-model")


def test_async_client_against_the_app(client: TestClient, keys: dict) -> None:
    async def scenario() -> list[str]:
        transport = httpx.ASGITransport(app=client.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as http:
            nme = AsyncNMEClient("http://app", keys["all"], http=http, retry=FAST)
            await nme.create_model(model_payload())
            await nme.ingest("mood", simulated_items(n_users=2, n_days=5))
            bad = {"user_id": "u", "day": "2026-01-01", "features": {"bogus": 1.0}}
            with pytest.raises(InvalidRequest) as caught:
                await nme.ingest("mood", [bad])
            assert caught.value.field == "items.0.features"
            return [m["name"] async for m in nme.models()]

    assert asyncio.run(scenario()) == ["mood"]


def scripted(*answers: httpx.Response | Exception) -> tuple[httpx.Client, list[httpx.Request]]:
    """An httpx client whose transport replays ``answers`` in order."""
    sent: list[httpx.Request] = []
    queue = list(answers)

    def handle(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        answer = queue.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    return httpx.Client(transport=httpx.MockTransport(handle), base_url="http://x"), sent


OK = httpx.Response(200, json={"model": "m", "version": 1, "predictions": []})


@pytest.mark.parametrize("status", [503, 429])
def test_unavailable_and_rate_limited_are_retried(status: int) -> None:
    http, sent = scripted(httpx.Response(status, headers={"Retry-After": "0"}), OK)
    nme = NMEClient("http://x", "k", http=http, retry=RetryPolicy(attempts=3))
    assert nme.predict("m", []).version == 1 and len(sent) == 2
    assert sent[0].headers["authorization"] == "Bearer k"


def test_retries_end_with_the_typed_error() -> None:
    busy = httpx.Response(503, json={"detail": "the database is unavailable"},
                          headers={"Retry-After": "0"})
    http, sent = scripted(busy, busy, busy)
    with pytest.raises(Unavailable, match="unavailable"):
        NMEClient("http://x", "k", http=http, retry=FAST).predict("m", [])
    assert len(sent) == 3


def test_only_requests_that_never_left_are_retried_after_transport_errors() -> None:
    http, sent = scripted(httpx.ConnectError("refused"), OK)
    assert NMEClient("http://x", "k", http=http, retry=FAST).predict("m", []).version == 1
    http, sent = scripted(httpx.ReadTimeout("slow"), OK)
    with pytest.raises(httpx.ReadTimeout):
        NMEClient("http://x", "k", http=http, retry=FAST).predict("m", [])
    assert len(sent) == 1


def test_retry_after_accepts_seconds_and_dates() -> None:
    assert retry_after(httpx.Response(503, headers={"Retry-After": "7"})) == 7.0
    later = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 25 < retry_after(httpx.Response(503, headers={"Retry-After": later})) <= 30  # type: ignore[operator]
    assert retry_after(httpx.Response(503)) is None
    capped = RetryPolicy(max_wait=2.0)
    assert capped.wait(1, httpx.Response(429, headers={"Retry-After": "60"})) == 2.0


def test_path_segments_are_quoted() -> None:
    http, sent = scripted(httpx.Response(404, json={"detail": "nope"}))
    with pytest.raises(NotFound):
        NMEClient("http://x", "k", http=http, retry=FAST).user("m", "a/b c")
    assert sent[0].url.raw_path == b"/v1/models/m/users/a%2Fb%20c"
