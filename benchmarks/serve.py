"""Serving throughput and latency of the NME service against its own bare JSON route.

Starts uvicorn (one worker process) on a freshly built demo database (200 simulated users, the
demo's `mood` model) — once on SQLite, once on PostgreSQL — and drives it from this process with
a concurrent asyncio load generator on 127.0.0.1, ~10 s per case:

    bare        GET /healthz: the same app's cheapest JSON route (the baseline)
    predict-1   POST /v1/models/mood/predict, one user
    predict-100 one request with 100 users
    predict-1000 one request with 1 000 users (run one at a time: its latency is the number)

It prints requests/s, p50 and p99 latency and the throughput ratio to the bare route per
database, then a summary. Targets on CPU: predict-1 ≥ 50 % of bare on SQLite and ≥ 30 % on
PostgreSQL (a network round trip per request, even on 127.0.0.1); a 1 000-user batch in
< 100 ms. The server runs with the production defaults of the serving caches
(``NME_AUTH_CACHE_SECONDS``, ``NME_ACTIVE_VERSION_TTL_SECONDS``) and with rate limiting in the
path: every request takes a token from its key's bucket, sized so that the one benchmark key is
never refused (a 429 would measure the limit, not the server).

The load generator speaks minimal HTTP/1.1 over keep-alive asyncio streams rather than using an
HTTP client library: on a small machine the client shares the CPU with the server, and a heavy
client would make the server look slower than it is (it affects both cases, but not equally).

    .venv/bin/python benchmarks/serve.py [--duration 10] [--concurrency 8]
        [--databases sqlite,postgres] [--postgres-url postgresql://postgres@127.0.0.1/test]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pgdb import scratch_database

from service.config import Settings
from service.demo import FEATURES, prepare_demo

DEFAULT_POSTGRES_URL = os.environ.get(
    "NME_BENCH_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


@dataclass(frozen=True)
class Case:
    """One load pattern: a request and how many connections send it at once."""

    name: str
    method: str
    path: str
    body: bytes | None
    concurrency: int


@dataclass(frozen=True)
class Result:
    """Measured outcome of one case."""

    case: Case
    requests: int
    seconds: float
    latencies: np.ndarray  # (requests,) seconds

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies, q) * 1000)


def request_bytes(case: Case, host: str, port: int, key: str) -> bytes:
    """The raw HTTP/1.1 request of a case (sent as is on every iteration)."""
    lines = [f"{case.method} {case.path} HTTP/1.1", f"Host: {host}:{port}"]
    if case.path.startswith("/v1"):
        lines.append(f"Authorization: Bearer {key}")
    body = case.body or b""
    if case.body is not None:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def read_response(reader: asyncio.StreamReader) -> int:
    """Read one response; return its status code."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    await reader.readexactly(length)
    return status


async def connection_loop(
    host: str, port: int, payload: bytes, until: float, latencies: list[float]
) -> None:
    """One keep-alive connection sending ``payload`` back to back until ``until``."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while time.perf_counter() < until:
            start = time.perf_counter()
            writer.write(payload)
            status = await read_response(reader)
            latencies.append(time.perf_counter() - start)
            if status != 200:
                raise RuntimeError(f"unexpected HTTP {status}")
    finally:
        writer.close()


async def measure(
    host: str, port: int, payload: bytes, concurrency: int, seconds: float
) -> tuple[list[float], float]:
    """Send ``payload`` on ``concurrency`` connections for ``seconds``: (latencies, elapsed)."""
    latencies: list[float] = []
    start = time.perf_counter()
    until = start + seconds
    loops = (connection_loop(host, port, payload, until, latencies) for _ in range(concurrency))
    await asyncio.gather(*loops)
    return latencies, time.perf_counter() - start


async def run_case(
    case: Case, host: str, port: int, key: str, duration: float, warmup: float
) -> Result:
    """Warm up (discarded), then measure ``case`` for ``duration`` seconds."""
    payload = request_bytes(case, host, port, key)
    await measure(host, port, payload, case.concurrency, warmup)
    latencies, elapsed = await measure(host, port, payload, case.concurrency, duration)
    return Result(case, len(latencies), elapsed, np.asarray(latencies))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(
    settings: Settings, port: int, extra_env: dict[str, str] | None = None
) -> subprocess.Popen:
    """uvicorn with one worker process on the demo database; waits until it answers."""
    env = {
        **os.environ,
        "NME_DATABASE_URL": settings.database_url,
        "NME_ARTIFACT_DIR": str(settings.artifact_dir),
        "NME_DEVICE": settings.device,
        # the load generator is one key at thousands of requests/s: the limiter runs on every
        # request (its cost is measured) with a bucket no run empties
        "NME_RATE_LIMITS": '{"scopes": {"predict": {"rate": 1000000, "burst": 1000000}}}',
        **(extra_env or {}),
    }
    command = [
        sys.executable,
        "-m",
        "uvicorn",
        "service.app:create_app",
        "--factory",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
        "--log-level",
        "warning",
        "--no-access-log",
    ]
    server = subprocess.Popen(command, env=env)
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return server
        except OSError:
            time.sleep(0.2)
    server.terminate()
    raise RuntimeError("uvicorn did not start within 60 s")


def predict_body(n_users: int, n_known: int, seed: int = 0) -> bytes:
    """A predict request for ``n_users`` users, cycling through the demo's known users."""
    rng = np.random.default_rng(seed)
    items = []
    for k in range(n_users):
        user = f"u{k % n_known + 1:04d}" if k < n_known * 10 else f"new{k}"
        values = {
            "weekday": float(k % 7),
            "typing_speed": float(rng.normal(4, 0.8)),
            "screen_minutes": float(rng.normal(180, 40)),
            "gps_km": float(rng.gamma(2, 3)),
        }
        items.append({"user_id": user, "features": {f: values[f] for f in FEATURES}})
    return json.dumps({"items": items}).encode()


@contextmanager
def database(kind: str, tmp: Path, postgres_url: str) -> Iterator[str]:
    """The URL of an empty database of ``kind`` (sqlite: a file in ``tmp``; postgres: a new
    database on the server of ``postgres_url``, dropped afterwards)."""
    if kind == "sqlite":
        yield f"sqlite:///{tmp / 'bench.sqlite3'}"
        return
    with scratch_database(postgres_url) as url:
        yield url


def run_database(kind: str, args: argparse.Namespace) -> list[Result]:
    """Build the demo on one database, serve it, and measure every case."""
    with (
        tempfile.TemporaryDirectory(prefix="nme-bench-") as tmp,
        database(kind, Path(tmp), args.postgres_url) as url,
    ):
        settings = Settings(database_url=url, artifact_dir=Path(tmp) / "artifacts", device="cpu")
        demo = prepare_demo(settings, n_users=args.users, log=lambda _msg: None)
        port = free_port()
        server = start_server(settings, port)
        try:
            predict = "/v1/models/mood/predict"
            cases = [
                Case("bare", "GET", "/healthz", None, args.concurrency),
                Case("predict-1", "POST", predict, predict_body(1, args.users), args.concurrency),
                Case(
                    "predict-100", "POST", predict, predict_body(100, args.users), args.concurrency
                ),
                Case("predict-1000", "POST", predict, predict_body(1000, args.users), 1),
            ]
            return [
                asyncio.run(run_case(c, "127.0.0.1", port, demo.key, args.duration, args.warmup))
                for c in cases
            ]
        finally:
            server.terminate()
            server.wait(timeout=30)


TARGETS = {"sqlite": 0.5, "postgres": 0.3}
"""predict-1 throughput as a share of the bare route's, per database."""


def print_results(kind: str, results: list[Result], args: argparse.Namespace) -> None:
    """One database's table."""
    bare = results[0].rps
    print(
        f"\n{kind}: uvicorn 1 worker, demo model ({args.users} users), "
        f"{os.cpu_count()} CPUs, {args.duration:.0f} s per case\n"
    )
    print(
        f"{'case':<14}{'conc':>5}{'requests':>10}{'req/s':>10}{'users/s':>10}"
        f"{'p50 ms':>9}{'p99 ms':>9}{'vs bare':>9}"
    )
    for r in results:
        n = {"predict-1": 1, "predict-100": 100, "predict-1000": 1000}.get(r.case.name, 0)
        users = f"{r.rps * n:,.0f}" if n else "-"
        print(
            f"{r.case.name:<14}{r.case.concurrency:>5}{r.requests:>10}{r.rps:>10.0f}"
            f"{users:>10}{r.percentile(50):>9.2f}{r.percentile(99):>9.2f}"
            f"{r.rps / bare:>9.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per case")
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--users", type=int, default=200, help="simulated demo users")
    parser.add_argument(
        "--databases", default="sqlite,postgres", help="comma-separated: sqlite, postgres"
    )
    parser.add_argument(
        "--postgres-url",
        default=DEFAULT_POSTGRES_URL,
        help="a PostgreSQL server (any database on it): the benchmark creates and drops its own",
    )
    args = parser.parse_args()

    kinds = [k.strip() for k in args.databases.split(",") if k.strip()]
    measured = {}
    for kind in kinds:
        if kind not in TARGETS:
            parser.error(f"unknown database {kind!r}: use sqlite and/or postgres")
        measured[kind] = run_database(kind, args)
        print_results(kind, measured[kind], args)

    print(f"\n{'database':<10}{'predict-1/s':>13}{'bare/s':>9}{'ratio':>7}{'target':>8}"
          f"{'1000-user p50 ms':>18}{'p99 ms':>8}")
    for kind, results in measured.items():
        bare, single, batch = results[0], results[1], results[3]
        ratio = single.rps / bare.rps
        verdict = "met" if ratio >= TARGETS[kind] else "NOT met"
        print(
            f"{kind:<10}{single.rps:>13.0f}{bare.rps:>9.0f}{ratio:>7.2f}"
            f"{'≥' + format(TARGETS[kind], '.1f'):>6} {verdict:<8}"
            f"{batch.percentile(50):>10.1f}{batch.percentile(99):>8.1f}"
            f" ({'met' if batch.percentile(99) < 100 else 'NOT met'}: < 100 ms)"
        )


if __name__ == "__main__":
    main()
