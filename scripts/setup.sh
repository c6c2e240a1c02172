#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment in .venv.
# torch is installed first and pinned to the CPU build on disk so pip never
# fetches a multi-GB CUDA wheel; on a GPU machine, install your CUDA torch
# into .venv before running this and the pin is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    .venv/bin/pip install --quiet "torch==2.13.0"
fi
.venv/bin/pip install --quiet -e ".[dev]"
