"""Process bodies for tests/unit/test_parallel_equivalence.py (spawned, so importable at module level)."""

import os

import torch
import torch.distributed as dist

from orchestrator.config import (
    BuiltinModel,
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
from orchestrator.training.tasks import PAD_ID, get_task

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


GPT_CONTEXT, GPT_VOCAB = 16, 64


def gpt_model(tied: bool):
    return ModelConfig(name=BuiltinModel.gpt, layers=3, heads=2, width=16, context=GPT_CONTEXT, tie_embeddings=tied)


def gpt_batch():
    generator = torch.Generator().manual_seed(2)
    tokens = torch.randint(2, GPT_VOCAB, (8, GPT_CONTEXT + 1), generator=generator)
    tokens[-1, -4:] = PAD_ID  # padding is ignored the same way by every plan
    return tokens[:, :-1], tokens[:, 1:]


def gpt_one_step(kind: ScheduleKind, phase_index: int, parallel: ParallelConfig, rows: slice, tied: bool):
    """Weights of a tiny GPT after one AdamW step (fp32, clipped, accumulated over 2 micro-batches) of a
    schedule's phase, with the causal-LM loss."""
    torch.manual_seed(0)
    task = get_task("causal_lm")
    model = build_model(gpt_model(tied), [GPT_CONTEXT], GPT_VOCAB)
    train = TrainConfig(optimizer=Optimizer.adamw, lr=0.01, epochs=8, batch_size=8, grad_clip=0.5)
    phases = expand_schedule(ScheduleConfig(kind=kind), model.stage_names, epochs=train.epochs, lr=train.lr)
    aux = make_aux_heads(model, phases, GPT_VOCAB, seed=0)
    phase_model = PhaseModel(model, aux, phases[phase_index])
    runner = make_runner(parallel, phase_model.trainable, phase_model.param_groups(), train, torch.device("cpu"),
                         loss=task.loss_sum, counted=task.counted, padded=task.padded)
    phase_model.train()
    x, y = gpt_batch()
    x, y = x[rows], y[rows]
    runner.step(phase_model.features(x) if runner.needs_inputs else None, y)
    runner.sync()
    return {
        **{f"model.{k}": v.clone() for k, v in model.state_dict().items()},
        **{f"aux.{k}": v.clone() for k, v in aux.state_dict().items()},
    }


GPT_CASES = [(ScheduleKind.end_to_end, 0), (ScheduleKind.layerwise, 1), (ScheduleKind.gradual_unfreeze, 1)]


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
    for kind, phase in GPT_CASES:
        results[("gpt-fsdp", kind, phase)] = gpt_one_step(
            kind, phase, ParallelConfig(strategy=ParallelStrategy.fsdp), slice(rank * 4, rank * 4 + 4), tied=True
        )
        pipeline = ParallelConfig(strategy=ParallelStrategy.pipeline, pipeline_schedule="1f1b", microbatches=2)
        results[("gpt-pipeline-1f1b", kind, phase)] = gpt_one_step(kind, phase, pipeline, slice(None), tied=False)
    if rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()
