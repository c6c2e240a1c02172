"""A million users on one box: load, refit through the service's pipeline, serve.

1. Creates a scratch PostgreSQL database (migrated like production) and loads ``--users`` users
   × ``--days`` labelled days of a regression model with ``--features`` features, with COPY.
   Labels are a linear function of the features plus a per-user intercept and slope and noise.
   Every row is stamped two days old, so the refit queues no follow-up per-user updates (labels
   that changed while a refit trained get one; none did here).
2. Refits the model in a child process with ``service.jobs.tasks.refit_model`` — the pipeline
   ``nme-service refit`` runs: streamed read, fit, champion/challenger, artifact, one
   transaction writing the version and every θⁱ row (COPY). The child's wall time and peak RSS
   (``getrusage``) are the refit's; the read, fit and θⁱ-write phases are timed by wrapping the
   pipeline's own functions. ``pg_total_relation_size('person_params')`` before and after gives
   the bytes per version.
3. Serves the active version in process (the ASGI app through ``TestClient``, production
   serving caches, no rate limits): single-user and ``--batch``-user predicts for random users.
4. Repeats 1–3 with ``--small-users`` users (default 1 000) for the latency comparison: the same
   model, θⁱ table and requests, a thousand times fewer rows.

Optionally (``--compare-read``) it measures the refit's read alone in two more child processes:
the old whole read (every row as a Python object with its features as a dict, then arrays)
against the streamed one, peak RSS each, on the loaded database.

    .venv/bin/python benchmarks/million_users.py [--users 1000000] [--days 10] [--epochs 10]
        [--features 8] [--hidden 64,64] [--chunk-rows 50000] [--single 2000] [--batches 200]
        [--batch 1000] [--small-users 1000] [--compare-read] [--keep]
        > million_users.txt 2>&1

Targets (issue 15): refit under 10 minutes and 8 GB, θⁱ rows written in under 60 s, predict
p99 with a million θⁱ rows within 2× of the same with 1 000.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from pgdb import create_database, drop_database
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

ADMIN_URL = os.environ.get(
    "NME_BENCH_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
MODEL = "mood"
LOAD_USERS_PER_CHUNK = 20_000


def log(message: str) -> None:
    print(f"[{datetime.now(UTC):%H:%M:%S}] {message}", flush=True)


def maxrss_mib(who: int) -> float:
    """Peak resident set size of this process (``RUSAGE_SELF``) or of its waited-for children
    (``RUSAGE_CHILDREN``: the largest one), MiB (Linux reports KiB)."""
    return resource.getrusage(who).ru_maxrss / 1024


def cpu_seconds(who: int) -> float:
    """User + system CPU time of this process or of its waited-for children, seconds."""
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


# ------------------------------------------------------------------------------- database


def features_of(n: int) -> list[str]:
    return [f"f{k}" for k in range(n)]


def load(url: str, args: argparse.Namespace, n_users: int) -> tuple[str, float, dict[str, Any]]:
    """Migrate, create the model and an admin key, COPY users and observations.

    Returns ``(key, seconds to load the rows, the model's stored settings)``.
    """
    from service import migrate
    from service.db import make_engine, make_session_factory
    from service.learning.kinds import kind_for
    from service.storage import store
    from service.storage.keys import create_key

    migrate.upgrade(url)
    engine = make_engine(url)
    names = features_of(args.features)
    with make_session_factory(engine)() as session:
        key = create_key(session, name="bench", scopes=["admin", "ingest", "predict"])
        architecture, training = kind_for("regression").resolve_settings(
            {"hidden": args.hidden, "placement": "last", "method": "nme"},
            {"max_epochs": args.epochs, "batch_size": args.batch_size},
            n_features=args.features,
            labels=None,
        )
        model = store.add_model(
            session, name=MODEL, task="regression", features=names, classes=None,
            states=None, architecture=architecture, training=training,
        )
        session.commit()
        model_id = model.id
        stored = {"architecture": model.architecture, "training": model.training}
    started = time.perf_counter()
    rng = np.random.default_rng(args.seed)
    weights = rng.normal(size=args.features)  # (F,) the generic linear part
    stamp = (datetime.now(UTC) - timedelta(days=2)).isoformat()
    first_day = date(2026, 1, 1)
    day_text = [(first_day + timedelta(days=k)).isoformat() for k in range(args.days)]
    feature_json = ", ".join(f'"{name}": %.3f' for name in names)
    line = f"{model_id}\t%d\t%s\t{{{feature_json}}}\t%.3f\t{stamp}\t{stamp}\n"
    columns = "model_id, user_id, day, features, label, created_at, updated_at"
    raw = engine.raw_connection()
    try:
        cursor = raw.driver_connection.cursor()  # type: ignore[union-attr]
        with cursor.copy("COPY users (id, external_id, created_at) FROM STDIN") as copy:
            buffer = io.StringIO()
            for k in range(1, n_users + 1):
                buffer.write(f"{k}\tu{k:07d}\t{stamp}\n")
            copy.write(buffer.getvalue())
        cursor.execute("SELECT setval(pg_get_serial_sequence('users', 'id'), %s)", (n_users,))
        for start in range(0, n_users, LOAD_USERS_PER_CHUNK):
            m = min(LOAD_USERS_PER_CHUNK, n_users - start)
            intercept = rng.normal(0, 1.0, size=m)  # (m,) θⁱ bias
            slope = rng.normal(0, 0.5, size=m)  # (m,) θⁱ on feature 0
            x = rng.normal(size=(m, args.days, args.features))  # (m, D, F)
            y = (
                x @ weights + intercept[:, None] + slope[:, None] * x[:, :, 0]
                + rng.normal(0, 0.5, size=(m, args.days))
            )  # (m, D)
            users = np.repeat(np.arange(start + 1, start + m + 1), args.days).tolist()
            days = day_text * m
            values = x.reshape(m * args.days, args.features).T.tolist()
            rows = zip(users, days, *values, y.ravel().tolist(), strict=True)
            with cursor.copy(f"COPY observations ({columns}) FROM STDIN") as copy:
                copy.write("".join(line % row for row in rows))
            if (start // LOAD_USERS_PER_CHUNK) % 10 == 0:
                log(f"  loaded {start + m:,} users")
        raw.commit()
        cursor.execute("ANALYZE")
        raw.commit()
    finally:
        raw.close()
    engine.dispose()
    return key, time.perf_counter() - started, stored


def table_bytes(url: str, table: str) -> int:
    engine = create_engine(url)
    with engine.connect() as connection:
        size = connection.execute(
            text("SELECT pg_total_relation_size(:t)"), {"t": table}
        ).scalar_one()
    engine.dispose()
    return int(size)


# ------------------------------------------------------------------------------- refit child


def refit_child(url: str, artifact_dir: str, chunk_rows: int) -> None:
    """Run in its own process: the ``nme-service refit`` pipeline, with its phases timed."""
    import torch

    from service.db import make_engine, make_session_factory
    from service.jobs.tasks import refit_model
    from service.learning import refit
    from service.learning.kinds.tabular import TabularKind
    from service.storage import store

    torch.set_num_threads(1)  # NME_TORCH_THREADS' default for `nme-service refit`
    phases: dict[str, float] = {}
    rss: dict[str, float] = {}

    def timed(owner: Any, name: str, label: str) -> None:
        inner = getattr(owner, name)

        def wrapper(*a: Any, **k: Any) -> Any:
            started = time.perf_counter()
            try:
                return inner(*a, **k)
            finally:
                phases[label] = phases.get(label, 0.0) + time.perf_counter() - started
                rss[label] = maxrss_mib(resource.RUSAGE_SELF)

        setattr(owner, name, wrapper)

    timed(TabularKind, "load_training_data", "read")
    timed(refit, "train_version", "train_version")
    timed(refit, "record_version", "record_version")
    timed(store, "add_person_param_arrays", "copy_theta")
    timed(store, "users_with_data", "users_with_data")
    engine = make_engine(url)
    started = time.perf_counter()
    version = refit_model(
        make_session_factory(engine), model_name=MODEL, artifact_dir=Path(artifact_dir),
        device="cpu", activate=True, follow_up_updates=True, chunk_rows=chunk_rows,
    )
    total = time.perf_counter() - started
    engine.dispose()
    print(json.dumps({
        "total_seconds": total,
        "phases": phases,
        "peak_rss_mib_after": rss,
        "peak_rss_mib": maxrss_mib(resource.RUSAGE_SELF),
        # On a shared machine the wall time depends on the neighbours; CPU time much less.
        "cpu_seconds": cpu_seconds(resource.RUSAGE_SELF),
        "version": version.version,
        "status": version.status,
        "metrics": version.metrics,
    }))


def run_refit(url: str, artifact_dir: Path, chunk_rows: int) -> dict[str, Any]:
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, __file__, "--refit-child", url, str(artifact_dir), str(chunk_rows)],
        capture_output=True, text=True, check=False,
    )
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"refit child failed:\n{done.stdout}\n{done.stderr}")
    report = json.loads(done.stdout.strip().splitlines()[-1])
    report["wall_seconds"] = wall  # including the child's imports
    report["children_peak_rss_mib"] = maxrss_mib(resource.RUSAGE_CHILDREN)
    return report


# ------------------------------------------------------------------------------- read compare


def read_child(url: str, mode: str, chunk_rows: int) -> None:
    """Run in its own process: one way of reading the refit's data, with peak RSS."""
    from sqlalchemy import select

    from service.db import make_engine, make_session_factory
    from service.learning.kinds import kind_of
    from service.learning.kinds.base import temporal_split
    from service.storage import store
    from service.storage.tables import Observation, User

    engine = make_engine(url)
    started = time.perf_counter()
    with make_session_factory(engine)() as session:
        model = store.get_model(session, name=MODEL)
        assert model is not None
        if mode == "streamed":
            data = kind_of(model).load_training_data(session, model=model, chunk_rows=chunk_rows)
            shape = (data.x_train.shape, data.x_val.shape)
        else:  # the read before streaming: a list of every row, features as dicts
            rows = list(session.execute(
                select(User.external_id, Observation.user_id, Observation.day,
                       Observation.features, Observation.label)
                .join(User, User.id == Observation.user_id)
                .where(Observation.model_id == model.id, Observation.label.is_not(None))
                .order_by(User.external_id, Observation.day)
            ))
            persons = [row.external_id for row in rows]
            x = np.array([[row.features[n] for n in model.features] for row in rows], np.float32)
            y = np.asarray([row.label for row in rows], dtype=np.float64)
            is_val = temporal_split(persons)
            shape = (x[~is_val].shape, x[is_val].shape)
            del y
    print(json.dumps({"mode": mode, "seconds": time.perf_counter() - started,
                      "peak_rss_mib": maxrss_mib(resource.RUSAGE_SELF), "shape": str(shape)}))


def compare_read(url: str, chunk_rows: int) -> list[dict[str, Any]]:
    out = []
    for mode in ("whole", "streamed"):
        done = subprocess.run(
            [sys.executable, __file__, "--read-child", url, mode, str(chunk_rows)],
            capture_output=True, text=True, check=False,
        )
        if done.returncode != 0:
            out.append({"mode": mode, "error": done.stderr[-2000:]})
        else:
            out.append(json.loads(done.stdout.strip().splitlines()[-1]))
        log(f"  read {mode}: {out[-1]}")
    return out


# ------------------------------------------------------------------------------- serving


def serve(url: str, artifact_dir: Path, key: str, n_users: int, args: argparse.Namespace
          ) -> dict[str, dict[str, float]]:
    """Latency of single-user and batch predicts for random users, in process."""
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.config import RateLimits, Settings

    settings = Settings(
        database_url=url, artifact_dir=artifact_dir, device="cpu",
        max_batch=max(args.batch, 1000), rate_limits=RateLimits(enabled=False),
    )
    rng = np.random.default_rng(args.seed + 1)
    headers = {"Authorization": f"Bearer {key}"}
    names = features_of(args.features)

    def body(users: np.ndarray) -> dict[str, Any]:
        x = rng.normal(size=(len(users), args.features)).round(3).tolist()
        return {"items": [
            {"user_id": f"u{int(u):07d}", "features": dict(zip(names, row, strict=True))}
            for u, row in zip(users, x, strict=True)
        ]}

    def measure(client: TestClient, count: int, size: int) -> dict[str, float]:
        bodies = [body(rng.choice(np.arange(1, n_users + 1), size=size, replace=False))
                  for _ in range(count)]
        times = []
        for payload in bodies:
            started = time.perf_counter()
            response = client.post(f"/v1/models/{MODEL}/predict", json=payload, headers=headers)
            times.append(time.perf_counter() - started)
            assert response.status_code == 200, response.text
            answer = response.json()
            assert all(p["personalized"] for p in answer["predictions"]), "θⁱ missing"
        ms = np.asarray(times) * 1000
        return {"n": count, "p50_ms": float(np.percentile(ms, 50)),
                "p99_ms": float(np.percentile(ms, 99)), "mean_ms": float(ms.mean())}

    with TestClient(create_app(settings)) as client:
        measure(client, 50, 1)  # warm: model load, caches, connection pool
        measure(client, 5, min(args.batch, n_users))
        return {
            "single": measure(client, args.single, 1),
            f"batch{args.batch}": measure(client, args.batches, min(args.batch, n_users)),
        }


# ------------------------------------------------------------------------------- main


def reuse(url: str) -> tuple[str, dict[str, Any]]:
    """A new admin key and the model's stored settings in a database an earlier run loaded
    (``--url``; a version it refitted stays, the refit adds the next one)."""
    from service.db import make_engine, make_session_factory
    from service.storage import store
    from service.storage.keys import create_key

    engine = make_engine(url)
    with make_session_factory(engine)() as session:
        key = create_key(session, name="bench-reuse", scopes=["admin", "ingest", "predict"])
        model = store.get_model(session, name=MODEL)
        assert model is not None  # an active version stays until the refit replaces it
        stored = {"architecture": model.architecture, "training": model.training}
        session.commit()
    engine.dispose()
    return key, stored


def run_size(
    n_users: int, args: argparse.Namespace, work: Path, url: str | None = None
) -> dict[str, Any]:
    loaded = url is not None
    url = url or create_database(ADMIN_URL, prefix="nme_million")
    log(f"database {make_url(url).database}: {n_users:,} users × {args.days} days")
    result: dict[str, Any] = {"users": n_users, "days": args.days}
    try:
        if loaded:
            key, result["settings"] = reuse(url)
            result["load_seconds"] = float("nan")  # loaded by an earlier run
        else:
            key, result["load_seconds"], result["settings"] = load(url, args, n_users)
        result["observations_bytes"] = table_bytes(url, "observations")
        log(f"loaded in {result['load_seconds']:.1f} s "
            f"(observations {result['observations_bytes'] / 2**20:,.0f} MiB)")
        if args.compare_read and n_users == args.users:
            result["read_compare"] = compare_read(url, args.chunk_rows)
        if args.read_only:
            return result
        before = table_bytes(url, "person_params")
        artifact_dir = work / f"artifacts-{n_users}"
        log("refit …")
        result["refit"] = run_refit(url, artifact_dir, args.chunk_rows)
        after = table_bytes(url, "person_params")
        result["person_params_bytes"] = after - before
        result["bytes_per_user"] = (after - before) / n_users
        log(f"refit: {json.dumps(result['refit'])}")
        log("serving …")
        result["serve"] = serve(url, artifact_dir, key, n_users, args)
        log(f"serve: {json.dumps(result['serve'])}")
    finally:
        if args.keep or loaded:
            log(f"kept {url}")
        else:
            drop_database(ADMIN_URL, url)
    return result


def summary(big: dict[str, Any], small: dict[str, Any] | None, args: argparse.Namespace) -> str:
    refit = big["refit"]
    phases = refit["phases"]
    m = refit["metrics"]
    lines = [
        "",
        "=" * 78,
        f"million_users summary: {big['users']:,} users × {big['days']} days "
        f"({big['users'] * big['days']:,} labelled rows), {args.features} features",
        f"model (regression, as stored): {json.dumps(big['settings'])}",
        f"device cpu, 1 torch thread, NME_REFIT_CHUNK_ROWS={args.chunk_rows}",
        f"load (COPY users + observations): {big['load_seconds']:.1f} s; observations table "
        f"{big['observations_bytes'] / 2**20:,.0f} MiB",
        f"refit wall (child process, incl. imports): {refit['wall_seconds']:.1f} s "
        f"[target < 600 s]; pipeline {refit['total_seconds']:.1f} s; CPU "
        f"{refit.get('cpu_seconds', float('nan')):.1f} s",
        f"  read (streamed) {phases.get('read', 0):.1f} s, train_version (read + fit + "
        f"artifact) {phases.get('train_version', 0):.1f} s, fit {m.get('fit_seconds')} s "
        f"over {m.get('epochs')} epochs",
        f"  record_version {phases.get('record_version', 0):.1f} s, of which θⁱ COPY "
        f"{phases.get('copy_theta', 0):.1f} s [target < 60 s] and the check that the users "
        f"still have data {phases.get('users_with_data', 0):.1f} s",
        f"refit peak RSS: {refit['peak_rss_mib']:,.0f} MiB (child getrusage RUSAGE_SELF; "
        f"RUSAGE_CHILDREN {refit['children_peak_rss_mib']:,.0f} MiB) [target < 8 192 MiB]; "
        f"after the read {refit['peak_rss_mib_after'].get('read', 0):,.0f} MiB",
        f"version {refit['version']} {refit['status']}: n_train {m.get('n_train')}, n_val "
        f"{m.get('n_val')}, val_score {m.get('val_score')} ({m.get('score_name')}), generic "
        f"{m.get('val_score_generic')}",
        f"θⁱ rows: person_params grew {big['person_params_bytes'] / 2**20:,.1f} MiB = "
        f"{big['bytes_per_user']:.0f} bytes per user per version → "
        f"{big['bytes_per_user'] * 1e6 / 2**20:,.0f} MiB per version at 1 000 000 users",
    ]
    if "read_compare" in big:
        for r in big["read_compare"]:
            if "error" in r:
                lines.append(f"read {r['mode']}: failed ({r['error'][-200:]!r})")
            else:
                lines.append(f"read {r['mode']}: {r['seconds']:.1f} s, peak RSS "
                             f"{r['peak_rss_mib']:,.0f} MiB")
    header = f"{'predict':<12} {'θⁱ rows':>10} {'n':>6} {'p50 ms':>8} {'p99 ms':>8}"
    lines += ["", header]
    for result in (big, small):
        if result is None:
            continue
        for name, s in result["serve"].items():
            lines.append(f"{name:<12} {result['users']:>10,} {s['n']:>6} {s['p50_ms']:>8.2f} "
                         f"{s['p99_ms']:>8.2f}")
    if small is not None:
        for name in big["serve"]:
            ratio = big["serve"][name]["p99_ms"] / small["serve"][name]["p99_ms"]
            lines.append(f"p99 ratio {name}: {ratio:.2f}× [target ≤ 2×]")
        lines.append(f"(small run's refit: {small['refit']['wall_seconds']:.1f} s, peak RSS "
                     f"{small['refit']['peak_rss_mib']:,.0f} MiB)")
    lines.append("=" * 78)
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--refit-child":
        refit_child(sys.argv[2], sys.argv[3], int(sys.argv[4]))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--read-child":
        read_child(sys.argv[2], sys.argv[3], int(sys.argv[4]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--days", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--features", type=int, default=8)
    parser.add_argument("--hidden", type=lambda s: [int(v) for v in s.split(",")],
                        default=[64, 64])
    parser.add_argument("--batch-size", type=int, default=512, help="training mini-batch")
    parser.add_argument("--chunk-rows", type=int, default=50_000)
    parser.add_argument("--single", type=int, default=2000, help="single-user predicts")
    parser.add_argument("--batches", type=int, default=200, help="batch predicts")
    parser.add_argument("--batch", type=int, default=1000, help="users per batch predict")
    parser.add_argument("--small-users", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compare-read", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the scratch databases")
    parser.add_argument("--url", help="reuse a database an earlier run loaded (with --keep, "
                        "or left behind by an interrupted run) with --users users; kept")
    parser.add_argument("--read-only", action="store_true",
                        help="only load and --compare-read (no refit, no serving)")
    args = parser.parse_args()
    if args.read_only:
        args.compare_read, args.small_users = True, 0
    with tempfile.TemporaryDirectory(prefix="nme-million-") as tmp:
        work = Path(tmp)
        big = run_size(args.users, args, work, args.url)
        small = run_size(args.small_users, args, work) if args.small_users else None
    if args.read_only:
        print(json.dumps(big["read_compare"]), flush=True)
        return
    print(summary(big, small, args), flush=True)
    print(json.dumps({"big": big, "small": small}, default=str))


if __name__ == "__main__":
    main()
