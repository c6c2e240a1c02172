"""The request guard's route memory: the same answer as matching afresh, bounded in size."""

from __future__ import annotations

from service.api.guard import MATCH_MEMORY, RateLimiter, RequestGuard
from service.app import create_app
from service.config import RateLimits, Settings


def scope(app: object, method: str, path: str) -> dict:
    return {"type": "http", "method": method, "path": path, "root_path": "", "app": app,
            "headers": []}


def make_guard() -> tuple[RequestGuard, object]:
    app = create_app(Settings(database_url="sqlite://", rate_limits=RateLimits(enabled=False)))
    guard = RequestGuard(app, max_body_bytes=1024, limiter=RateLimiter(RateLimits()),
                         on_refusal=lambda *_: None)
    return guard, app


def test_remembered_matches_equal_fresh_ones() -> None:
    guard, app = make_guard()
    cases = [
        ("POST", "/v1/models/mood/predict"), ("GET", "/v1/models/mood/predict"),
        ("GET", "/healthz"), ("DELETE", "/v1/users/u1"), ("GET", "/v1/nothing/here"),
        ("GET", "/v1/models/mood"), ("POST", "/v1/models"),
    ]
    fresh = []
    for method, path in cases:
        guard._matched.clear()
        fresh.append(guard._match(scope(app, method, path)))
    remembered = [guard._match(scope(app, m, p)) for m, p in cases]
    again = [guard._match(scope(app, m, p)) for m, p in cases]
    assert remembered == fresh == again
    predict_route, needed = fresh[0]
    assert getattr(predict_route, "path", None) == "/v1/models/{name}/predict"
    assert needed == "predict"
    assert fresh[2][1] is None  # health checks are open
    assert fresh[4] == (None, "read")  # unknown paths need a key


def test_the_memory_is_bounded_against_path_spraying() -> None:
    guard, app = make_guard()
    for i in range(MATCH_MEMORY * 2 + 5):
        guard._match(scope(app, "GET", f"/v1/models/m{i}/users/u{i}"))
    assert 0 < len(guard._matched) <= MATCH_MEMORY
