"""``NMEClient`` and ``AsyncNMEClient``: the service's HTTP API for app backends, on httpx.

    from service.client import NMEClient

    with NMEClient("http://127.0.0.1:8000", api_key="nme_…") as nme:
        nme.ingest("mood", [{"user_id": "u1", "day": "2026-11-30",
                             "features": {"typing_speed": 1.2}, "label": 62.0}])
        answer = nme.predict("mood", [{"user_id": "u1", "features": {"typing_speed": 1.3}}])
        answer.predictions[0].prediction, answer.predictions[0].personalized
        for event in nme.events("mood"):      # pages are followed for you
            print(event["kind"], event["detail"])

- Results are typed (:class:`Predictions`, :class:`Decoded`, :class:`IngestResult`); lists are
  iterators that follow ``next_cursor`` page by page.
- The API's errors are exceptions (:class:`NMEError` and one subclass per status). A 422 is a
  :class:`InvalidRequest` whose ``field`` names the first offending field
  (``"items.0.label"``) and ``errors`` holds all of them.
- 503 (database unavailable) and 429 (rate limited) are retried with exponential back-off,
  honouring ``Retry-After``; so is a connection that could not be opened. Every call the client
  retries is safe to repeat: ingest is an idempotent upsert, a queued refit coalesces, and
  reads change nothing.

This module imports nothing else from the service (only httpx), so an app backend can vendor it.
"""

from __future__ import annotations

import asyncio
import email.utils
import random
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import httpx

__all__ = [
    "AsyncNMEClient",
    "Conflict",
    "Decoded",
    "Forbidden",
    "IngestResult",
    "InvalidRequest",
    "NMEClient",
    "NMEError",
    "NotFound",
    "PayloadTooLarge",
    "Prediction",
    "Predictions",
    "RateLimited",
    "Unauthorized",
    "Unavailable",
]

RETRIED_STATUSES = frozenset({429, 503})


# ---------------------------------------------------------------------------------- errors


class NMEError(Exception):
    """An error answer of the API: ``status`` and the body's ``detail``."""

    def __init__(self, status: int, detail: Any) -> None:
        self.status = status
        self.detail = detail
        super().__init__(f"{status}: {detail}")


class InvalidRequest(NMEError):
    """422: the request does not fit the API or the model's schema.

    ``errors`` lists every problem (``{"loc", "msg", "type"}``); ``field`` is the first one's
    location without the ``body``/``query``/``path`` prefix, dotted (``"items.0.label"``).
    """

    @property
    def errors(self) -> list[dict[str, Any]]:
        return self.detail if isinstance(self.detail, list) else []

    @property
    def field(self) -> str | None:
        if not self.errors:
            return None
        loc = [str(part) for part in self.errors[0].get("loc", [])]
        if loc and loc[0] in ("body", "query", "path", "header"):
            loc = loc[1:]
        return ".".join(loc) or None


class Unauthorized(NMEError):
    """401: no key, or an unknown, malformed or revoked one."""


class Forbidden(NMEError):
    """403: the key lacks the route's scope."""


class NotFound(NMEError):
    """404: unknown model, version, user or job."""


class Conflict(NMEError):
    """409: the resource's state forbids the request (e.g. no active version yet)."""


class PayloadTooLarge(NMEError):
    """413: too many items or too large a body."""


class RateLimited(NMEError):
    """429 after the retries ran out."""


class Unavailable(NMEError):
    """503 after the retries ran out: the database is unreachable."""


_ERRORS: dict[int, type[NMEError]] = {
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    413: PayloadTooLarge,
    422: InvalidRequest,
    429: RateLimited,
    503: Unavailable,
}


def raise_for_answer(response: httpx.Response) -> None:
    """Raise the :class:`NMEError` subclass of an error answer (anything not 2xx)."""
    if response.is_success:
        return
    try:
        detail = response.json().get("detail", response.text)
    except ValueError:
        detail = response.text
    raise _ERRORS.get(response.status_code, NMEError)(response.status_code, detail)


# ---------------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Prediction:
    """One user's prediction (a class name and probabilities for classification models)."""

    user_id: str
    prediction: float | str
    personalized: bool
    probabilities: dict[str, float] | None = None
    lower: float | None = None
    upper: float | None = None


@dataclass(frozen=True)
class Predictions:
    """A predict answer: which version answered, and one :class:`Prediction` per item."""

    model: str
    version: int
    predictions: list[Prediction]


@dataclass(frozen=True)
class Decoded:
    """A decode answer: the Viterbi path, its score, and marginals when asked for."""

    model: str
    version: int
    personalized: bool
    path: list[str]
    score: float
    marginals: list[dict[str, float]] | None = None


@dataclass(frozen=True)
class IngestResult:
    """How many rows an ingest inserted and changed (a resend changes nothing)."""

    inserted: int
    updated: int


def _predictions(body: dict[str, Any]) -> Predictions:
    fields = Prediction.__dataclass_fields__
    return Predictions(
        model=body["model"],
        version=body["version"],
        predictions=[
            Prediction(**{k: v for k, v in p.items() if k in fields}) for p in body["predictions"]
        ],
    )


def _decoded(body: dict[str, Any]) -> Decoded:
    fields = Decoded.__dataclass_fields__
    return Decoded(**{k: v for k, v in body.items() if k in fields})


def _ingested(body: dict[str, Any]) -> IngestResult:
    return IngestResult(inserted=body["inserted"], updated=body["updated"])


def _identity(body: Any) -> Any:
    return body


# ---------------------------------------------------------------------------------- calls


@dataclass(frozen=True)
class Call:
    """One API call, independent of how it is sent (the sync and async clients share these)."""

    method: str
    path: str
    parse: Callable[[Any], Any] = _identity
    json: Any = None
    params: Mapping[str, Any] = field(default_factory=dict)


def _quote(segment: str) -> str:
    return quote(segment, safe="")


class _Calls:
    """The API's operations as :class:`Call` values."""

    @staticmethod
    def predict(model: str, items: Sequence[Mapping[str, Any]], interval: float | None) -> Call:
        body: dict[str, Any] = {"items": list(items)}
        if interval is not None:
            body["interval"] = interval
        return Call("POST", f"/v1/models/{_quote(model)}/predict", _predictions, body)

    @staticmethod
    def ingest(model: str, items: Sequence[Mapping[str, Any]]) -> Call:
        return Call(
            "POST", f"/v1/models/{_quote(model)}/observations", _ingested, {"items": list(items)}
        )

    @staticmethod
    def ingest_sequences(model: str, items: Sequence[Mapping[str, Any]]) -> Call:
        return Call(
            "POST", f"/v1/models/{_quote(model)}/sequences", _ingested, {"items": list(items)}
        )

    @staticmethod
    def decode(
        model: str, user_id: str, segments: Sequence[Mapping[str, Any]], marginals: bool
    ) -> Call:
        body = {"user_id": user_id, "segments": list(segments), "marginals": marginals}
        return Call("POST", f"/v1/models/{_quote(model)}/decode", _decoded, body)

    @staticmethod
    def create_model(definition: Mapping[str, Any]) -> Call:
        return Call("POST", "/v1/models", json=dict(definition))

    @staticmethod
    def model(model: str) -> Call:
        return Call("GET", f"/v1/models/{_quote(model)}")

    @staticmethod
    def user(model: str, user_id: str) -> Call:
        return Call("GET", f"/v1/models/{_quote(model)}/users/{_quote(user_id)}")

    @staticmethod
    def forget_user(user_id: str) -> Call:
        return Call("DELETE", f"/v1/users/{_quote(user_id)}")

    @staticmethod
    def refit(model: str) -> Call:
        return Call("POST", f"/v1/models/{_quote(model)}/refit", lambda body: body["job"])

    @staticmethod
    def job(job_id: int) -> Call:
        return Call("GET", f"/v1/jobs/{int(job_id)}")

    @staticmethod
    def activate(model: str, version: int) -> Call:
        return Call("POST", f"/v1/models/{_quote(model)}/versions/{int(version)}/activate")

    @staticmethod
    def page(path: str, params: Mapping[str, Any], cursor: str | None, limit: int) -> Call:
        query = {k: v for k, v in params.items() if v is not None}
        query["limit"] = limit
        if cursor is not None:
            query["cursor"] = cursor
        return Call("GET", path, params=query)


def _list_path(listing: str, model: str | None) -> str:
    if listing == "models":
        return "/v1/models"
    assert model is not None
    return f"/v1/models/{_quote(model)}/{listing}"


# ---------------------------------------------------------------------------------- retries


@dataclass(frozen=True)
class RetryPolicy:
    """Retries of 503, 429 and connections that could not be opened: up to ``attempts`` tries
    in all; waits ``Retry-After`` when the server sends one, else ``base · 2^k`` with jitter;
    never longer than ``max_wait`` seconds at a time."""

    attempts: int = 4
    base: float = 0.5
    max_wait: float = 30.0

    def wait(self, attempt: int, response: httpx.Response | None) -> float:
        """Seconds to wait after failed try number ``attempt`` (1-based)."""
        hinted = retry_after(response) if response is not None else None
        if hinted is not None:
            return min(self.max_wait, hinted)
        return min(self.max_wait, self.base * 2 ** (attempt - 1) * (0.5 + random.random()))


def retry_after(response: httpx.Response) -> float | None:
    """The ``Retry-After`` header in seconds (delta-seconds or an HTTP date), if any."""
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _should_retry(response: httpx.Response | None, error: Exception | None) -> bool:
    if error is not None:
        # Only failures before the request left: repeating it cannot double anything.
        return isinstance(error, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout)
    return response is not None and response.status_code in RETRIED_STATUSES


def _next_step(
    policy: RetryPolicy,
    call: Call,
    attempt: int,
    response: httpx.Response | None,
    error: Exception | None,
) -> tuple[float | None, Any]:
    """After try number ``attempt``: ``(seconds to wait, None)`` to try again, or
    ``(None, parsed answer)``; raises the API's error (or the transport's) when done."""
    if attempt < policy.attempts and _should_retry(response, error):
        return policy.wait(attempt, response), None
    if error is not None:
        raise error
    assert response is not None
    raise_for_answer(response)
    return None, call.parse(response.json()) if response.content else None


# ---------------------------------------------------------------------------------- clients


class NMEClient:
    """Synchronous client. Use as a context manager, or call :meth:`close`.

    Args:
        base_url: e.g. ``"http://127.0.0.1:8000"``.
        api_key: ``nme_…``; sent as ``Authorization: Bearer``.
        timeout: seconds per request.
        retry: the :class:`RetryPolicy` for 503, 429 and connection failures.
        http: an ``httpx.Client`` to send through instead of a new one (tests, proxies).
    """

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout: float = 10.0,
        retry: RetryPolicy | None = None,
        http: httpx.Client | None = None,
    ) -> None:
        self.retry = retry or RetryPolicy()
        self._owns_http = http is None
        self._http = http or httpx.Client(base_url=base_url, timeout=timeout)
        self._headers = {"Authorization": f"Bearer {api_key}"}

    def __enter__(self) -> NMEClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection pool (unless it was handed in)."""
        if self._owns_http:
            self._http.close()

    def _run(self, call: Call) -> Any:
        for attempt in range(1, self.retry.attempts + 1):
            response, error = None, None
            try:
                response = self._http.request(
                    call.method, call.path, json=call.json, params=dict(call.params) or None,
                    headers=self._headers,
                )
            except httpx.TransportError as err:
                error = err
            wait, result = _next_step(self.retry, call, attempt, response, error)
            if wait is None:
                return result
            time.sleep(wait)
        raise AssertionError("unreachable: the last attempt never retries")

    def _pages(
        self, listing: str, model: str | None, limit: int, **params: Any
    ) -> Iterator[Any]:
        cursor = None
        while True:
            page = self._run(_Calls.page(_list_path(listing, model), params, cursor, limit))
            yield from page["data"]
            cursor = page.get("next_cursor")
            if not cursor:
                return

    # -- predictions and data -----------------------------------------------------------

    def predict(
        self, model: str, items: Sequence[Mapping[str, Any]], *, interval: float | None = None
    ) -> Predictions:
        """Predictions for ``[{"user_id", "features"}, …]`` in one forward pass."""
        return self._run(_Calls.predict(model, items, interval))

    def ingest(self, model: str, items: Sequence[Mapping[str, Any]]) -> IngestResult:
        """Upsert ``[{"user_id", "day", "features", "label"?}, …]`` (omit ``label`` to keep
        the stored one; ``None`` clears it)."""
        return self._run(_Calls.ingest(model, items))

    def ingest_sequences(self, model: str, items: Sequence[Mapping[str, Any]]) -> IngestResult:
        """Upsert labelled sequences ``[{"user_id", "sequence_id", "segments", "labels"?}]``."""
        return self._run(_Calls.ingest_sequences(model, items))

    def decode(
        self,
        model: str,
        user_id: str,
        segments: Sequence[Mapping[str, Any]],
        *,
        marginals: bool = False,
    ) -> Decoded:
        """The Viterbi path of one user's sequence of ``[{"features": {…}}, …]``."""
        return self._run(_Calls.decode(model, user_id, segments, marginals))

    def user(self, model: str, user_id: str) -> dict[str, Any]:
        """What the model knows about a user (labels, personalised?, bias or transitions)."""
        return self._run(_Calls.user(model, user_id))

    def forget_user(self, user_id: str) -> None:
        """Forget a user everywhere (admin)."""
        self._run(_Calls.forget_user(user_id))

    # -- models, versions, jobs, events ------------------------------------------------

    def create_model(self, definition: Mapping[str, Any]) -> dict[str, Any]:
        """Define a model (admin); returns it with its resolved settings."""
        return self._run(_Calls.create_model(definition))

    def model(self, model: str) -> dict[str, Any]:
        """One model with its active version."""
        return self._run(_Calls.model(model))

    def models(self, *, page_size: int = 100) -> Iterator[dict[str, Any]]:
        """Every model, by name (pages are fetched as you iterate)."""
        return self._pages("models", None, page_size)

    def versions(self, model: str, *, page_size: int = 100) -> Iterator[dict[str, Any]]:
        """A model's versions, newest first."""
        return self._pages("versions", model, page_size)

    def jobs(
        self, model: str, *, status: str | None = None, kind: str | None = None,
        page_size: int = 100,
    ) -> Iterator[dict[str, Any]]:
        """A model's jobs, newest first (admin)."""
        return self._pages("jobs", model, page_size, status=status, kind=kind)

    def events(
        self, model: str, *, kind: str | None = None, page_size: int = 100
    ) -> Iterator[dict[str, Any]]:
        """A model's event log, newest first (admin)."""
        return self._pages("events", model, page_size, kind=kind)

    def refit(self, model: str) -> dict[str, Any]:
        """Queue a refit (admin); returns the job."""
        return self._run(_Calls.refit(model))

    def job(self, job_id: int) -> dict[str, Any]:
        """One job's status and progress (admin)."""
        return self._run(_Calls.job(job_id))

    def wait_for_job(
        self, job_id: int, *, timeout: float = 600.0, poll: float = 1.0
    ) -> dict[str, Any]:
        """Poll a job until it succeeded or failed (``TimeoutError`` after ``timeout``)."""
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if job["status"] in ("succeeded", "failed"):
                return job
            if time.monotonic() >= deadline:
                raise TimeoutError(f"job {job_id} is still {job['status']}")
            time.sleep(poll)

    def activate(self, model: str, version: int) -> dict[str, Any]:
        """Serve ``version`` (also the rollback; admin)."""
        return self._run(_Calls.activate(model, version))


class AsyncNMEClient:
    """The asynchronous twin of :class:`NMEClient` (same methods, awaited; lists are async
    iterators)."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout: float = 10.0,
        retry: RetryPolicy | None = None,
        http: httpx.AsyncClient | None = None,
    ) -> None:
        self.retry = retry or RetryPolicy()
        self._owns_http = http is None
        self._http = http or httpx.AsyncClient(base_url=base_url, timeout=timeout)
        self._headers = {"Authorization": f"Bearer {api_key}"}

    async def __aenter__(self) -> AsyncNMEClient:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection pool (unless it was handed in)."""
        if self._owns_http:
            await self._http.aclose()

    async def _run(self, call: Call) -> Any:
        for attempt in range(1, self.retry.attempts + 1):
            response, error = None, None
            try:
                response = await self._http.request(
                    call.method, call.path, json=call.json, params=dict(call.params) or None,
                    headers=self._headers,
                )
            except httpx.TransportError as err:
                error = err
            wait, result = _next_step(self.retry, call, attempt, response, error)
            if wait is None:
                return result
            await asyncio.sleep(wait)
        raise AssertionError("unreachable: the last attempt never retries")

    async def _pages(
        self, listing: str, model: str | None, limit: int, **params: Any
    ) -> AsyncIterator[Any]:
        cursor = None
        while True:
            page = await self._run(
                _Calls.page(_list_path(listing, model), params, cursor, limit)
            )
            for item in page["data"]:
                yield item
            cursor = page.get("next_cursor")
            if not cursor:
                return

    async def predict(
        self, model: str, items: Sequence[Mapping[str, Any]], *, interval: float | None = None
    ) -> Predictions:
        """See :meth:`NMEClient.predict`."""
        return await self._run(_Calls.predict(model, items, interval))

    async def ingest(self, model: str, items: Sequence[Mapping[str, Any]]) -> IngestResult:
        """See :meth:`NMEClient.ingest`."""
        return await self._run(_Calls.ingest(model, items))

    async def ingest_sequences(
        self, model: str, items: Sequence[Mapping[str, Any]]
    ) -> IngestResult:
        """See :meth:`NMEClient.ingest_sequences`."""
        return await self._run(_Calls.ingest_sequences(model, items))

    async def decode(
        self,
        model: str,
        user_id: str,
        segments: Sequence[Mapping[str, Any]],
        *,
        marginals: bool = False,
    ) -> Decoded:
        """See :meth:`NMEClient.decode`."""
        return await self._run(_Calls.decode(model, user_id, segments, marginals))

    async def user(self, model: str, user_id: str) -> dict[str, Any]:
        """See :meth:`NMEClient.user`."""
        return await self._run(_Calls.user(model, user_id))

    async def forget_user(self, user_id: str) -> None:
        """See :meth:`NMEClient.forget_user`."""
        await self._run(_Calls.forget_user(user_id))

    async def create_model(self, definition: Mapping[str, Any]) -> dict[str, Any]:
        """See :meth:`NMEClient.create_model`."""
        return await self._run(_Calls.create_model(definition))

    async def model(self, model: str) -> dict[str, Any]:
        """See :meth:`NMEClient.model`."""
        return await self._run(_Calls.model(model))

    def models(self, *, page_size: int = 100) -> AsyncIterator[dict[str, Any]]:
        """See :meth:`NMEClient.models`."""
        return self._pages("models", None, page_size)

    def versions(self, model: str, *, page_size: int = 100) -> AsyncIterator[dict[str, Any]]:
        """See :meth:`NMEClient.versions`."""
        return self._pages("versions", model, page_size)

    def jobs(
        self, model: str, *, status: str | None = None, kind: str | None = None,
        page_size: int = 100,
    ) -> AsyncIterator[dict[str, Any]]:
        """See :meth:`NMEClient.jobs`."""
        return self._pages("jobs", model, page_size, status=status, kind=kind)

    def events(
        self, model: str, *, kind: str | None = None, page_size: int = 100
    ) -> AsyncIterator[dict[str, Any]]:
        """See :meth:`NMEClient.events`."""
        return self._pages("events", model, page_size, kind=kind)

    async def refit(self, model: str) -> dict[str, Any]:
        """See :meth:`NMEClient.refit`."""
        return await self._run(_Calls.refit(model))

    async def job(self, job_id: int) -> dict[str, Any]:
        """See :meth:`NMEClient.job`."""
        return await self._run(_Calls.job(job_id))

    async def wait_for_job(
        self, job_id: int, *, timeout: float = 600.0, poll: float = 1.0
    ) -> dict[str, Any]:
        """See :meth:`NMEClient.wait_for_job`."""
        deadline = time.monotonic() + timeout
        while True:
            job = await self.job(job_id)
            if job["status"] in ("succeeded", "failed"):
                return job
            if time.monotonic() >= deadline:
                raise TimeoutError(f"job {job_id} is still {job['status']}")
            await asyncio.sleep(poll)

    async def activate(self, model: str, version: int) -> dict[str, Any]:
        """See :meth:`NMEClient.activate`."""
        return await self._run(_Calls.activate(model, version))
