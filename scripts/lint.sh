#!/usr/bin/env bash
# Lint and type-check the whole tree (settings in pyproject.toml); non-zero on any finding.
# scripts/test.sh runs it before pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
status=0
.venv/bin/ruff check . || status=1
.venv/bin/mypy || status=1
exit "$status"
