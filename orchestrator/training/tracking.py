"""Experiment tracking: one wandb run per training run (rank 0 only), offline by default."""

from __future__ import annotations

import os
from typing import Any, Dict

from orchestrator.config import TrackingConfig
from orchestrator.registry import storage


class Tracker:
    """Logs metrics of one run. The base class does nothing (tracking off, or not rank 0)."""

    def log(self, metrics: Dict[str, Any], step: int) -> None:
        pass

    def finish(self) -> None:
        pass


class WandbTracker(Tracker):
    def __init__(self, run):
        self._run = run

    def log(self, metrics: Dict[str, Any], step: int) -> None:
        self._run.log(metrics, step=step)

    def finish(self) -> None:
        self._run.finish()


def tracking_dir(cfg: TrackingConfig, root: str) -> str:
    """Local folder for wandb files: `cfg.dir`, else <root>/wandb for a local root, else ./wandb."""
    if cfg.dir:
        return cfg.dir
    return storage.filesystem(storage.join(root, "wandb"))[1] if storage.is_local(root) else os.path.abspath("wandb")


def start_tracking(
    cfg: TrackingConfig, root: str, *, name: str, group: str, config: Dict[str, Any], rank: int
) -> Tracker:
    """A wandb run for rank 0 when tracking is on; a do-nothing Tracker otherwise.

    Under Ray Train V2 `setup_wandb(rank_zero_only=True)` is ignored (every rank makes a run),
    so the rank check lives here.
    """
    if not cfg.enabled or cfg.mode == "disabled" or rank != 0:
        return Tracker()
    import wandb

    directory = tracking_dir(cfg, root)
    os.makedirs(directory, exist_ok=True)
    run = wandb.init(
        project=cfg.project, name=name, group=group, config=config, dir=directory,
        mode=cfg.mode,  # type: ignore[arg-type]  # a str that TrackingConfig checks against wandb's modes
        reinit="create_new", settings=wandb.Settings(silent=True, console="off"),
    )
    return WandbTracker(run)
