"""``nme-service serve | migrate | create-key | list-keys | revoke-key | refit | demo | worker``."""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

from sqlalchemy.orm import Session

from service import migrate
from service.api.schemas import MODEL_NAME_PATTERN
from service.auth import parse_scopes
from service.config import Settings
from service.db import make_engine, make_session_factory
from service.errors import ServiceError


def _serve(settings: Settings, host: str, port: int, workers: int) -> None:
    import uvicorn

    # The factory runs in each worker process, reading the same NME_* environment.
    uvicorn.run(
        "service.app:create_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level=settings.log_level,
    )


def cmd_serve(settings: Settings, args: argparse.Namespace) -> int:
    """Run the API with uvicorn."""
    _serve(settings, args.host or settings.host, args.port or settings.port, args.workers)
    return 0


def cmd_migrate(settings: Settings, args: argparse.Namespace) -> int:
    """Upgrade the database to the newest schema (or to --revision)."""
    migrate.upgrade(settings.database_url, args.revision)
    print(f"database at revision {args.revision} ({_redacted(settings.database_url)})")
    return 0


def cmd_create_key(settings: Settings, args: argparse.Namespace) -> int:
    """Create an API key and print it (it is not stored, only its hash)."""
    from service.storage.keys import create_key

    scopes = parse_scopes(args.scopes)
    models = parse_models(args.models) if args.models is not None else None
    with _session(settings) as session:
        key = create_key(session, name=args.name, scopes=scopes, models=models)
        session.commit()
    print(key)
    reach = f"models {','.join(models)}" if models is not None else "every model"
    print(
        f"# key {args.name!r} with scopes {','.join(scopes)} for {reach}: store it now, "
        "it is shown once",
        file=sys.stderr,
    )
    return 0


def parse_models(text: str) -> list[str]:
    """``"mood,affect"`` → model names (each must be a valid model name)."""
    names = sorted({part.strip() for part in text.split(",") if part.strip()})
    bad = [name for name in names if re.fullmatch(MODEL_NAME_PATTERN, name) is None]
    if not names or bad:
        raise ServiceError(
            f"--models needs comma-separated model names; not a model name: {', '.join(bad)}"
            if bad else "--models needs at least one model name"
        )
    return names


def cmd_list_keys(settings: Settings, args: argparse.Namespace) -> int:
    """Print every key's prefix, name, scopes, models and state (never the key itself)."""
    from service.storage import store

    with _session(settings) as session:
        keys = store.list_api_keys(session)
    rows = [("PREFIX", "NAME", "SCOPES", "MODELS", "CREATED", "REVOKED")]
    rows += [
        (
            key.prefix,
            key.name,
            ",".join(sorted(key.scopes)),
            ",".join(key.models) if key.models is not None else "*",
            f"{key.created_at:%Y-%m-%d %H:%M}",
            f"{key.revoked_at:%Y-%m-%d %H:%M}" if key.revoked_at else "-",
        )
        for key in keys
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
    return 0


def cmd_revoke_key(settings: Settings, args: argparse.Namespace) -> int:
    """Revoke a key by its full value or its public prefix."""
    from service.storage.keys import revoke_key

    with _session(settings) as session:
        found = revoke_key(session, key_or_prefix=args.key)
        session.commit()
    if not found:
        print(f"no API key matches {args.key!r}", file=sys.stderr)
        return 1
    print("revoked")
    return 0


def _limit_torch_threads(settings: Settings) -> None:
    import torch

    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)


def cmd_refit(settings: Settings, args: argparse.Namespace) -> int:
    """Train and activate a new version of a model, printing progress per epoch."""
    from service.jobs.tasks import refit_model

    _limit_torch_threads(settings)

    def progress(record: dict) -> None:
        print(
            json.dumps(
                {k: record.get(k) for k in ("epoch", "train_loss", "val_loss", "val_metric")}
            ),
            file=sys.stderr,
        )

    engine = make_engine(settings.sqlalchemy_url)
    try:
        version = refit_model(
            make_session_factory(engine),
            model_name=args.model,
            artifact_dir=settings.artifact_dir,
            device=settings.device,
            callback=progress,
            keep_versions=settings.keep_versions,
            chunk_rows=settings.refit_chunk_rows,
        )
    finally:
        engine.dispose()
    print(
        json.dumps(
            {"version": version.version, "status": version.status, "metrics": version.metrics}
        )
    )
    return 0


def cmd_demo(settings: Settings, args: argparse.Namespace) -> int:
    """Set up the demo database and model, print curl commands, serve."""
    from service.demo import check_through_client, client_snippet, curl_commands, prepare_demo

    _limit_torch_threads(settings)
    result = prepare_demo(
        settings, n_users=args.users, n_days=args.days, max_epochs=args.epochs, seed=args.seed
    )
    host, port = args.host or settings.host, args.port or settings.port
    print(f"\nadmin API key (shown once): {result.key}")
    print(f"model 'mood' version {result.version}: {json.dumps(result.metrics)}\n")
    print("checked through NMEClient: " + check_through_client(settings, result) + "\n")
    print(curl_commands(result, f"http://{host}:{port}"))
    print("\n# or from Python:\n" + client_snippet(result, f"http://{host}:{port}"))
    if args.no_serve:
        return 0
    print(f"\nserving on http://{host}:{port} (Ctrl-C to stop)\n", flush=True)
    _serve(settings, host, port, 1)
    return 0


def cmd_worker(settings: Settings, args: argparse.Namespace) -> int:
    """Run the background worker: per-user updates and refits from the jobs table."""
    from service.jobs.worker import Worker
    from service.logs import configure_json_logging

    configure_json_logging(settings.log_level)
    _limit_torch_threads(settings)
    worker = Worker(settings, name=args.name)
    worker.install_signal_handlers()
    try:
        worker.run(burst=args.burst)
    finally:
        worker.close()
    return 0


@contextmanager
def _session(settings: Settings) -> Iterator[Session]:
    """A session on a short-lived engine (CLI commands run once and exit)."""
    engine = make_engine(settings.sqlalchemy_url)
    try:
        with make_session_factory(engine)() as session:
            yield session
    finally:
        engine.dispose()


def _redacted(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for tests and --help)."""
    parser = argparse.ArgumentParser(
        prog="nme-service", description="NME personalised prediction service"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the HTTP API (uvicorn)")
    serve.add_argument("--host", help="bind address (default NME_HOST, 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default NME_PORT, 8000)")
    serve.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
    serve.set_defaults(func=cmd_serve)

    mig = sub.add_parser("migrate", help="upgrade the database schema")
    mig.add_argument("--revision", default="head")
    mig.set_defaults(func=cmd_migrate)

    create = sub.add_parser("create-key", help="create an API key and print it once")
    create.add_argument("--name", required=True)
    create.add_argument("--scopes", required=True, help="comma-separated: predict,ingest,admin")
    create.add_argument(
        "--models",
        help="comma-separated model names the key may reach (default: every model); a scoped "
        "admin key manages its models but cannot create models, read /metrics or forget a user "
        "everywhere",
    )
    create.set_defaults(func=cmd_create_key)
    listing = sub.add_parser("list-keys", help="list API keys: scopes, models, revoked?")
    listing.set_defaults(func=cmd_list_keys)

    revoke = sub.add_parser("revoke-key", help="revoke an API key")
    revoke.add_argument("key", help="the key itself or its prefix (the part after nme_)")
    revoke.set_defaults(func=cmd_revoke_key)

    refit = sub.add_parser(
        "refit", help="train and activate a new model version now (no champion/challenger)"
    )
    refit.add_argument("--model", required=True)
    refit.set_defaults(func=cmd_refit)

    demo = sub.add_parser("demo", help="simulated demo on SQLite, then serve")
    demo.add_argument("--no-serve", action="store_true", help="set up and exit")
    demo.add_argument("--host")
    demo.add_argument("--port", type=int)
    demo.add_argument("--users", type=int, default=200)
    demo.add_argument("--days", type=int, default=60)
    demo.add_argument("--epochs", type=int, default=60)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=cmd_demo)

    worker = sub.add_parser("worker", help="run queued jobs: per-user updates and refits")
    worker.add_argument(
        "--burst", action="store_true", help="exit once no job is due (instead of polling)"
    )
    worker.add_argument("--name", help="worker name in logs (default host:pid)")
    worker.set_defaults(func=cmd_worker)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``nme-service`` console script."""
    args = build_parser().parse_args(argv)
    func: Callable[[Settings, argparse.Namespace], int] = args.func
    try:
        return func(Settings(), args)
    except (ServiceError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
