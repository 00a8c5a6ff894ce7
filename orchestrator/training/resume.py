"""Picking up a training run or a sweep after its driver (or the Ray head it ran on) was lost.

Runs are named `<run_name>-<kind>-<timestamp>` under `<root>/ray_results/`. A run that ends writes
`orchestrator_done.json` into its folder; `resume=true` continues the newest folder of its kind
without one. Everything a run needs to continue lives under the storage root: Ray Train's
checkpoints (verified, see orchestrator.training.checkpoints) and Tune's experiment state.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Dict, Optional

from orchestrator.config import PipelineConfig
from orchestrator.registry import storage

log = logging.getLogger(__name__)

DONE_FILE = "orchestrator_done.json"


def run_name_for(cfg: PipelineConfig, kind: str) -> str:
    """The name of the `kind` ('train' or 'sweep') run this job works on: with `cfg.resume`, the newest
    unfinished one under the storage root (a fresh name when there is none)."""
    if cfg.resume:
        unfinished = newest_unfinished(cfg.storage.root, f"{cfg.run_name}-{kind}-")
        if unfinished is not None:
            log.info("resume=true: continuing %s from %s", unfinished, storage.join(cfg.storage.root, "ray_results"))
            return unfinished
        log.info(
            "resume=true: no unfinished %s run named %s-%s-* under the storage root; starting a new one",
            kind,
            cfg.run_name,
            kind,
        )
    return f"{cfg.run_name}-{kind}-{time.strftime('%Y%m%d-%H%M%S')}"


def newest_unfinished(root: str, prefix: str) -> Optional[str]:
    """Name of the newest run folder under <root>/ray_results starting with `prefix` that has no done marker."""
    fs, path = storage.filesystem(storage.join(root, "ray_results"))
    if not fs.exists(path):
        return None
    names = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))
    for name in reversed([n for n in names if n.startswith(prefix)]):
        if not fs.exists(f"{path}/{name}/{DONE_FILE}"):
            return name
    return None


def mark_done(root: str, name: str, summary: Dict[str, Any]) -> None:
    """Record that run `name` ended, so `resume=true` does not pick it up again."""
    storage.write_bytes_atomic(
        storage.join(root, "ray_results", name, DONE_FILE), json.dumps(summary, default=str).encode()
    )
