"""The CUDA paths: NCCL data parallel and FSDP2 on GPUs. Skipped cleanly on a machine without CUDA."""

import pytest
import torch

from orchestrator.config import (
    DistBackend,
    ParallelConfig,
    ParallelStrategy,
    PipelineConfig,
    ScalingConfig,
    ScheduleConfig,
    ScheduleKind,
    StorageConfig,
    TrackingConfig,
    TrainConfig,
)
from orchestrator.training.loop import run_train

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (NCCL and FSDP on CUDA)"),
]


@pytest.mark.parametrize(
    "strategy,schedule",
    [(ParallelStrategy.ddp, ScheduleKind.end_to_end), (ParallelStrategy.fsdp, ScheduleKind.layerwise)],
)
def test_nccl_plans_train_on_gpu(ray_cluster, tmp_path, strategy, schedule):
    workers = min(2, torch.cuda.device_count())
    cfg = PipelineConfig(
        storage=StorageConfig(root=f"file://{tmp_path}"),
        tracking=TrackingConfig(enabled=False),
        train=TrainConfig(epochs=6),
        schedule=ScheduleConfig(kind=schedule),
        parallel=ParallelConfig(strategy=strategy, backend=DistBackend.nccl),
        scaling=ScalingConfig(num_workers=workers, use_gpu=True),
    )
    result = run_train(cfg)
    assert result.metrics["val_accuracy"] > 0.85
