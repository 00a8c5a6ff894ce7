"""Process bodies for tests/unit/test_parallel_equivalence.py (spawned, so importable at module level)."""

import os

import torch
import torch.distributed as dist

from orchestrator.config import (
    ModelConfig,
    Optimizer,
    ParallelConfig,
    ParallelStrategy,
    ScheduleConfig,
    ScheduleKind,
    TrainConfig,
)
from orchestrator.training.models import build_model
from orchestrator.training.parallel import make_runner
from orchestrator.training.phases import PhaseModel, make_aux_heads
from orchestrator.training.schedules import expand_schedule

TRAIN = TrainConfig(optimizer=Optimizer.sgd, lr=0.1, epochs=4, batch_size=16)
MODEL = ModelConfig(hidden=[16, 12, 10])
SHAPE, CLASSES = [8], 3


def batch():
    generator = torch.Generator().manual_seed(1)
    return torch.randn(16, 8, generator=generator), torch.randint(0, CLASSES, (16,), generator=generator)


def one_step(kind: ScheduleKind, phase_index: int, parallel: ParallelConfig, rows: slice):
    """Weights of the whole model (and aux heads) after one optimizer step of a schedule's phase."""
    torch.manual_seed(0)
    model = build_model(MODEL, SHAPE, CLASSES)
    phases = expand_schedule(ScheduleConfig(kind=kind), model.stage_names, epochs=TRAIN.epochs, lr=TRAIN.lr)
    aux = make_aux_heads(model, phases, CLASSES, seed=0)
    phase_model = PhaseModel(model, aux, phases[phase_index])
    runner = make_runner(parallel, phase_model.trainable, phase_model.param_groups(), TRAIN, torch.device("cpu"))
    phase_model.train()
    x, y = batch()
    x, y = x[rows], y[rows]
    runner.step(phase_model.features(x) if runner.needs_inputs else None, y)
    runner.sync()
    return {
        **{f"model.{k}": v.clone() for k, v in model.state_dict().items()},
        **{f"aux.{k}": v.clone() for k, v in aux.state_dict().items()},
    }


CASES = [
    (ScheduleKind.end_to_end, 0),
    (ScheduleKind.layerwise, 1),
    (ScheduleKind.gradual_unfreeze, 1),
    (ScheduleKind.gradual_unfreeze, 0),
]


def run_rank(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    results = {}
    half = slice(rank * 8, rank * 8 + 8)  # data parallel: each rank half of the batch
    for kind, phase in CASES:
        results[("fsdp", kind, phase)] = one_step(kind, phase, ParallelConfig(strategy=ParallelStrategy.fsdp), half)
        for schedule in ("gpipe", "1f1b"):
            pipeline = ParallelConfig(strategy=ParallelStrategy.pipeline, pipeline_schedule=schedule, microbatches=4)
            results[(f"pipeline-{schedule}", kind, phase)] = one_step(kind, phase, pipeline, slice(None))
    if rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()
