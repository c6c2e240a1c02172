"""Two API processes and a worker on one PostgreSQL database, under load, with an activation in
the middle (outside CI: it takes about a minute and a half and wants a quiet machine).

Builds the demo model on a fresh PostgreSQL database twice (version 1 from simulated labels,
version 2 after those labels were replaced by another simulation), activates version 1, and
starts ``nme-service worker`` plus uvicorn API processes on 127.0.0.1 that share the database
and the artifact directory, with the production defaults of the serving caches. A bounded
asyncio load generator (``--connections`` keep-alive connections, spread round-robin over the
API processes, each sending back to back) posts predict requests of ``--batch`` users:

1. one API process for ``--duration`` seconds (the baseline);
2. two API processes for ``--duration`` seconds; half-way through, version 2 is activated
   through process 1's API.

It prints, per phase, the requests, errors (anything but HTTP 200, with the first few listed),
throughput and p50/p99 latency, and the ratio of two processes to one; then the activation:
how long after the activation's answer each process last served version 1 (the bound is
``NME_ACTIVE_VERSION_TTL_SECONDS``, 1 s by default; the activating process: at once), and
whether any batch mixed versions — every answer's predictions must equal, to 1e-6, the
reference answer of the version it names for that request body.

    .venv/bin/python benchmarks/load_two_processes.py [--duration 24] [--connections 16]
        [--batch 10] [--postgres-url postgresql://postgres@127.0.0.1/test]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
from serve import DEFAULT_POSTGRES_URL, database, free_port, predict_body, start_server

from service.config import Settings
from service.db import make_engine, make_session_factory
from service.demo import prepare_demo
from service.storage import store

ROOT = Path(__file__).resolve().parents[1]
PREDICT = "/v1/models/mood/predict"


@dataclass
class Answer:
    """One request's outcome."""

    process: int
    body: int
    sent: float  # monotonic, when the request was written
    done: float  # monotonic, when the answer was read
    status: int
    version: int | None = None
    predictions: list[float] | None = None


@dataclass
class Phase:
    """What one load phase observed."""

    processes: int
    seconds: float
    answers: list[Answer] = field(default_factory=list)
    activated_at: float | None = None  # monotonic, when the activation's answer arrived

    @property
    def ok(self) -> list[Answer]:
        return [a for a in self.answers if a.status == 200]

    @property
    def errors(self) -> list[Answer]:
        return [a for a in self.answers if a.status != 200]

    @property
    def rps(self) -> float:
        return len(self.answers) / self.seconds

    def percentile(self, q: float) -> float:
        return float(np.percentile([a.done - a.sent for a in self.answers], q) * 1000)


def request_bytes(port: int, key: str, body: bytes) -> bytes:
    head = (
        f"POST {PREDICT} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Authorization: Bearer {key}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def read_answer(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return int(head[9:12]), await reader.readexactly(length)


async def connection(
    process: int, port: int, payloads: list[bytes], until: float, phase: Phase, offset: int
) -> None:
    """One keep-alive connection cycling through the request bodies until ``until``."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    k = offset
    try:
        while time.monotonic() < until:
            body = k % len(payloads)
            k += 1
            sent = time.monotonic()
            writer.write(payloads[body])
            status, raw = await read_answer(reader)
            answer = Answer(process, body, sent, time.monotonic(), status)
            if status == 200:
                decoded = json.loads(raw)
                answer.version = decoded["version"]
                answer.predictions = [p["prediction"] for p in decoded["predictions"]]
            phase.answers.append(answer)
    finally:
        writer.close()


async def run_phase(
    ports: list[int],
    key: str,
    bodies: list[bytes],
    args: argparse.Namespace,
    activate_version: int | None = None,
) -> Phase:
    """Load on every port for ``args.duration`` s; optionally activate a version half-way
    through, through the first process's API."""
    phase = Phase(len(ports), args.duration)
    per_port = {port: [request_bytes(port, key, b) for b in bodies] for port in ports}
    start = time.monotonic()
    until = start + args.duration
    loops = [
        connection(c % len(ports), ports[c % len(ports)], per_port[ports[c % len(ports)]],
                   until, phase, offset=c)
        for c in range(args.connections)
    ]

    async def activate() -> None:
        await asyncio.sleep(args.duration / 2)
        async with httpx.AsyncClient(timeout=30) as http:
            response = await http.post(
                f"http://127.0.0.1:{ports[0]}/v1/models/mood/versions/{activate_version}/activate",
                headers={"Authorization": f"Bearer {key}"},
            )
        response.raise_for_status()
        phase.activated_at = time.monotonic()

    tasks = [*loops] + ([activate()] if activate_version is not None else [])
    await asyncio.gather(*tasks)
    phase.seconds = time.monotonic() - start
    return phase


def reference(port: int, key: str, bodies: list[bytes]) -> tuple[int, list[list[float]]]:
    """The version a process serves and its predictions for every body, asked one at a time."""
    answers = []
    version = None
    with httpx.Client(timeout=30) as http:
        for body in bodies:
            response = http.post(
                f"http://127.0.0.1:{port}{PREDICT}",
                content=body,
                headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
            )
            response.raise_for_status()
            decoded = response.json()
            assert version in (None, decoded["version"])
            version = decoded["version"]
            answers.append([p["prediction"] for p in decoded["predictions"]])
    assert version is not None
    return version, answers


def start_worker(settings: Settings, log: Path) -> subprocess.Popen:
    env = {
        **os.environ,
        "NME_DATABASE_URL": settings.database_url,
        "NME_ARTIFACT_DIR": str(settings.artifact_dir),
        "NME_DEVICE": "cpu",
        "NME_TORCH_THREADS": "1",
        "NME_LOG_LEVEL": "warning",
    }
    return subprocess.Popen(
        [sys.executable, "-m", "service.cli", "worker", "--name", "load"],
        cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
    )


def print_phase(name: str, phase: Phase) -> None:
    print(
        f"{name:<16}{len(phase.answers):>9}{len(phase.errors):>8}{phase.rps:>9.0f}"
        f"{phase.percentile(50):>9.1f}{phase.percentile(99):>9.1f}"
    )
    for error in phase.errors[:5]:
        print(f"    error: process {error.process + 1}, HTTP {error.status}")


def close(answer: list[float], expected: list[float]) -> bool:
    return all(abs(a - b) <= 1e-6 * max(1.0, abs(b)) for a, b in zip(answer, expected, strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=24.0, help="seconds per phase")
    parser.add_argument("--connections", type=int, default=16, help="concurrent connections")
    parser.add_argument("--batch", type=int, default=10, help="users per predict request")
    parser.add_argument("--users", type=int, default=200, help="simulated demo users")
    parser.add_argument("--postgres-url", default=DEFAULT_POSTGRES_URL)
    args = parser.parse_args()

    with (
        tempfile.TemporaryDirectory(prefix="nme-load-") as tmp,
        database("postgres", Path(tmp), args.postgres_url) as url,
    ):
        settings = Settings(database_url=url, artifact_dir=Path(tmp) / "artifacts", device="cpu")
        demo = prepare_demo(settings, n_users=args.users, max_epochs=20, log=lambda _m: None)
        prepare_demo(settings, n_users=args.users, max_epochs=20, seed=1, log=lambda _m: None)
        engine = make_engine(settings.sqlalchemy_url)
        with make_session_factory(engine)() as session:
            model = store.get_model(session, name="mood")
            assert model is not None
            first = store.get_version(session, model_id=model.id, version=1)
            assert first is not None
            store.activate_version(session, version=first)
            session.commit()
        engine.dispose()
        bodies = [
            predict_body(args.batch, args.users, seed=s) for s in range(8)
        ]
        worker = start_worker(settings, Path(tmp) / "worker.log")
        servers: list[subprocess.Popen] = []
        try:
            ports = [free_port(), free_port()]
            servers.append(start_server(settings, ports[0]))
            _, before = reference(ports[0], demo.key, bodies)
            single = asyncio.run(run_phase(ports[:1], demo.key, bodies, args))
            servers.append(start_server(settings, ports[1]))
            v1, check = reference(ports[1], demo.key, bodies)
            assert v1 == 1 and all(map(close, check, before))
            pair = asyncio.run(run_phase(ports, demo.key, bodies, args, activate_version=2))
            v2, after = reference(ports[1], demo.key, bodies)
            assert v2 == 2
        finally:
            for process in [*servers, worker]:
                process.terminate()
            for process in [*servers, worker]:
                process.wait(timeout=30)

    print(
        f"\nload: PostgreSQL, demo model ({args.users} users), {args.batch} users per request, "
        f"{args.connections} connections, {os.cpu_count()} CPUs, {args.duration:.0f} s per phase\n"
    )
    print(f"{'phase':<16}{'requests':>9}{'errors':>8}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}")
    print_phase("1 API process", single)
    print_phase("2 API processes", pair)
    print(
        f"\n2 processes vs 1: throughput {pair.rps / single.rps:.2f}×, "
        f"p99 {pair.percentile(99) / single.percentile(99):.2f}×"
    )

    assert pair.activated_at is not None
    references = {1: before, 2: after}
    mixed = [
        a for phase in (single, pair) for a in phase.ok
        if a.version not in references
        or not close(a.predictions or [], references[a.version][a.body])
    ]
    print(f"\nactivation of version 2 through process 1, {args.duration / 2:.0f} s into phase 2:")
    for process in range(2):
        # an answer of version 1 sent after the activation's answer arrived is a stale one
        stale = [
            a for a in pair.ok
            if a.process == process and a.version == 1 and a.sent >= pair.activated_at
        ]
        fresh = [
            a for a in pair.ok
            if a.process == process and a.version == 2 and a.done >= pair.activated_at
        ]
        last = max((a.done for a in stale), default=None)
        switch = "at once" if last is None else f"{last - pair.activated_at:.3f} s"
        print(
            f"  process {process + 1}: last version-1 answer to a request sent after the "
            f"activation: {switch} ({len(stale)} such answers; {len(fresh)} answers from v2)"
        )
    print(
        f"  batches mixing versions (answers off both versions' references): {len(mixed)} of "
        f"{len(single.ok) + len(pair.ok)}"
    )
    errors = len(single.errors) + len(pair.errors)
    print(f"  errors: {errors}")


if __name__ == "__main__":
    main()
