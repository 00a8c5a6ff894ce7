"""Ray Train on a real local Ray: DDP reaches accuracy, a failure resumes from the latest checkpoint."""

import dataclasses


from orchestrator.config import ModelConfig, PipelineConfig, StorageConfig, TrackingConfig, TrainConfig
from orchestrator.train import checkpoint_weights, run_train


def _cfg(tmp_path, **train) -> PipelineConfig:
    return PipelineConfig(
        storage=StorageConfig(root=f"file://{tmp_path}"), tracking=TrackingConfig(enabled=False),
        train=TrainConfig(**{"epochs": 5, **train}),
    )


def test_ddp_two_workers_learns_digits(ray_cluster, tmp_path):
    cfg = _cfg(tmp_path)
    result = run_train(cfg)
    assert result.metrics["val_accuracy"] > 0.9
    assert [h["epoch"] for h in result.history] == list(range(1, result.metrics["epoch"] + 1))
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    weights = checkpoint_weights(cfg.storage.root, result.checkpoint_path)
    assert weights["head.weight"].shape == (10, 64)


def test_failure_resumes_from_latest_checkpoint(ray_cluster, tmp_path):
    marker = tmp_path / "crashed"
    model = ModelConfig(
        _target_="tests.integration.crashing_model.crash_once_mlp",
        # ~23 steps per epoch per worker at batch 64 over 2 workers, plus val batches: crashes in epoch 3.
        kwargs={"marker": str(marker), "crash_after_calls": 70},
    )
    cfg = dataclasses.replace(_cfg(tmp_path, epochs=5, max_failures=1), model=model)
    result = run_train(cfg)
    assert marker.exists(), "the injected failure never happened"
    history = result.history
    assert [h["epoch"] for h in history] == [1, 2, 3, 4, 5]
    resumed = history[-1]["restored_epoch"]
    assert resumed >= 1, "the retry started from scratch instead of the latest checkpoint"
    assert all(h["restored_epoch"] == 0 for h in history[:resumed])
    assert all(h["restored_epoch"] == resumed for h in history[resumed:])
    assert result.metrics["val_accuracy"] > 0.85


def test_cnn_trains_on_image_shaped_digits(ray_cluster, tmp_path):
    cfg = dataclasses.replace(_cfg(tmp_path, epochs=4, lr=0.01), model=ModelConfig(name="cnn", channels=[8, 16], hidden=[32]))
    result = run_train(cfg)
    assert result.data.input_shape == [1, 8, 8]
    assert result.metrics["val_accuracy"] > 0.9
    weights = checkpoint_weights(cfg.storage.root, result.checkpoint_path)
    assert weights["stages.conv0.0.weight"].shape == (8, 1, 3, 3)
