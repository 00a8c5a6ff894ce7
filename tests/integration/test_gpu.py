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


def test_fsdp_bf16_trains_a_gpt_on_gpu(ray_cluster, tmp_path):
    """The code_lm_gpu path in small: a GPT under FSDP2 with bf16 mixed precision over NCCL."""
    from orchestrator.config import (
        BuiltinModel,
        DataConfig,
        DataKind,
        MetricMode,
        ModelConfig,
        Optimizer,
        Precision,
        TaskConfig,
        TaskKind,
        TuneConfig,
    )

    workers = min(2, torch.cuda.device_count())
    cfg = PipelineConfig(
        task=TaskConfig(name=TaskKind.causal_lm),
        data=DataConfig(kind=DataKind.text, source="stdlib", max_files=40, vocab_size=1024, context=64),
        model=ModelConfig(name=BuiltinModel.gpt, layers=2, heads=4, width=128, context=64),
        storage=StorageConfig(root=f"file://{tmp_path}"),
        tracking=TrackingConfig(enabled=False),
        train=TrainConfig(epochs=3, steps_per_epoch=20, batch_size=32, lr=0.003, optimizer=Optimizer.adamw,
                          precision=Precision.bf16, val_batches=4),
        tune=TuneConfig(metric="val_loss", mode=MetricMode.min),
        parallel=ParallelConfig(strategy=ParallelStrategy.fsdp, backend=DistBackend.nccl),
        scaling=ScalingConfig(num_workers=workers, use_gpu=True),
    )
    history = run_train(cfg).run_history
    assert history[-1]["val_loss"] < history[0]["val_loss"]
    assert history[-1]["tokens_per_s"] > 0
    from orchestrator.training.flops import lookup_peak

    if lookup_peak(torch.cuda.get_device_name()) is not None:  # known GPUs have a peak in the table: MFU reported
        assert 0 < history[-1]["mfu"] < 1
