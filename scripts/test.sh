#!/usr/bin/env bash
# README's test command: set up .venv if needed, lint and type-check, then run the test tiers, fastest first
# (unit, integration, e2e).
#   bash scripts/test.sh                  # everything
#   bash scripts/test.sh -m "not slow"    # the development loop: unit + quick integration, a few minutes
#   bash scripts/test.sh -m slow          # the rest: clusters, jobs, long Ray runs and killed processes
# Other arguments go to pytest as they are (a path, -k, -x, ...).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/lint.sh
export WANDB_MODE=offline RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS=0 RAY_USAGE_STATS_ENABLED=0
# --durations: every run names its slowest tests, so a suite that grows slower says where.
# --timeout: the slowest test takes about 2.5 min here; a hung one fails after 8 instead of holding CI.
exec .venv/bin/python -m pytest -ra --timeout=480 --durations=15 "$@"
