#!/usr/bin/env bash
# The main job: set up, then a local Redis, one worker, a completion and a chat job, results printed.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python -m devtools.demo "$@"
