#!/usr/bin/env bash
# The tests: set up, lint, then pytest against a real redis-server and a real vLLM engine.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/ruff check .
exec .venv/bin/python -m pytest "$@"
