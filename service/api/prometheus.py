"""Prometheus metrics of an API process, served at ``GET /metrics`` (admin scope).

Two sources:

- this process's traffic, counted as it happens: requests and latency per route template,
  predictions served and how many were personalised;
- the database, read at scrape time (aggregated in SQL), so every API process reports the same
  numbers however many workers there are: jobs per kind and status (queued/running = queue
  depth), finished jobs' durations and outcomes, and the active version of each model.

Every app gets its own ``CollectorRegistry`` (tests build many apps in one process).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric, SummaryMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.storage.tables import Job, Model, ModelVersion

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)


class ServiceMetrics:
    """The metric objects of one app and the registry that exposes them."""

    def __init__(self, engine_getter: Callable[[], Engine | None]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "nme_http_requests", "HTTP requests by route template, method and status.",
            ["method", "route", "status"], registry=self.registry,
        )
        self.latency = Histogram(
            "nme_http_request_duration_seconds", "HTTP request latency by route template.",
            ["method", "route"], buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.predictions = Counter(
            "nme_predictions", "Predictions (and decoded sequences) served, by model and by "
            "whether the user was personalised.",
            ["model", "personalized"], registry=self.registry,
        )
        self.rate_limited = Counter(
            "nme_rate_limited", "Requests refused with 429 by the per-key rate limit, by the "
            "scope charged (predict, ingest, admin, read) and the key's name.",
            ["scope", "key"], registry=self.registry,
        )
        self._counts: dict[str, list[int]] = {}  # model -> [personalised, total]
        self._lock = threading.Lock()
        self.registry.register(_RatioCollector(self))
        self.registry.register(DatabaseCollector(engine_getter))

    def count_predictions(self, model: str, personalized: int, total: int) -> None:
        """Record one request's predictions: ``personalized`` of ``total`` had θⁱ."""
        if personalized:
            self.predictions.labels(model, "true").inc(personalized)
        if total - personalized:
            self.predictions.labels(model, "false").inc(total - personalized)
        with self._lock:
            counts = self._counts.setdefault(model, [0, 0])
            counts[0] += personalized
            counts[1] += total

    def count_rate_limited(self, scope: str, key: str) -> None:
        """Record one request refused by the rate limit."""
        self.rate_limited.labels(scope, key).inc()

    def ratios(self) -> dict[str, float]:
        """Share of personalised predictions per model since the process started."""
        with self._lock:
            return {m: p / n for m, (p, n) in self._counts.items() if n}


class _RatioCollector(Collector):
    def __init__(self, metrics: ServiceMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "nme_personalized_ratio",
            "Share of this process's predictions that used the user's θⁱ, per model.",
            labels=["model"],
        )
        for model, ratio in sorted(self._metrics.ratios().items()):
            family.add_metric([model], ratio)
        yield family


class DatabaseCollector(Collector):
    """Job and version metrics read from the database at scrape time."""

    def __init__(self, engine_getter: Callable[[], Engine | None]) -> None:
        self._engine_getter = engine_getter

    def describe(self) -> list[Metric]:
        return []  # don't query the database on registration

    def collect(self) -> Iterator[Metric]:
        engine = self._engine_getter()
        if engine is None:
            return
        with Session(engine) as session:
            jobs = GaugeMetricFamily(
                "nme_jobs", "Jobs by kind and status (queued + running = queue depth).",
                labels=["kind", "status"],
            )
            for kind, status, n in session.execute(
                select(Job.kind, Job.status, func.count()).group_by(Job.kind, Job.status)
            ):
                jobs.add_metric([kind, status], n)
            yield jobs
            yield _durations(session)
            active = GaugeMetricFamily(
                "nme_active_version", "The version number serving each model.", labels=["model"]
            )
            for name, version in session.execute(
                select(Model.name, ModelVersion.version)
                .join(ModelVersion, ModelVersion.model_id == Model.id)
                .where(ModelVersion.status == "active")
            ):
                active.add_metric([name], version)
            yield active


def _durations(session: Session) -> Metric:
    """Count and summed run time of finished jobs per kind and outcome, aggregated by the
    database (a scrape never loads job rows into Python, however many there are)."""
    family = SummaryMetricFamily(
        "nme_job_duration_seconds",
        "Run time (last attempt's start to finish) of finished jobs by kind and outcome.",
        labels=["kind", "status"],
    )
    if session.get_bind().dialect.name == "postgresql":
        seconds = func.extract("epoch", Job.finished_at - Job.started_at)
    else:  # SQLite stores timestamps as text; julianday() reads them
        seconds = (func.julianday(Job.finished_at) - func.julianday(Job.started_at)) * 86_400.0
    rows = session.execute(
        select(Job.kind, Job.status, func.count(), func.coalesce(func.sum(seconds), 0.0))
        .where(
            Job.status.in_(("succeeded", "failed")),
            Job.started_at.is_not(None),
            Job.finished_at.is_not(None),
        )
        .group_by(Job.kind, Job.status)
        .order_by(Job.kind, Job.status)
    )
    for kind, status, count, total in rows:
        family.add_metric([kind, status], count_value=count, sum_value=max(0.0, float(total)))
    return family


class MetricsMiddleware:
    """Pure ASGI middleware counting requests and timing them per route *template*
    (``/v1/models/{name}/predict``), so user ids never become label values."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status: dict[str, Any] = {"code": 500}

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            method = scope.get("method", "")
            self.metrics.requests.labels(method, template, str(status["code"])).inc()
            self.metrics.latency.labels(method, template).observe(time.perf_counter() - started)
