"""How fast a user's labels become their personalised predictions.

Builds the demo (200 simulated users × 60 days, the demo's `mood` model, SQLite) and measures on
CPU, for a brand-new user with 10, 100 and 1 000 labels:

    update      the per-user update alone (``service.learning.user_update.update_user``: read
                the user's labels and θⁱ row, E-step with θ̄/σ²/Σ fixed, upsert the row) for a
                user without a row (the E-step starts at the prior), artifact cached, median of
                5 runs;
    end-to-end  POST the labels to the API → a running ``nme-service worker`` process (polling
                every 50 ms) claims the queued user_update and runs it → the first
                ``/predict`` answer with ``personalized: true`` (median of 3 runs, fresh user
                each time).

Target: the per-user update for 100 labels < 200 ms.

    .venv/bin/python benchmarks/user_update.py [--epochs 20]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import torch
from fastapi.testclient import TestClient
from sqlalchemy import delete, select

from service.app import create_app
from service.config import RateLimits, Settings
from service.db import make_engine, make_session_factory
from service.demo import FEATURES, prepare_demo
from service.learning.serving import Predictor
from service.learning.user_update import update_user
from service.storage.tables import Model, PersonParam, User

SIZES = (10, 100, 1000)


def items(user: str, n: int, rng: np.random.Generator) -> list[dict]:
    """``n`` labelled days of one user (mood ≈ 70 + noise)."""
    start = date(2030, 1, 1)
    return [
        {
            "user_id": user,
            "day": (start + timedelta(days=k)).isoformat(),
            "features": {name: float(rng.normal(1.0, 0.5)) for name in FEATURES},
            "label": float(70 + rng.normal(0, 5)),
        }
        for k in range(n)
    ]


def bench_update(settings: Settings, client: TestClient, headers: dict, n: int) -> float:
    """Median seconds of the per-user update for a user with ``n`` labels."""
    rng = np.random.default_rng(n)
    user = f"solo{n}"
    # Ingest with per-user updates off: the timing below runs the update itself.
    client.app.state.settings = settings.model_copy(update={"user_updates_on_ingest": False})
    for k in range(0, n, 1000):
        body = {"items": items(user, n, rng)[k : k + 1000]}
        assert client.post("/v1/models/mood/observations", json=body, headers=headers).is_success
    client.app.state.settings = settings
    engine = make_engine(settings.sqlalchemy_url)
    factory = make_session_factory(engine)
    predictor = Predictor(artifact_dir=settings.artifact_dir, device="cpu")
    with factory() as session:
        model_id = session.scalar(select(Model.id).where(Model.name == "mood"))
        user_id = session.scalar(select(User.id).where(User.external_id == user))
    assert model_id is not None and user_id is not None
    update_user(factory, predictor, model_id=model_id, user_id=user_id)  # warm-up + load
    times = []
    for _ in range(5):
        with factory() as session:  # a brand-new user each time: the E-step starts at the prior
            session.execute(delete(PersonParam).where(PersonParam.user_id == user_id))
            session.commit()
        started = time.perf_counter()
        update_user(factory, predictor, model_id=model_id, user_id=user_id)
        times.append(time.perf_counter() - started)
    engine.dispose()
    return statistics.median(times)


def bench_end_to_end(client: TestClient, headers: dict, n: int, run: int) -> float:
    """Seconds from POSTing ``n`` labels of a new user to their first personalised prediction."""
    rng = np.random.default_rng(1000 + n + run)
    user = f"e2e{n}-{run}"
    payload = items(user, n, rng)
    probe = {"items": [{"user_id": user, "features": payload[0]["features"]}]}
    started = time.perf_counter()
    for k in range(0, n, 1000):
        body = {"items": payload[k : k + 1000]}
        assert client.post("/v1/models/mood/observations", json=body, headers=headers).is_success
    while True:
        answer = client.post("/v1/models/mood/predict", json=probe, headers=headers).json()
        if answer["predictions"][0]["personalized"]:
            return time.perf_counter() - started
        if time.perf_counter() - started > 60:
            raise TimeoutError(f"user {user} not personalised after 60 s")
        time.sleep(0.005)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20, help="demo model training epochs")
    args = parser.parse_args()
    torch.set_num_threads(1)
    workdir = Path(tempfile.mkdtemp(prefix="nme-user-update-"))
    settings = Settings(
        database_url=f"sqlite:///{workdir / 'nme.sqlite3'}",
        artifact_dir=workdir / "artifacts",
        device="cpu",
        torch_threads=1,
        max_batch=1000,
        rate_limits=RateLimits(enabled=False),  # measure learning, not 429s
    )
    demo = prepare_demo(settings, max_epochs=args.epochs, log=lambda _m: None)
    headers = {"Authorization": f"Bearer {demo.key}"}
    env = {
        **os.environ,
        "NME_DATABASE_URL": settings.database_url,
        "NME_ARTIFACT_DIR": str(settings.artifact_dir),
        "NME_DEVICE": "cpu",
        "NME_JOB_POLL_SECONDS": "0.05",
        "NME_REFIT_MIN_NEW_LABELS": "0",
        "NME_REFIT_MAX_AGE_SECONDS": "0",
    }
    worker = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "worker"], env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        with TestClient(create_app(settings)) as client:
            rows = []
            for n in SIZES:
                update = bench_update(settings, client, headers, n)
                end_to_end = statistics.median(
                    bench_end_to_end(client, headers, n, run) for run in range(3)
                )
                rows.append((n, update, end_to_end))
    finally:
        worker.terminate()
        worker.wait(30)
    print(f"demo: 200 users × 60 days, model {demo.metrics.get('n_users')} users, CPU, "
          f"torch threads 1\n")
    print("| labels | per-user update (median of 5) | ingest → personalised prediction "
          "(median of 3) |")
    print("|---:|---:|---:|")
    for n, update, end_to_end in rows:
        print(f"| {n} | {update * 1000:.1f} ms | {end_to_end * 1000:.0f} ms |")
    target = dict((n, u) for n, u, _ in rows)[100]
    print(f"\ntarget per-user update for 100 labels < 200 ms: "
          f"{'met' if target < 0.2 else 'MISSED'} ({target * 1000:.1f} ms)")


if __name__ == "__main__":
    main()
