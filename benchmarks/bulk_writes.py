"""Writing a refit's θⁱ rows: COPY (PostgreSQL) against the executemany INSERT, same run.

Creates a scratch PostgreSQL database, a model, a version and N users, then writes N θⁱ rows of
d float32 values (d = 65: nme-last on a 64-unit hidden layer) both ways inside one transaction
each, and prints seconds, rows/s, the ratio, and the table's bytes per row (so bytes per
version at a million users).

    .venv/bin/python benchmarks/bulk_writes.py [--users 100000] [--dim 65]
"""

from __future__ import annotations

import argparse
import time
import uuid

import numpy as np
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from service import migrate
from service.db import make_engine, make_session_factory
from service.storage import store
from service.storage.codec import encode_effects
from service.storage.tables import utcnow

ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=65)
    args = parser.parse_args()
    name = f"nme_bench_{uuid.uuid4().hex[:8]}"
    admin = create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    try:
        migrate.upgrade(url)
        engine = make_engine(url)
        sessions = make_session_factory(engine)
        effects = np.random.default_rng(0).normal(size=(args.users, args.dim)).astype(np.float32)
        with sessions() as session:
            model = store.add_model(session, name="m", task="regression", features=["a"],
                                    classes=None, states=None, architecture={}, training={})
            ids = store.ensure_users(session, external_ids=[f"u{k}" for k in range(args.users)])
            session.commit()
        rows = [{"user_id": ids[f"u{k}"], "effects": encode_effects(effects[k]), "n_obs": 10}
                for k in range(args.users)]
        timings = {}
        for method, threshold in (("insert", args.users + 1), ("copy", 1)):
            store.COPY_MIN_ROWS = threshold
            with sessions() as session:
                version = store.add_version(
                    session, model_id=model.id, metrics={}, artifact_path=f"m/{method}",
                    artifact_sha256="0" * 64, n_users=args.users, n_observations=0,
                    trained_until=utcnow(),
                )
                started = time.perf_counter()
                store.add_person_params(session, version_id=version.id, rows=rows)
                session.commit()
                timings[method] = time.perf_counter() - started
        with engine.connect() as connection:
            size = connection.execute(
                text("SELECT pg_total_relation_size('person_params')")
            ).scalar_one()
        engine.dispose()
        per_row = size / (2 * args.users)
        for method, seconds in timings.items():
            print(f"{method:6s} {args.users} rows × d={args.dim}: {seconds:.2f} s "
                  f"({args.users / seconds:,.0f} rows/s)")
        print(f"copy is {timings['insert'] / timings['copy']:.1f}× faster than insert")
        print(f"person_params: {per_row:.0f} bytes per row (table + indexes) → "
              f"{per_row * 1e6 / 2**20:,.0f} MiB per version at 1 000 000 users")
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


if __name__ == "__main__":
    main()
