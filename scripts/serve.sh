#!/usr/bin/env bash
# Set up (idempotent) and serve. With no --model-path this serves the embedded default
# model, SmolLM2-135M-Instruct, converted once into ~/.cache/mace-sgl on first use.
# Any SGLang or --mace-* flag may follow: scripts/serve.sh --port 30001 --api-key KEY
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/mace-sgl serve "$@"
