"""Fuzzing: schemathesis generates requests from the app's own OpenAPI document — valid ones
and deliberately invalid ones — for every operation, and none may answer a 5xx.

Runs on SQLite and PostgreSQL against a database holding a trained model ``mood``, with a key
that has every scope, through the app's TestClient (which re-raises any server exception, so a
crash fails the test with its traceback). Each operation gets ``NME_FUZZ_EXAMPLES`` valid and as
many invalid cases (default 80 + 80), plus as many valid cases aimed at ``mood`` (random model
names would only ever meet 404s). Generation is derandomised, so CI runs the same cases every
time; set ``NME_FUZZ_SEED`` to explore other ones locally.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, Phase, assume, given, seed, settings
from hypothesis import strategies as st
from schemathesis.generation import GenerationMode

EXAMPLES = int(os.environ.get("NME_FUZZ_EXAMPLES", "80"))
SEED = os.environ.get("NME_FUZZ_SEED")


def send(client: TestClient, kwargs: dict[str, Any]) -> httpx.Response | None:
    """Send schemathesis' requests-style arguments with the TestClient; None when the generated
    request cannot even be put on the wire (e.g. a header value httpx refuses to encode)."""
    body: dict[str, Any] = {}
    if "json" in kwargs:
        body["json"] = kwargs["json"]
    elif isinstance(kwargs.get("data"), bytes | str):
        body["content"] = kwargs["data"]
    elif kwargs.get("data") is not None:
        body["data"] = kwargs["data"]
    if kwargs.get("files"):
        body["files"] = kwargs["files"]
    try:
        return client.request(
            kwargs["method"],
            kwargs["url"],
            params=kwargs.get("params") or None,
            headers=kwargs.get("headers"),
            cookies=kwargs.get("cookies") or None,
            **body,
        )
    except (httpx.InvalidURL, httpx.LocalProtocolError, UnicodeEncodeError, ValueError, TypeError):
        return None


def test_fuzz_every_operation_answers_without_server_errors(
    client: TestClient, auth: Callable, trained_mood: dict
) -> None:
    schema = schemathesis.openapi.from_dict(client.app.openapi())
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == 20  # every route but the docs pages
    headers = auth("all")
    statuses: dict[int, int] = {}
    cases = 0
    started = time.perf_counter()
    for operation in operations:
        strategies = [
            operation.as_strategy(GenerationMode.POSITIVE, headers=headers),
            operation.as_strategy(GenerationMode.NEGATIVE, headers=headers),
        ]
        if "{name}" in operation.path:
            strategies.append(
                operation.as_strategy(
                    GenerationMode.POSITIVE, headers=headers, path_parameters={"name": "mood"}
                )
            )

        @settings(
            max_examples=EXAMPLES * len(strategies),
            deadline=None,
            database=None,
            derandomize=SEED is None,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(case=st.one_of(strategies))
        def run(case: Any) -> None:
            nonlocal cases
            response = send(client, case.as_transport_kwargs(base_url="http://testserver"))
            assume(response is not None)
            assert response is not None
            cases += 1
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
            assert response.status_code < 500, (
                f"{case.operation.label}: {response.status_code} {response.text[:300]}\n"
                f"{case.as_curl_command()}"
            )

        if SEED is not None:
            run = seed(int(SEED))(run)
        run()
    seconds = time.perf_counter() - started
    print(f"\nfuzz: {cases} cases over {len(operations)} operations in {seconds:.1f} s: {statuses}")
    # the fuzzer reached the handlers, not only the guard and the validator
    assert sum(n for status, n in statuses.items() if status < 300) > len(operations)


@pytest.mark.parametrize("path", ["/v1/models/mood/predict", "/v1/models/mood/observations"])
def test_fuzz_json_bodies_of_any_shape(
    client: TestClient, auth: Callable, trained_mood: dict, path: str
) -> None:
    """Arbitrary JSON values (deep, wide, odd Unicode, huge numbers) as request bodies."""
    json_values = st.recursive(
        st.none()
        | st.booleans()
        | st.integers(min_value=-(2**80), max_value=2**80)
        | st.floats(allow_nan=False, allow_infinity=False)
        | st.text(),
        lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(), inner, max_size=5),
        max_leaves=30,
    )

    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True)
    @given(
        body=json_values
        | st.fixed_dictionaries({"items": st.lists(json_values, max_size=3)})
    )
    def run(body: Any) -> None:
        response = client.post(path, json=body, headers=auth("all"))
        assert response.status_code < 500, response.text[:300]

    run()
