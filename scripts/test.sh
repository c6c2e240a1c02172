#!/usr/bin/env bash
# Set everything up, then lint and run the whole test suite (SQLite and PostgreSQL).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
# PostgreSQL is part of the test matrix; start the local cluster if it is down.
if command -v pg_isready >/dev/null && ! pg_isready -q -h 127.0.0.1 -p 5432; then
    if command -v pg_ctlcluster >/dev/null; then
        pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n 1)" main start || true
    fi
fi
.venv/bin/ruff check .
exec .venv/bin/python -m pytest -q "$@"
