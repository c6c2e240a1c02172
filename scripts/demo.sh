#!/usr/bin/env bash
# Set everything up, then run the demo: SQLite database under ./var, an admin key,
# a `mood` model trained on simulated data, served on http://127.0.0.1:8000.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec .venv/bin/nme-service demo "$@"
