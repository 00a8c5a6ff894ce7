"""Layer-staged schedules on a real local Ray: caching changes nothing but compute, a failure
mid-schedule resumes in the right phase and epoch, and every parallel plan runs a staged schedule."""

import dataclasses

import pytest

from orchestrator.config import (
    ModelConfig,
    ParallelConfig,
    PipelineConfig,
    ScheduleConfig,
    StorageConfig,
    TrackingConfig,
    TrainConfig,
)
from orchestrator.training.loop import checkpoint_weights, run_train

pytestmark = pytest.mark.slow


def _cfg(tmp_path, *, schedule="layerwise", strategy="ddp", epochs=6, **extra) -> PipelineConfig:
    return PipelineConfig(
        storage=StorageConfig(root=f"file://{tmp_path}"), tracking=TrackingConfig(enabled=False),
        train=TrainConfig(epochs=epochs, batch_size=64), schedule=ScheduleConfig(kind=schedule, **extra),
        parallel=ParallelConfig(strategy=strategy),
    )


def test_cached_prefix_gives_the_same_loss_curve_for_less_compute(ray_cluster, tmp_path):
    cached = run_train(_cfg(tmp_path / "cached", cache_frozen=True))
    recomputed = run_train(_cfg(tmp_path / "recomputed", cache_frozen=False))
    assert len(cached.history) == len(recomputed.history) == 6
    for a, b in zip(cached.history, recomputed.history):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-5)
        assert a["val_loss"] == pytest.approx(b["val_loss"], abs=1e-5)
    # Phase 1 (2 epochs on a frozen block0) runs block0 once per row with the cache, twice without.
    rows = cached.history[0]["forward_passes"] // 2  # phase 0: block0 and its aux head, one epoch
    assert recomputed.history[-1]["forward_passes"] - cached.history[-1]["forward_passes"] == rows
    assert cached.history[-1]["train_gflops"] < recomputed.history[-1]["train_gflops"]
    assert cached.metrics["val_accuracy"] > 0.85


def test_failure_mid_schedule_resumes_in_its_phase_and_epoch(ray_cluster, tmp_path):
    def crashing(marker):
        # Rank 0 calls the crash stage ~24 times an epoch from phase 1 on: call 85 falls in epoch 6,
        # the second epoch of the fine-tune phase, so the resume must restore that phase's optimizer.
        model = ModelConfig(
            _target_="tests.integration.crashing_model.crash_once_mlp",
            kwargs={"marker": str(marker), "crash_after_calls": 85},
        )
        return dataclasses.replace(
            _cfg(tmp_path / f"run-{marker.name}"),
            model=model,
            train=TrainConfig(epochs=6, batch_size=64, max_failures=1),
        )

    marker = tmp_path / "crashed"
    crashed_cfg = crashing(marker)
    resumed = run_train(crashed_cfg)
    assert marker.exists(), "the injected failure never happened"
    clean_marker = tmp_path / "clean"
    clean_marker.touch()  # already "crashed": this run never fails
    clean_cfg = crashing(clean_marker)
    clean = run_train(clean_cfg)

    history = resumed.history
    assert [h["epoch"] for h in history] == [1, 2, 3, 4, 5, 6]
    assert [h["phase"] for h in history] == [0, 0, 1, 1, 2, 2]
    assert [h["restored_epoch"] for h in history] == [0, 0, 0, 0, 0, 5]
    # Same data order, weights and optimizer state after the resume: the run ends where the clean one does.
    assert history[-1]["train_loss"] == pytest.approx(clean.history[-1]["train_loss"], abs=1e-5)
    assert history[-1]["train_gflops"] == pytest.approx(clean.history[-1]["train_gflops"])
    ours = checkpoint_weights(crashed_cfg.storage.root, resumed.checkpoint_path)
    theirs = checkpoint_weights(clean_cfg.storage.root, clean.checkpoint_path)
    for name in theirs:
        assert abs(ours[name] - theirs[name]).max() < 1e-5, name


@pytest.mark.parametrize("schedule,strategy", [("layerwise", "pipeline"), ("gradual_unfreeze", "fsdp")])
def test_staged_schedules_train_under_model_parallel_plans(ray_cluster, tmp_path, schedule, strategy):
    result = run_train(_cfg(tmp_path, schedule=schedule, strategy=strategy, epochs=8))
    phases = [h["phase"] for h in result.history]  # up to the best epoch
    assert phases == [0, 0, 1, 1, 1, 2, 2, 2][: len(phases)]
    assert result.metrics["val_accuracy"] > 0.85
    weights = checkpoint_weights(f"file://{tmp_path}", result.checkpoint_path)
    assert weights["head.weight"].shape == (10, 64)
