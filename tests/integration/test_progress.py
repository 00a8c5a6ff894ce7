"""What the driver prints while training runs on a real local Ray whose workers' output stays off the
driver (the tier's Ray is started as jobs start it: `log_to_driver=False`): a line per epoch, one per
finished trial or run, and a worker's failure, both when it is retried and when it ends the run."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from orchestrator.config import ModelConfig, PipelineConfig, StorageConfig, TrackingConfig, TrainConfig, TuneConfig
from orchestrator.training.loop import run_train
from orchestrator.training.sweep import run_sweep

pytestmark = pytest.mark.slow

EPOCHS = 3


def _cfg(root: Path, marker: Path, max_failures: int) -> PipelineConfig:
    # Rank 0 calls the crash stage ~20 times an epoch (19 steps and a val pass): call 30 falls in epoch 2.
    return PipelineConfig(
        storage=StorageConfig(root=f"file://{root}"),
        tracking=TrackingConfig(enabled=False),
        model=ModelConfig(_target_="tests.integration.crashing_model.crash_once_mlp",
                          kwargs={"marker": str(marker), "crash_after_calls": 30}),
        train=TrainConfig(epochs=EPOCHS, lr=0.01, max_failures=max_failures),
        tune=TuneConfig(num_samples=1, search_space={"train": {"lr": ["grid", 0.01]}}),
    )


def _lines(text: str, label: str) -> list:
    return [line for line in text.splitlines() if line.startswith(f"[{label}]")]


def test_a_sweep_prints_each_epoch_a_retried_worker_failure_and_the_trial_summary(ray_cluster, tmp_path, capsys):
    sweep = run_sweep(_cfg(tmp_path, tmp_path / "crashed", max_failures=1))
    out = capsys.readouterr().out
    (trial,) = sweep.trials
    lines = _lines(out, f"trial {trial.trial_id}")
    assert lines[0].startswith(f"[trial {trial.trial_id}] started  train.lr=0.01"), out
    # The worker's exception reached the driver although its own output did not; then the run went on.
    assert f"[trial {trial.trial_id}] worker rank 0 failed: RuntimeError: injected failure" in lines, out
    epochs = [line for line in lines if " epoch " in line]
    numbers = [int(re.search(r" epoch (\d+)/3 ", line).group(1)) for line in epochs]
    assert numbers[-1] == EPOCHS and sorted(set(numbers)) == list(range(1, EPOCHS + 1)), out
    assert all(re.search(r"train_loss \d+\.\d{4}  val_accuracy \d\.\d{4}  \d+\.\ds$", line) for line in epochs), out
    assert lines[-1].startswith(f"[trial {trial.trial_id}] completed: 3/3 epochs, best val_accuracy "), out
    assert trial.status == "completed"
    assert "Reporting training result" not in out and "(RayTrainWorker" not in out  # Ray's own lines stay off


def test_a_run_whose_worker_fails_raises_with_the_workers_traceback(ray_cluster, tmp_path, capsys):
    with pytest.raises(Exception) as failure:
        run_train(_cfg(tmp_path, tmp_path / "crashed", max_failures=0))
    out = capsys.readouterr().out
    # The error names the worker's own exception and where it was raised, in the user's model.
    assert "injected failure" in str(failure.value) and "crashing_model.py" in str(failure.value)
    assert any(re.fullmatch(r"\[\S+-train-\S+\] worker rank 0 failed: RuntimeError: injected failure", line)
               for line in out.splitlines()), out
    assert re.search(r"\] epoch 1/3  train_loss ", out), out  # the epoch before the failure was shown
