"""Writing a refit's θⁱ rows on PostgreSQL: executemany INSERT, text COPY row by row, and the
refit's binary COPY from arrays, same run.

Creates a scratch PostgreSQL database, a model, a version per method and N users, then writes N
θⁱ rows of d float32 values plus their posterior variances (d = 65: nme-last on a 64-unit
hidden layer) each way inside one transaction, and prints seconds, rows/s, the ratios, and the
table's growth per version (pg_total_relation_size before and after: bytes per user, so bytes
per version at a million users).

    .venv/bin/python benchmarks/bulk_writes.py [--users 100000] [--dim 65] [--skip-insert]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from pgdb import create_database, drop_database
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

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
    parser.add_argument("--skip-insert", action="store_true", help="slow at a million rows")
    args = parser.parse_args()
    url = create_database(ADMIN_URL)
    try:
        migrate.upgrade(url)
        engine = make_engine(url)
        sessions = make_session_factory(engine)
        rng = np.random.default_rng(0)
        effects = rng.normal(size=(args.users, args.dim)).astype(np.float32)  # (n, d)
        variances = rng.uniform(size=(args.users, args.dim)).astype(np.float32)  # (n, d)
        n_obs = np.full(args.users, 8)
        with sessions() as session:
            model = store.add_model(session, name="m", task="regression", features=["a"],
                                    classes=None, states=None, architecture={}, training={})
            ids = store.ensure_users(session, external_ids=[f"u{k}" for k in range(args.users)])
            session.commit()
        user_ids = np.array([ids[f"u{k}"] for k in range(args.users)], dtype=np.int64)

        def rows() -> list[dict]:  # what the refit built before it wrote from arrays
            return [{"user_id": int(user_ids[k]), "effects": encode_effects(effects[k]),
                     "effects_var": encode_effects(variances[k]), "n_obs": 8}
                    for k in range(args.users)]

        def write_rows(session: Session, version_id: int) -> None:
            store.add_person_params(session, version_id=version_id, rows=rows())

        def write_arrays(session: Session, version_id: int) -> None:
            store.add_person_param_arrays(
                session, version_id=version_id, user_ids=user_ids,
                effects=effects, effects_var=variances, n_obs=n_obs,
            )

        methods = [("insert", args.users + 1, write_rows), ("copy", 1, write_rows),
                   ("binary", 1, write_arrays)]
        if args.skip_insert:
            methods = methods[1:]
        timings, sizes = {}, {}
        for method, threshold, write in methods:
            store.COPY_MIN_ROWS = threshold
            before = table_size(engine)
            with sessions() as session:
                version = store.add_version(
                    session, model_id=model.id, metrics={}, artifact_path=f"m/{method}",
                    artifact_sha256="0" * 64, n_users=args.users, n_observations=0,
                    trained_until=utcnow(),
                )
                started = time.perf_counter()
                write(session, version.id)
                session.commit()
                timings[method] = time.perf_counter() - started
            sizes[method] = table_size(engine) - before
        engine.dispose()
        for method, seconds in timings.items():
            print(f"{method:6s} {args.users} rows × d={args.dim} (θⁱ + variances): "
                  f"{seconds:.2f} s ({args.users / seconds:,.0f} rows/s, incl. building the "
                  f"rows); table grew {sizes[method] / args.users:.0f} bytes per row")
        for method in timings:
            if method != "binary":
                print(f"binary COPY is {timings[method] / timings['binary']:.1f}× faster "
                      f"than {method}")
        per_row = sizes["binary"] / args.users
        print(f"person_params: {per_row:.0f} bytes per row (table + TOAST + indexes) → "
              f"{per_row * 1e6 / 2**20:,.0f} MiB per version at 1 000 000 users")
    finally:
        drop_database(ADMIN_URL, url)


def table_size(engine: Engine) -> int:
    with engine.connect() as connection:
        return int(connection.execute(
            text("SELECT pg_total_relation_size('person_params')")
        ).scalar_one())


if __name__ == "__main__":
    main()
