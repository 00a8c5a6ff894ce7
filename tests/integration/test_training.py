"""Ray Train on a real local Ray: a CNN learns image-shaped digits.

DDP learning and resuming are covered by test_faults.py (SIGKILLed workers) and test_staged.py
(a raised failure resumes in its phase and epoch)."""

import dataclasses

from orchestrator.config import BuiltinModel, ModelConfig, PipelineConfig, StorageConfig, TrackingConfig, TrainConfig
from orchestrator.training.loop import checkpoint_weights, run_train


def _cfg(tmp_path, **train) -> PipelineConfig:
    return PipelineConfig(
        storage=StorageConfig(root=f"file://{tmp_path}"), tracking=TrackingConfig(enabled=False),
        train=TrainConfig(**{"epochs": 5, **train}),
    )


def test_cnn_trains_on_image_shaped_digits(ray_cluster, tmp_path):
    cfg = dataclasses.replace(
        _cfg(tmp_path, epochs=4, lr=0.01), model=ModelConfig(name=BuiltinModel.cnn, channels=[8, 16], hidden=[32])
    )
    result = run_train(cfg)
    assert result.data.input_shape == [1, 8, 8]
    assert result.metrics["val_accuracy"] > 0.9
    weights = checkpoint_weights(cfg.storage.root, result.checkpoint_path)
    assert weights["stages.conv0.0.weight"].shape == (8, 1, 3, 3)
