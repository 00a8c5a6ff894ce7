"""Tokens/s and start-up of Ray Train DDP against a hand-written torch DDP, on the code_lm recipe.

Both variants train the `experiment=code_lm` GPT (composed from conf/, so it follows the recipe) on the
token blocks its prepared dataset wrote, with 2 ranks of 1 torch thread each, the same global batch,
precision, AdamW, learning-rate schedule, gradient clipping and number of optimizer steps:

  ray    the production path: `orchestrator.flows.connected` (embedded Ray), `prepare_dataset` (a cache
         hit: it lists and digests the corpus, then finds the stored blocks), `build_trainer` with the real
         `train_loop_per_worker`, `fit()`; each rank streams its share through Ray Data
         (`iter_torch_batches`, `_Streamed` in orchestrator/training/loop.py).
  torch  `torch.multiprocessing.spawn` of 2 ranks, gloo on 127.0.0.1, `DistributedDataParallel`; each rank
         reads the same Parquet files with pyarrow and takes its slice of each global batch in the same
         windowed, seeded order as the loop; plain mean cross-entropy (padding ignored).

Each variant runs in its own child process, started by this script; "start to first step" is wall clock
from that child's start (before it imports torch or Ray) to the end of rank 0's first optimizer step.
The loop does not record its first step, and this benchmark does not edit it: the Ray variant passes
`build_trainer` a `loop=` wrapper that patches `orchestrator.training.loop.make_runner` in the worker so
the runner it returns times every `step()` call (start and end), then calls the real
`train_loop_per_worker`. The torch variant times its steps the same way.

Steady-state tokens/s: target tokens (padding excluded, summed over ranks) over the seconds of the
training part of every epoch but the first, in both variants: the loop's own `train_tokens` and
`train_time_s` for Ray (from `result.run_history`), the same span for torch (first batch request to
the all-reduce of the epoch's counts). The torch variant runs before and after the Ray one, and the
ratio uses their mean, so drifting load from other work on the machine hits both alike.
"Between steps" is the median gap from the end of one step to the start of the next inside an epoch:
fetching and collating the next batch plus the loop's own bookkeeping.

    PYTHONPATH=. .venv/bin/python bench/train_throughput.py [--epochs 3] [--steps 40] [--precision fp32|bf16]
"""

from __future__ import annotations

import time

STARTED_AT = time.time()  # this process's start, before torch or Ray are imported

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Dict, Iterator, List, Optional  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

WORKERS = 2


# --- the configuration both variants train ---------------------------------------------------

def compose_recipe(overrides: List[str]):
    """The PipelineConfig a job composes from conf/ with `overrides` (e.g. ["experiment=code_lm", ...])."""
    from hydra import compose, initialize_config_dir

    from orchestrator.config import register_configs, to_config

    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return to_config(compose("config", overrides=overrides))


def recipe(args: argparse.Namespace):
    """The code_lm recipe as a job composes it, with this run's storage root, length and precision."""
    overrides = [
        "experiment=code_lm", f"storage.root=file://{args.root}", f"train.epochs={args.epochs}",
        f"train.steps_per_epoch={args.steps}", "train.max_failures=0", "tracking.enabled=false",
        f"scaling.num_workers={WORKERS}", "scaling.torch_threads=1",
    ]
    return compose_recipe(overrides + ([f"train.precision={args.precision}"] if args.precision else []))


def write_json(path: str, payload: Dict[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump(payload, f)


def step_timer(steps: List[List[float]]):
    """A wrapper of a training step that appends [start, end] (time.time()) of every call to `steps`."""
    def wrap(step):
        def timed(*args, **kwargs):
            started = time.time()
            out = step(*args, **kwargs)
            steps.append([started, time.time()])
            return out
        return timed
    return wrap


# --- Ray Train ---------------------------------------------------------------------------------

def timed_train_loop(loop_config: Dict[str, Any]) -> None:
    """The real `train_loop_per_worker`, with every runner's `step()` timed; each rank writes its timings."""
    import ray.train

    import orchestrator.training.loop as loop_module

    entered_at = time.time()
    steps: List[List[float]] = []
    runner_at: List[float] = []
    make_runner = loop_module.make_runner

    def timed_make_runner(*args, **kwargs):
        runner = make_runner(*args, **kwargs)
        runner_at.append(time.time())
        runner.step = step_timer(steps)(runner.step)  # type: ignore[method-assign]
        return runner

    loop_module.make_runner = timed_make_runner
    try:
        loop_module.train_loop_per_worker(loop_config)
    finally:
        loop_module.make_runner = make_runner
    rank = ray.train.get_context().get_world_rank()
    write_json(os.path.join(loop_config["timing_dir"], f"rank{rank}.json"),
               {"entered_at": entered_at, "runner_at": runner_at[0] if runner_at else None, "steps": steps})


def ray_variant(args: argparse.Namespace) -> Dict[str, Any]:
    """A Ray Train fit() of the code_lm recipe as a job runs it, its steps timed by `timed_train_loop`."""
    cfg = recipe(args)
    from orchestrator.flows import connected
    from orchestrator.training.data import prepare_dataset
    from orchestrator.training.loop import build_trainer, result_from_ray
    from orchestrator.training.tasks import get_task

    imported_at = time.time()
    timing_dir = tempfile.mkdtemp(prefix="ray-steps-", dir=args.root)
    with connected(cfg):
        connected_at = time.time()
        info = prepare_dataset(cfg.data, cfg.storage.root)
        prepared_at = time.time()
        # A fresh run name: a run of the same name under this root would resume from its checkpoints.
        trainer = build_trainer(cfg, info, run_name=f"throughput-{time.time_ns()}", group="bench",
                                storage_subdir="bench", loop=timed_train_loop,
                                extra_loop_config={"timing_dir": timing_dir})
        fit_at = time.time()
        result = result_from_ray(trainer.fit(), cfg.storage.root, info, get_task(cfg.task.name))
    with open(os.path.join(timing_dir, "rank0.json")) as f:
        rank0 = json.load(f)
    return {
        "marks": {"imports": imported_at, "ray.init": connected_at, "prepare_dataset": prepared_at,
                  "build_trainer": fit_at, "worker loop entered": rank0["entered_at"],
                  "model + runner built": rank0["runner_at"]},
        "steps": rank0["steps"],
        "epochs": [{"tokens": row["train_tokens"], "seconds": row["train_time_s"], "train_loss": row["train_loss"]}
                   for row in result.run_history],
        "params": _params(cfg, info),
        "precision": str(cfg.train.precision),
    }


def _params(cfg, info) -> int:
    from orchestrator.training.gpt import GPT, parameter_count
    from orchestrator.training.models import build_model

    model = build_model(cfg.model, info.input_shape, info.num_classes)
    return parameter_count(model) if isinstance(model, GPT) else 0


# --- hand-written torch DDP ------------------------------------------------------------------

def token_windows(files: List[str], rows: int, width: int) -> Iterator[Any]:
    """The split's token blocks in stored order, `rows` at a time (the last window may be shorter)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from orchestrator.registry import storage

    pending: List[Any] = []
    held = 0
    for file in files:
        fs, path = storage.filesystem(file)
        with fs.open(path, "rb") as f:
            parquet = pq.ParquetFile(f)
            for group in range(parquet.num_row_groups):
                column = parquet.read_row_group(group, columns=["tokens"]).column(0).combine_chunks()
                if isinstance(column, pa.ExtensionArray):  # Ray's tensor type over a list column
                    column = column.storage
                pending.append(column.flatten().to_numpy().reshape(-1, width))
                held += len(pending[-1])
                while held >= rows:
                    window = np.concatenate(pending)
                    yield window[:rows]
                    pending, held = [window[rows:]], len(window) - rows
    if held:
        yield np.concatenate(pending)


def rank_batches(files: List[str], width: int, rank: int, batch: int, seed: int, window: int = 64):
    """This rank's micro-batches (int32 [batch, width]), pass after pass, in the loop's order: each window of
    `window` global batches permuted by a generator seeded per pass, rank r taking slice r of each."""
    import torch

    global_batch = batch * WORKERS
    mine = slice(rank * batch, (rank + 1) * batch)
    index = 0
    while True:
        generator = torch.Generator().manual_seed(seed * 1_000_003 + index)
        for rows in token_windows(files, global_batch * window, width):
            tokens = torch.from_numpy(rows)
            count = len(tokens) // global_batch * global_batch
            order = torch.randperm(len(tokens), generator=generator)[:count]
            for start in range(0, count, global_batch):
                yield tokens[order[start: start + global_batch][mine]]
        index += 1


def torch_rank(rank: int, port: int, cfg, info, out: str) -> None:
    """One spawned rank: gloo, DDP over the recipe's GPT, this rank's batches; every rank writes its timings."""
    import contextlib

    import torch
    import torch.distributed as dist
    from torch import nn

    from orchestrator.training.models import build_model
    from orchestrator.training.parallel import lr_factor, make_optimizer
    from orchestrator.training.text import split_files

    entered_at = time.time()
    torch.set_num_threads(cfg.scaling.torch_threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORKERS)
    torch.manual_seed(cfg.train.seed)
    model = nn.parallel.DistributedDataParallel(build_model(cfg.model, info.input_shape, info.num_classes))
    optimizer = make_optimizer(cfg.train, model.parameters())
    base_lr = cfg.train.lr
    batches = rank_batches(split_files(info.train_url), info.context + 1, rank,
                           cfg.train.batch_size // WORKERS, cfg.train.seed)
    ready_at = time.time()
    steps: List[List[float]] = []
    epochs = []
    total = cfg.train.epochs * cfg.train.steps_per_epoch
    bf16 = cfg.train.precision == "bf16"

    @step_timer(steps)
    def step(tokens: torch.Tensor) -> torch.Tensor:
        inputs, targets = tokens[:, :-1].long(), tokens[:, 1:].long()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
            logits = model(inputs)
        loss = nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=0)
        loss.backward()  # DDP all-reduces gradients here
        for group in optimizer.param_groups:
            group["lr"] = base_lr * lr_factor(cfg.train, len(steps), total)
        if cfg.train.grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        optimizer.step()
        return (targets != 0).sum()

    for _ in range(cfg.train.epochs):
        started = time.perf_counter()
        counted = torch.stack([step(next(batches)) for _ in range(cfg.train.steps_per_epoch)]).sum().double()
        dist.all_reduce(counted)
        epochs.append({"tokens": float(counted), "seconds": time.perf_counter() - started})
    dist.destroy_process_group()
    write_json(os.path.join(out, f"rank{rank}.json"),
               {"entered_at": entered_at, "ready_at": ready_at, "steps": steps, "epochs": epochs})
    os._exit(0)  # see bench/train_overhead.py: a gloo thread can abort interpreter finalization


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torch_variant(args: argparse.Namespace) -> Dict[str, Any]:
    """A spawn()ed 2-rank torch DDP run of the same recipe on the prepared dataset's token blocks."""
    import torch.multiprocessing as mp

    from orchestrator.training.data import DatasetInfo

    imported_at = time.time()
    cfg = recipe(args)
    with open(args.info) as f:
        info = DatasetInfo(**json.load(f))
    timing_dir = tempfile.mkdtemp(prefix="torch-steps-", dir=args.root)
    spawn_at = time.time()
    mp.spawn(torch_rank, args=(_free_port(), cfg, info, timing_dir), nprocs=WORKERS, join=True)
    with open(os.path.join(timing_dir, "rank0.json")) as f:
        rank0 = json.load(f)
    return {
        "marks": {"imports": imported_at, "spawn": spawn_at, "rank entered": rank0["entered_at"],
                  "model + data ready": rank0["ready_at"]},
        "steps": rank0["steps"], "epochs": rank0["epochs"],
    }


def prepare_variant(args: argparse.Namespace) -> Dict[str, Any]:
    """Tokenize the recipe's corpus once (the later runs find it stored); returns the DatasetInfo as a dict."""
    from dataclasses import asdict

    from orchestrator.flows import connected
    from orchestrator.training.data import prepare_dataset

    cfg = recipe(args)
    with connected(cfg):
        started = time.time()
        info = prepare_dataset(cfg.data, cfg.storage.root)
    return {"info": asdict(info), "seconds": time.time() - started}


VARIANTS = {"prepare": prepare_variant, "ray": ray_variant, "torch": torch_variant}


def child(args: argparse.Namespace) -> None:
    """Run one variant in this process and write what it measured, with this process's start, to args.out."""
    write_json(args.out, {"started_at": STARTED_AT, **VARIANTS[args.role](args)})


def launch(role: str, args: argparse.Namespace, info_path: Optional[str] = None) -> Dict[str, Any]:
    """Run `role` in a fresh Python process; its start counts as the job's start."""
    out = os.path.join(args.root, f"{role}-{time.time_ns()}.json")
    command = [sys.executable, str(Path(__file__).resolve()), "--role", role, "--out", out, "--root", args.root,
               "--epochs", str(args.epochs), "--steps", str(args.steps)]
    command += ["--precision", args.precision] if args.precision else []
    command += ["--info", info_path] if info_path else []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    launched_at = time.time()
    subprocess.run(command, check=True, env=env)
    with open(out) as f:
        result = json.load(f)
    result["launched_at"] = launched_at
    return result


# --- report ----------------------------------------------------------------------------------

def summarize(run: Dict[str, Any], steps_per_epoch: int) -> Dict[str, Any]:
    """Steady-state tokens/s (epochs after the first), step and between-step medians, start-up marks."""
    steady = run["epochs"][1:]
    steps = run["steps"]
    later = steps[steps_per_epoch:]
    gaps = [b[0] - a[1] for i, (a, b) in enumerate(zip(later, later[1:]), start=1) if i % steps_per_epoch]
    start = run["launched_at"]
    return {
        "tokens_per_s": sum(e["tokens"] for e in steady) / sum(e["seconds"] for e in steady),
        "epoch_tokens_per_s": [round(e["tokens"] / e["seconds"], 1) for e in run["epochs"]],
        "step_ms": 1000 * statistics.median(b - a for a, b in later),
        "between_ms": 1000 * statistics.median(gaps) if gaps else 0.0,
        "first_step_s": steps[0][1] - start,
        "marks_s": {name: round(at - start, 2) for name, at in run["marks"].items() if at},
        "interpreter_s": round(run["started_at"] - start, 2),
    }


def print_report(ray_fig: Dict[str, Any], torch_figs: List[Dict[str, Any]], figures: Dict[str, Any]) -> None:
    torch_mean = {k: statistics.fmean(f[k] for f in torch_figs) for k in ("tokens_per_s", "step_ms", "between_ms",
                                                                          "first_step_s")}
    rows = [
        ("tokens/s, steady (epochs 2+)", "tokens_per_s", ".0f", "ray_over_torch_tokens_per_s"),
        ("step, median (ms)", "step_ms", ".1f", None),
        ("between steps, median (ms)", "between_ms", ".2f", None),
        ("start to first step (s)", "first_step_s", ".1f", "startup_ratio"),
    ]
    print("\n| | ray | torch (before / after) | ratio ray/torch |\n|---|---|---|---|")
    for name, key, fmt, ratio in rows:
        each = " / ".join(format(f[key], fmt) for f in torch_figs)
        value = figures[ratio] if ratio else ray_fig[key] / torch_mean[key]
        print(f"| {name} | {format(ray_fig[key], fmt)} | {format(torch_mean[key], fmt)} ({each}) | {value:.3f} |")
    print()
    for label, f in [("ray", ray_fig)] + [(f"torch run {i + 1}", f) for i, f in enumerate(torch_figs)]:
        marks = ", ".join(f"{k} {v}" for k, v in f["marks_s"].items())
        print(f"{label} start-up, s from process start: interpreter {f['interpreter_s']}, {marks}, "
              f"first step {f['first_step_s']:.2f}")
    print(f"per-epoch tokens/s: ray {ray_fig['epoch_tokens_per_s']}; torch "
          + "; ".join(str(f["epoch_tokens_per_s"]) for f in torch_figs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=3, help="epochs per variant; the first is left out of tokens/s")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per epoch")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default=None, help="default: the recipe's")
    parser.add_argument("--root", default=None, help="storage root (default: a temporary folder, removed after)")
    parser.add_argument("--role", choices=sorted(VARIANTS), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--info", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role:
        child(args)
        return
    temporary = args.root is None
    args.root = args.root or tempfile.mkdtemp(prefix="train-throughput-")
    load_at_start = round(os.getloadavg()[0], 2)
    try:
        prepared = launch("prepare", args)
        info_path = os.path.join(args.root, "info.json")
        write_json(info_path, prepared["info"])
        runs = [launch("torch", args, info_path), launch("ray", args), launch("torch", args, info_path)]
    finally:
        if temporary:
            shutil.rmtree(args.root, ignore_errors=True)
    torch_figs = [summarize(runs[0], args.steps), summarize(runs[2], args.steps)]
    ray_fig = summarize(runs[1], args.steps)
    torch_tokens = statistics.fmean(f["tokens_per_s"] for f in torch_figs)
    torch_start = statistics.fmean(f["first_step_s"] for f in torch_figs)
    figures = {
        "ray_tokens_per_s": round(ray_fig["tokens_per_s"], 1), "torch_tokens_per_s": round(torch_tokens, 1),
        "ray_over_torch_tokens_per_s": round(ray_fig["tokens_per_s"] / torch_tokens, 4),
        "ray_first_step_s": round(ray_fig["first_step_s"], 2), "torch_first_step_s": round(torch_start, 2),
        "startup_ratio": round(ray_fig["first_step_s"] / torch_start, 3),
        "prepare_s": round(prepared["seconds"], 1), "params": runs[1]["params"],
        "precision": runs[1]["precision"], "epochs": args.epochs, "steps_per_epoch": args.steps,
        "load_avg_1m_start": load_at_start, "load_avg_1m_end": round(os.getloadavg()[0], 2),
    }
    print_report(ray_fig, torch_figs, figures)
    print(f"first tokenization of the corpus (not in the start-up above): {figures['prepare_s']} s; "
          f"GPT params {figures['params']:,}; load average {load_at_start} at start, "
          f"{figures['load_avg_1m_end']} at end")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
