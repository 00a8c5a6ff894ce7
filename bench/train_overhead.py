"""What Ray Train costs over hand-written torch DDP, for one orchestrator training run.

Both variants train the default MLP on the digits train split with 2 workers, the same global
batch size and the same number of optimizer steps, in one process session:

  ray    orchestrator.training.loop.build_trainer (TorchTrainer, rows read once from Ray Data as the
         training loop does, prepare_model)
  torch  torch.multiprocessing.spawn + gloo + DistributedDataParallel over in-memory arrays

A step is timed from asking for its batch to the end of optimizer.step(), so it includes the data
loading each variant does. Startup is wall clock from fit() / spawn() to the end of the first
optimizer step on rank 0.

    PYTHONPATH=. .venv/bin/python bench/train_overhead.py --epochs 10
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import tempfile
import time
from typing import Any, Callable, Dict, Iterable, Tuple

import torch
from torch import nn

from orchestrator.config import DataConfig, PipelineConfig, ScalingConfig, StorageConfig, TrackingConfig, TrainConfig
from orchestrator.training.data import DatasetInfo, load_split, prepare_dataset
from orchestrator.training.loop import worker_rows
from orchestrator.training.models import build_model
from orchestrator.training.parallel import make_optimizer

WORKERS = 2

Batches = Iterable[Tuple[torch.Tensor, torch.Tensor]]


def timed_training(model: nn.Module, optimizer, epoch_batches: Callable[[int], Batches], epochs: int) -> Dict[str, Any]:
    """Train `epochs` passes. Returns per-step seconds (whole step, and its batch fetch alone), the wall
    time at which the first step ended, and the seconds of the whole loop.

    Shared by both variants so they time exactly the same span of work.
    """
    loss_fn = nn.CrossEntropyLoss()
    step_s, fetch_s, first_step_at = [], [], None
    loop_started = time.perf_counter()
    for epoch in range(epochs):
        batches = iter(epoch_batches(epoch))
        while True:
            started = time.perf_counter()
            batch = next(batches, None)
            if batch is None:
                break
            fetch_s.append(time.perf_counter() - started)
            optimizer.zero_grad(set_to_none=True)
            loss_fn(model(batch[0]), batch[1]).backward()  # DDP all-reduces gradients here
            optimizer.step()
            step_s.append(time.perf_counter() - started)
            first_step_at = first_step_at or time.time()
    return {
        "step_s": step_s,
        "fetch_s": fetch_s,
        "first_step_at": first_step_at,
        "loop_s": time.perf_counter() - loop_started,
    }


def _seeded_model(cfg: PipelineConfig, info: DatasetInfo) -> nn.Module:
    # One intra-op thread per worker: two workers already fill this machine's cores.
    torch.set_num_threads(1)
    torch.manual_seed(cfg.train.seed)
    return build_model(cfg.model, info.input_shape, info.num_classes)


# --- Ray Train -------------------------------------------------------------------------------

def ray_loop(loop_config: Dict[str, Any]) -> Dict[str, Any]:
    """Runs in every Ray Train worker; rank 0's return value reaches the driver as Result.return_value."""
    import ray.train
    import ray.train.torch

    cfg: PipelineConfig = loop_config["cfg"]
    model = ray.train.torch.prepare_model(_seeded_model(cfg, loop_config["data"]))
    optimizer = make_optimizer(cfg.train, model.parameters())
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    batch_size = cfg.train.batch_size // world
    # The data path orchestrator's own loop uses: this rank's rows read once from Ray Data, then a
    # seeded permutation per epoch (reading the split counts in the startup time, not in the steps).
    x, y = worker_rows(ray.train.get_dataset_shard("train"), rank, world, torch.device("cpu"))

    def epoch_batches(epoch: int) -> Batches:
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(cfg.train.seed + epoch))
        return ((x[i], y[i]) for i in order.split(batch_size))

    return timed_training(model, optimizer, epoch_batches, cfg.train.epochs)


def run_ray(cfg: PipelineConfig, info: DatasetInfo) -> Dict[str, Any]:
    """Time a Ray Train fit() of `ray_loop` with orchestrator's trainer settings."""
    import ray

    from orchestrator.runtime import ensure_ray
    from orchestrator.training.loop import build_trainer

    started = time.perf_counter()
    started_ray = ensure_ray(cfg.scaling)
    ray_init_s = time.perf_counter() - started
    started = time.perf_counter()
    # Only the worker function differs: scaling, data, storage and failure settings stay orchestrator's.
    trainer = build_trainer(cfg, info, run_name="train-overhead", group="bench", storage_subdir="bench", loop=ray_loop)
    build_s = time.perf_counter() - started  # mostly materializing the Ray Data splits
    fit_called_at = time.time()
    timings = trainer.fit().return_value
    if started_ray:
        ray.shutdown()
    return {
        **timings,
        "startup_s": timings["first_step_at"] - fit_called_at,
        "ray_init_s": ray_init_s,
        "build_trainer_s": build_s,
    }


# --- hand-written torch DDP ------------------------------------------------------------------

def torch_worker(rank: int, port: int, cfg: PipelineConfig, info: DatasetInfo, result_path: str) -> None:
    """One spawned rank: gloo group, DDP, this rank's half of the train split. Rank 0 writes its timings."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORKERS)
    model = nn.parallel.DistributedDataParallel(_seeded_model(cfg, info))
    optimizer = make_optimizer(cfg.train, model.parameters())
    timings = timed_training(model, optimizer, _rank_batches(cfg, info, rank), cfg.train.epochs)
    dist.destroy_process_group()
    if rank == 0:
        with open(result_path, "w") as f:
            json.dump(timings, f)
    # Skip interpreter finalization: a gloo worker thread still dropping its last work item needs the
    # GIL then and aborts the process ("terminate called without an active exception"), about 1 run
    # in 15 here even after destroy_process_group() (core dump: ProcessGroupGloo::runLoop ->
    # ~AsyncWork -> gil_scoped_acquire during Py_FinalizeEx).
    os._exit(0)


def _rank_batches(cfg: PipelineConfig, info: DatasetInfo, rank: int) -> Callable[[int], Batches]:
    """Per-epoch shuffled batches of this rank's contiguous slice of the train split."""
    features, labels = load_split(info, "train")
    # Equal slices, as Ray Data's equal split gives, so both ranks take the same number of steps.
    per_rank = len(labels) // WORKERS
    x = torch.from_numpy(features[rank * per_rank:(rank + 1) * per_rank])
    y = torch.from_numpy(labels[rank * per_rank:(rank + 1) * per_rank])
    batch_size = cfg.train.batch_size // WORKERS

    def epoch_batches(epoch: int) -> Batches:
        order = torch.randperm(per_rank, generator=torch.Generator().manual_seed(cfg.train.seed + epoch))
        return ((x[idx], y[idx]) for idx in order.split(batch_size))

    return epoch_batches


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_torch(cfg: PipelineConfig, info: DatasetInfo) -> Dict[str, Any]:
    """Time a spawn()ed 2-process torch DDP run over the same split and batches."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as folder:
        # A file rather than a queue: spawn() joins before we could drain a pipe a long run fills.
        result_path = os.path.join(folder, "timings.json")
        spawned_at = time.time()
        mp.spawn(torch_worker, args=(_free_port(), cfg, info, result_path), nprocs=WORKERS, join=True)
        with open(result_path) as f:
            timings = json.load(f)
    return {**timings, "startup_s": timings["first_step_at"] - spawned_at}


# --- report ----------------------------------------------------------------------------------

def summarize(ray_run: Dict[str, Any], torch_run: Dict[str, Any], warmup: int) -> Dict[str, Any]:
    """The figures of both runs and their ratios (ray / torch)."""

    def steady_ms(run, stat, key="step_s"):
        return 1000 * stat(run[key][warmup:])

    figures = {
        "ray_step_ms": steady_ms(ray_run, statistics.median),
        "torch_step_ms": steady_ms(torch_run, statistics.median),
        "ray_step_mean_ms": steady_ms(ray_run, statistics.fmean),
        "torch_step_mean_ms": steady_ms(torch_run, statistics.fmean),
        "ray_fetch_ms": steady_ms(ray_run, statistics.median, "fetch_s"),
        "torch_fetch_ms": steady_ms(torch_run, statistics.median, "fetch_s"),
        "ray_loop_s": ray_run["loop_s"],
        "torch_loop_s": torch_run["loop_s"],
        "ray_fit_to_first_step_s": ray_run["startup_s"],
        "torch_spawn_to_first_step_s": torch_run["startup_s"],
        "ray_init_s": ray_run["ray_init_s"],
        "ray_build_trainer_s": ray_run["build_trainer_s"],
        "ray_steps": len(ray_run["step_s"]),
        "torch_steps": len(torch_run["step_s"]),
        "warmup_steps": warmup,
    }
    figures["step_ratio"] = figures["ray_step_ms"] / figures["torch_step_ms"]
    figures["fetch_ratio"] = figures["ray_fetch_ms"] / figures["torch_fetch_ms"]
    figures["step_mean_ratio"] = figures["ray_step_mean_ms"] / figures["torch_step_mean_ms"]
    figures["loop_ratio"] = figures["ray_loop_s"] / figures["torch_loop_s"]
    figures["startup_ratio"] = figures["ray_fit_to_first_step_s"] / figures["torch_spawn_to_first_step_s"]
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in figures.items()}


def print_table(f: Dict[str, Any]) -> None:
    """The figures as a small ray | torch | ratio table."""
    rows = [
        ("step, median (ms)", f["ray_step_ms"], f["torch_step_ms"], f["step_ratio"]),
        ("step, mean (ms)", f["ray_step_mean_ms"], f["torch_step_mean_ms"], f["step_mean_ratio"]),
        ("batch fetch, median (ms)", f["ray_fetch_ms"], f["torch_fetch_ms"], f["fetch_ratio"]),
        ("training loop (s)", f["ray_loop_s"], f["torch_loop_s"], f["loop_ratio"]),
        ("start to first step (s)", f["ray_fit_to_first_step_s"], f["torch_spawn_to_first_step_s"], f["startup_ratio"]),
    ]
    print(f"\n{'':26}{'ray':>10}{'torch':>10}{'ratio':>8}")
    for name, ray_value, torch_value, ratio in rows:
        print(f"{name:26}{ray_value:>10.3f}{torch_value:>10.3f}{ratio:>8.2f}")
    print(f"steps: ray {f['ray_steps']}, torch {f['torch_steps']} (median/mean skip the first {f['warmup_steps']}); "
          f"before fit(): ray.init {f['ray_init_s']:.2f} s, build_trainer {f['ray_build_trainer_s']:.2f} s; "
          f"load average {f['load_avg_1m_start']} at start, {f['load_avg_1m_end']} at end")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=10, help="passes over the digits train split")
    parser.add_argument("--batch-size", type=int, default=64, help="global batch size (split over 2 workers)")
    parser.add_argument("--warmup", type=int, default=5, help="first steps left out of the step statistics")
    args = parser.parse_args()

    load_at_start = round(os.getloadavg()[0], 2)
    root = tempfile.mkdtemp(prefix="train-overhead-")
    try:
        cfg = PipelineConfig(
            storage=StorageConfig(root=f"file://{root}"), tracking=TrackingConfig(enabled=False),
            scaling=ScalingConfig(num_workers=WORKERS, torch_threads=1),
            train=TrainConfig(epochs=args.epochs, batch_size=args.batch_size, max_failures=0),
        )
        info = prepare_dataset(DataConfig(), cfg.storage.root)
        # torch first, on a machine Ray's daemons are not yet sharing.
        torch_run = run_torch(cfg, info)
        ray_run = run_ray(cfg, info)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    figures = summarize(ray_run, torch_run, args.warmup)
    # Step times on a small shared machine mean little without knowing what else was running;
    # the end reading includes this bench's own processes.
    figures["load_avg_1m_start"], figures["load_avg_1m_end"] = load_at_start, round(os.getloadavg()[0], 2)
    print_table(figures)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
