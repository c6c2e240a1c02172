"""Races answer 409 or succeed in order, never 500: parallel requests through a real HTTP
server (uvicorn in a thread, one connection per client thread), on SQLite and PostgreSQL."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import uvicorn
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from service.app import create_app
from service.config import Settings
from service.storage import store
from service.storage.artifacts import artifact_sha256
from service.storage.tables import Model, ModelVersion, utcnow
from tests.service.factories import model_payload

THREADS = 8


@contextmanager
def serve(settings: Settings) -> Iterator[str]:
    """The app on a free port of 127.0.0.1; yields its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(settings), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def in_parallel(requests: list[Callable[[httpx.Client], httpx.Response]]) -> list[int]:
    """Run each request on its own thread and connection, released together by a barrier."""
    barrier = threading.Barrier(len(requests))

    def run(request: Callable[[httpx.Client], httpx.Response]) -> int:
        with httpx.Client(timeout=30) as client:
            barrier.wait()
            return request(client).status_code

    with ThreadPoolExecutor(len(requests)) as pool:
        return list(pool.map(run, requests))


def test_concurrent_creations_of_one_name_give_one_201_and_409s(
    settings: Settings, auth: Callable, session_factory: sessionmaker[Session]
) -> None:
    with serve(settings) as url:
        for round_ in range(3):
            payload = model_payload(name=f"race{round_}")
            statuses = in_parallel(
                [
                    lambda c, p=payload: c.post(f"{url}/v1/models", json=p, headers=auth("admin"))
                    for _ in range(THREADS)
                ]
            )
            assert sorted(statuses) == [201] + [409] * (THREADS - 1), statuses
    with session_factory() as session:
        assert len(session.scalars(select(Model)).all()) == 3


def test_concurrent_activations_leave_exactly_one_active_version(
    settings: Settings, auth: Callable, session_factory: sessionmaker[Session]
) -> None:
    with serve(settings) as url:
        response = httpx.post(f"{url}/v1/models", json=model_payload(), headers=auth("admin"))
        assert response.status_code == 201
        with session_factory() as session:
            model = session.scalar(select(Model).where(Model.name == "mood"))
            for k in range(THREADS):  # rows, and artifacts that pass activation's check
                folder = settings.artifact_dir / "mood" / f"v{k}"
                folder.mkdir(parents=True)
                (folder / "config.json").write_text("{}")
                store.add_version(
                    session,
                    model_id=model.id,
                    metrics={},
                    artifact_path=f"mood/v{k}",
                    artifact_sha256=artifact_sha256(folder),
                    n_users=0,
                    n_observations=0,
                    trained_until=utcnow(),
                )
            session.commit()
        for _ in range(5):
            statuses = in_parallel(
                [
                    lambda c, v=v: c.post(
                        f"{url}/v1/models/mood/versions/{v}/activate", headers=auth("admin")
                    )
                    for v in range(1, THREADS + 1)
                ]
            )
            assert set(statuses) <= {200, 409}, statuses
            assert 200 in statuses
            with session_factory() as session:
                active = session.scalars(
                    select(ModelVersion.version).where(ModelVersion.status == "active")
                ).all()
            assert len(active) == 1, active
