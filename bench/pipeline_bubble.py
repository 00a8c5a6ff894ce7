"""Pipeline bubble: measured idle fraction of a 2-stage pipeline against the GPipe/1F1B bound (p-1)/(m+p-1).

Two processes (gloo) run orchestrator's pipeline plan (`orchestrator.training.parallel.PipelineRunner`, i.e.
torch.distributed.pipelining) over two equal stages, for m = 1, 2, 4, 8 micro-batches of one fixed
global batch. For each rank:

    busy  = the time the same stage needs for the same m micro-batches, forward and backward, alone
            (measured in the same process, no communication)
    step  = the wall time of one pipelined training step
    idle  = 1 - busy / step                (communication counts as idle: it is time not computing)

and the table prints the mean idle over ranks next to (p-1)/(m+p-1).

    .venv/bin/python bench/pipeline_bubble.py [--batch 512] [--width 512] [--steps 10]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from torch import nn  # noqa: E402

from orchestrator.config import Optimizer, ParallelConfig, ParallelStrategy, TrainConfig  # noqa: E402
from orchestrator.training.parallel import PipelineRunner  # noqa: E402

MICROBATCHES = (1, 2, 4, 8)
# torch's 1F1B needs at least one micro-batch per stage.
RUNS = [("gpipe", m) for m in MICROBATCHES] + [("1f1b", m) for m in MICROBATCHES if m >= 2]
CLASSES = 10


def two_stage_model(width: int, depth: int) -> nn.Sequential:
    torch.manual_seed(0)
    block = lambda: nn.Sequential(*[layer for _ in range(depth) for layer in (nn.Linear(width, width), nn.ReLU())])  # noqa: E731
    return nn.Sequential(block(), nn.Sequential(block(), nn.Linear(width, CLASSES)))


def alone(stage: nn.Module, last: bool, x: torch.Tensor, y: torch.Tensor, m: int, steps: int) -> float:
    """Seconds per step for `stage` to run forward and backward on m micro-batches, without communication."""
    loss_fn = nn.CrossEntropyLoss()
    chunks = list(zip(x.tensor_split(m), y.tensor_split(m)))
    times = []
    for _ in range(steps + 1):
        started = time.perf_counter()
        for cx, cy in chunks:
            out = stage(cx)
            loss = loss_fn(out, cy) if last else out.sum()
            loss.backward()
        times.append(time.perf_counter() - started)
    return statistics.median(times[1:])


def worker(rank: int, port: int, args, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    model = two_stage_model(args.width, args.depth)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, args.width, generator=generator)
    y = torch.randint(0, CLASSES, (args.batch,), generator=generator)
    # The first stage's alone-time includes its input gradient only if the pipeline needs one: it does not.
    stage_input = x if rank == 0 else torch.randn(args.batch, args.width, generator=generator).requires_grad_()
    rows = {}
    for schedule, m in RUNS:
        cfg = ParallelConfig(strategy=ParallelStrategy.pipeline, pipeline_schedule=schedule, microbatches=m)
        runner = PipelineRunner(
            model,
            [{"params": list(model.parameters()), "lr": 0.01}],
            TrainConfig(optimizer=Optimizer.sgd, lr=0.01),
            cfg,
            torch.device("cpu"),
        )
        times = []
        for _ in range(args.steps + 1):
            dist.barrier()
            started = time.perf_counter()
            runner.step(x if rank == 0 else None, y)
            times.append(time.perf_counter() - started)
        step = statistics.median(times[1:])
        busy = alone(model[rank], rank == 1, stage_input, y, m, args.steps)
        rows[(schedule, m)] = (step, busy)
    gathered = [None, None]
    dist.all_gather_object(gathered, rows)
    if rank == 0:
        results.update({"ranks": gathered})
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--depth", type=int, default=2, help="Linear+ReLU layers per stage")
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(worker, args=(port, args, results), nprocs=2, join=True)
    ranks = results["ranks"]
    print(
        f"2-stage pipeline, batch {args.batch}, width {args.width}, {args.depth} layers/stage, gloo on CPU, "
        f"median of {args.steps} steps"
    )
    print(
        f"{'schedule':>8} {'m':>3} {'step ms':>8} {'busy ms (r0/r1)':>16} "
        f"{'idle measured':>14} {'(p-1)/(m+p-1)':>14} {'ratio':>6}"
    )
    for schedule, m in RUNS:
        steps = [r[(schedule, m)][0] for r in ranks]
        busy = [r[(schedule, m)][1] for r in ranks]
        idle = statistics.fmean(1 - b / s for b, s in zip(busy, steps))
        bound = 1 / (m + 1)
        print(
            f"{schedule:>8} {m:>3} {1e3 * max(steps):8.1f} {1e3 * busy[0]:7.1f}/{1e3 * busy[1]:<8.1f} "
            f"{idle:14.3f} {bound:14.3f} {idle / bound:6.2f}"
        )


if __name__ == "__main__":
    main()
