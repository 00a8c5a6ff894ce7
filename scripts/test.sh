#!/usr/bin/env bash
# README's test command: set up .venv if needed, then run every test tier.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export WANDB_MODE=offline RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS=0 RAY_USAGE_STATS_ENABLED=0
exec .venv/bin/python -m pytest -ra --timeout=900 "$@"
