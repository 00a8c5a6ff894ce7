#!/usr/bin/env bash
# README's main command: set up .venv if needed, then run the main job (embedded local Ray).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export WANDB_MODE=offline RAY_USAGE_STATS_ENABLED=0
exec .venv/bin/python -m jobs.pipeline "$@"
