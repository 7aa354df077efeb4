#!/usr/bin/env bash
# Set up (idempotent), lint, and run the default test suite (CPU; tests marked slow or
# gpu are left out; extra arguments go to pytest, e.g. scripts/test.sh -m slow).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
exec .venv/bin/python -m pytest -m "not slow and not gpu" "$@"
