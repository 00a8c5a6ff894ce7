"""Faults a real cluster has, on a real local Ray: a training worker SIGKILLed at random steps and a
Tune trial's process SIGKILLed mid-sweep. Each kill is repeated twice at random moments.

What the runs must show: the full epoch and step count, and no work lost beyond the epoch that was
running at the kill (each restart resumes from the newest complete checkpoint on storage).
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from pathlib import Path
from typing import Callable, List

import pytest

from orchestrator.config import (
    ModelConfig,
    PipelineConfig,
    StorageConfig,
    TrackingConfig,
    TrainConfig,
    TuneConfig,
    TuneScheduler,
)
from orchestrator.training.loop import run_train
from orchestrator.training.sweep import run_sweep
from tests.support import newest_epochs, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.faults]

KILLS = 2
EPOCHS = 10


def _cfg(tmp_path: Path, epochs: int = EPOCHS, **kw) -> PipelineConfig:
    # batch 16 over 2 workers, 1024-wide layers: ~90 steps per worker per epoch, about half a second:
    # long enough to land kills mid-epoch.
    return PipelineConfig(
        storage=StorageConfig(root=f"file://{tmp_path}"),
        tracking=TrackingConfig(enabled=False),
        model=ModelConfig(hidden=[1024, 1024]),
        train=TrainConfig(epochs=epochs, batch_size=16, lr=0.003, max_failures=KILLS + 1),
        **kw,
    )


def _alive_pids(match: Callable[[str], bool]) -> List[int]:
    """Pids of the live Ray actor processes whose class name `match`es (the tier's Ray is the only one here).

    Read from the process titles Ray sets (`ray::<Class>` or `ray::<Class>.<method>`), not the state API: a
    poll every 50 ms is then cheap, and once (2026-12-02) the state API listed no trial for the whole run."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            title = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace").strip()
        except OSError:  # gone meanwhile
            continue
        if title.startswith("ray::") and match(title[len("ray::"):].split(".")[0].strip()):
            pids.append(int(entry))
    return pids


def _newest_epoch(root: Path, pattern: str) -> int:
    """Progress: the newest complete checkpoint's epoch, summed over the run folders matching `pattern`."""
    return sum(newest_epochs(root, pattern).values())


class _Background:
    """Run `fn` in a thread; .result() re-raises what it raised."""

    def __init__(self, fn):
        self.value, self.error = None, None
        self.thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self.thread.start()

    def _run(self, fn):
        try:
            self.value = fn()
        except BaseException as err:  # noqa: BLE001 - handed to the test thread
            self.error = err

    def alive(self) -> bool:
        return self.thread.is_alive()

    def result(self, timeout_s: float):
        self.thread.join(timeout_s)
        assert not self.thread.is_alive(), f"still running after {timeout_s} s"
        if self.error is not None:
            raise self.error
        return self.value


def _kill_at_random_steps(
    job: _Background, rng: random.Random, newest: Callable[[], int], pids: Callable[[], List[int]]
) -> List[dict]:
    """SIGKILL one process from `pids()` KILLS times, each after a random number of complete epochs
    plus a random part of the next; waits for progress past the restore point between kills."""
    kills = []
    for _ in range(KILLS):
        target = newest() + rng.randint(1, 2)
        # (noqa B023: wait_for calls the condition before the loop moves on, so it sees this iteration's value)
        what = f"a complete checkpoint of epoch {target}"
        wait_for(lambda: newest() >= target or not job.alive(), 240, what)  # noqa: B023
        assert job.alive(), "the run ended before every kill landed: make it longer"
        time.sleep(rng.uniform(0.05, 0.4))  # somewhere inside the next epoch
        wait_for(lambda: bool(pids()) or not job.alive(), 30, "a live process to kill")  # the state API lags a little
        victims = pids()
        assert victims and job.alive(), "the run ended before every kill landed: make it longer"
        before = newest()
        os.kill(rng.choice(victims), signal.SIGKILL)
        kills.append({"newest_complete_at_kill": before, "at": time.monotonic()})
        # The restarted run must get past the restore point before the next kill.
        wait_for(lambda: newest() > before or not job.alive(), 240, "progress after the restart")  # noqa: B023
    return kills


def test_sigkilled_training_workers_cost_at_most_the_running_epoch(ray_cluster, tmp_path):
    cfg = _cfg(tmp_path)
    job = _Background(lambda: run_train(cfg))
    newest = lambda: _newest_epoch(tmp_path, "ray_results/default-train-*")  # noqa: E731
    kills = _kill_at_random_steps(job, random.Random(), newest, lambda: _alive_pids(lambda c: c == "RayTrainWorker"))
    result = job.result(600)

    history = result.run_history
    assert [h["epoch"] for h in history] == list(range(1, EPOCHS + 1))
    steps = [h["steps"] for h in history]
    assert steps == [steps[0] * e for e in range(1, EPOCHS + 1)], f"steps lost or repeated: {steps}"
    restores = sorted({h["restored_epoch"] for h in history if h["restored_epoch"] > 0})
    assert len(restores) == KILLS, f"expected {KILLS} restarts, saw restores from {restores} ({kills})"
    for kill, restored in zip(kills, restores):
        # Resumed from the newest complete checkpoint at the kill (or one that completed as it landed).
        assert kill["newest_complete_at_kill"] <= restored <= kill["newest_complete_at_kill"] + 1, (kill, restores)
    assert result.metrics["val_accuracy"] > 0.9
    print(
        f"\nworker kills: {[k['newest_complete_at_kill'] for k in kills]} newest complete at kill, "
        f"resumed from {restores}"
    )


def _is_trial(class_name: str) -> bool:
    return class_name in ("ImplicitFunc", "_run_trial") or class_name.endswith("_run_trial")


def test_killed_tune_trials_are_retried_and_finish(ray_cluster, tmp_path):
    cfg = _cfg(tmp_path, tune=TuneConfig(
        scheduler=TuneScheduler.fifo, num_samples=1, max_concurrent_trials=2, max_failures=KILLS,
        search_space={"train": {"lr": ["grid", 0.002, 0.004]}},
    ))
    job = _Background(lambda: run_sweep(cfg))
    newest = lambda: _newest_epoch(tmp_path, "ray_results/default-sweep-*/trials/*")  # noqa: E731
    kills = _kill_at_random_steps(job, random.Random(), newest, lambda: _alive_pids(_is_trial))
    sweep = job.result(900)

    assert len(sweep.trials) == 2, "a trial went missing"
    for trial in sweep.trials:
        assert trial.status == "completed", f"{trial.trial_id}: {trial.status}"
        assert trial.epochs_run == EPOCHS
    assert sweep.best.metrics["val_accuracy"] > 0.9
    print(f"\ntrial kills: newest complete checkpoint at each kill {[k['newest_complete_at_kill'] for k in kills]}")
