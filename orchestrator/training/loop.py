"""One distributed training run: a Ray Train V2 TorchTrainer over Ray Data.

Each worker runs the configured schedule (orchestrator.training.schedules) phase by phase under the
configured parallel plan (orchestrator.training.parallel). Each epoch reports train loss, the whole model's
val loss and accuracy, the phase model's accuracy and the compute spent so far, with a checkpoint
(rank 0 writes it). A failed worker group is restarted by Ray Train (`train.max_failures`) and every
rank resumes from the latest reported checkpoint, in the phase and epoch it had reached.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from orchestrator.config import PipelineConfig, to_dict
from orchestrator.registry import storage
from orchestrator.training.checkpoints import (
    TornCheckpoint,
    complete_checkpoints,
    newest_complete,
    read_verified,
    write_manifest,
)
from orchestrator.training.data import DatasetInfo, prepare_dataset, ray_datasets
from orchestrator.training.flops import gpt_flops_per_token, peak_flops
from orchestrator.training.gpt import GPT
from orchestrator.training.models import StagedModel, build_model
from orchestrator.training.parallel import make_runner, shards_data
from orchestrator.training.phases import (
    Compute,
    PhaseModel,
    add_cache_compute,
    add_epoch_compute,
    forward_flops,
    make_aux_heads,
)
from orchestrator.training.resume import mark_done, run_name_for
from orchestrator.training.schedules import HEAD, Phase, expand_schedule, schedule_epochs
from orchestrator.training.tasks import Task, get_task
from orchestrator.training.tracking import start_tracking

STATE_FILE = "state.pt"
HISTORY_FILE = "history.json"


@dataclass(kw_only=True)
class TrainResult:
    """What a training run produced."""

    metrics: Dict[str, Any]
    """Metrics of the best checkpoint (by the task's selection metric: val accuracy, val loss)."""
    checkpoint_path: str
    """Path of the best checkpoint, inside the storage root's filesystem."""
    history: List[Dict[str, Any]] = field(default_factory=list)
    """Per-epoch metrics up to the best checkpoint."""
    run_path: str = ""
    """Folder of the run's Ray Train results."""
    data: Optional[DatasetInfo] = None
    """The dataset it was trained on."""
    run_history: List[Dict[str, Any]] = field(default_factory=list)
    """Per-epoch metrics of the whole run (from its latest checkpoint)."""


@dataclass
class _Resume:
    """Where a restarted run picks up: the checkpoint's epoch, history, optimizer state and compute."""

    epoch: int = 0
    history: List[Dict[str, Any]] = field(default_factory=list)
    optimizer: Any = None
    compute: Compute = field(default_factory=Compute)
    steps: int = 0
    """Optimizer steps taken so far, over every epoch of the run."""


def train_loop_per_worker(loop_config: Dict[str, Any]) -> None:
    """The function every Ray Train worker runs. `loop_config` holds 'cfg', 'data', 'run_name', 'group', 'run_url'.

    Runs the configured schedule phase by phase under the configured parallel plan; reports every
    epoch with a checkpoint, and resumes from the newest complete checkpoint of the run (Ray's latest,
    or a newer one on storage whose report Ray lost) in the right phase and epoch.
    """
    import ray.train
    import ray.train.torch

    cfg: PipelineConfig = loop_config["cfg"]
    info: DatasetInfo = loop_config["data"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(cfg.scaling.torch_threads)
    torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank, whatever the plan
    device = ray.train.torch.get_device()
    task = get_task(cfg.task.name)

    model = build_model(cfg.model, info.input_shape, info.num_classes)
    phases = expand_schedule(cfg.schedule, model.stage_names, epochs=cfg.train.epochs, lr=cfg.train.lr)
    aux_heads = make_aux_heads(model, phases, info.num_classes, cfg.train.seed)
    flops = forward_flops(model, aux_heads)
    model.to(device), aux_heads.to(device)
    resume = _restore(
        _resume_point(cfg.storage.root, loop_config["run_url"], ray.train.get_checkpoint(), rank),
        cfg.storage.root,
        model,
        aux_heads,
    )

    shard = shards_data(cfg.parallel)
    train_rank, train_world = (rank, world) if shard else (0, 1)
    micro_batch = max(1, cfg.train.batch_size // train_world) if shard else cfg.train.batch_size
    source: _Source
    if info.kind == "text":
        source = _Streamed(
            train=ray.train.get_dataset_shard("train"), val=ray.train.get_dataset_shard("val"), task=task,
            rank=train_rank, world=train_world, batch=micro_batch, seed=cfg.train.seed, rows=info.num_train,
            device=device, val_batches=cfg.train.val_batches,
        )
    else:
        source = _InMemory(
            train=worker_rows(ray.train.get_dataset_shard("train"), train_rank, train_world, device),
            val=worker_rows(ray.train.get_dataset_shard("val"), 0, 1, device), task=task, batch=micro_batch,
            capped=cfg.train.steps_per_epoch > 0,
        )
    tracker = start_tracking(
        cfg.tracking,
        cfg.storage.root,
        name=loop_config["run_name"],
        group=loop_config["group"],
        config=to_dict(cfg),
        rank=rank,
        run_url=loop_config["run_url"],
    )
    run = _Run(cfg=cfg, task=task, model=model, aux_heads=aux_heads, flops=flops, rank=rank, world=world,
               device=device, source=source, resume=resume, tracker=tracker, phases=phases,
               flops_per_token=_flops_per_token(model), peak=peak_flops(device, str(cfg.train.precision),
                                                                          cfg.train.peak_tflops))
    for phase in phases:
        if phase.end_epoch > resume.epoch:
            run.phase(phase)
    tracker.finish()


def _flops_per_token(model: StagedModel) -> Optional[float]:
    """Training FLOPs per token of a transformer (for MFU); None for models that do not read tokens."""
    return gpt_flops_per_token(model) if isinstance(model, GPT) else None


class _Source:
    """Where a worker's training and validation batches come from."""

    rows_are_tokens = False

    def steps_per_epoch(self, accum: int) -> int:
        """Optimizer steps of one pass over this rank's training rows."""
        raise NotImplementedError

    def train_rows(self) -> int:
        """Training rows this rank holds (what a cached prefix would cover)."""
        return 0

    def prepare(self, phase_model: PhaseModel, runner, cached: bool) -> int:
        """Run before a phase's epochs; returns the rows whose frozen prefix it computed (0: none)."""
        return 0

    def train_batches(self, phase_model: PhaseModel, runner, epoch: int, steps: int, start_step: int,
                      accum: int, cached: bool, seed: int) -> Iterator[Tuple[Any, torch.Tensor, int]]:
        """(inputs, targets, rows) of the micro-batches of `epoch` (`steps` optimizer steps of `accum` each, or
        one pass over in-memory rows); the run has taken `start_step` optimizer steps before it, and `seed`
        orders this epoch. `inputs` is None where the runner does not read them."""
        raise NotImplementedError

    def eval_batches(self, rank: int, world: int) -> Iterator[Tuple[torch.Tensor, torch.Tensor, Dict[str, Any]]]:
        """(inputs, targets, batch) of this rank's share of the val split: every batch exactly once over ranks."""
        raise NotImplementedError


class _InMemory(_Source):
    """Tabular splits held as tensors (small data): shuffled per epoch by a seeded permutation; a frozen
    prefix can be computed once per phase."""

    def __init__(self, *, train: Tuple[torch.Tensor, torch.Tensor], val: Tuple[torch.Tensor, torch.Tensor],
                 task: Task, batch: int, capped: bool):
        self.train, self.val, self.task, self.batch = train, val, task, batch
        self.capped = capped
        """train.steps_per_epoch is set: an epoch is at most that many steps."""
        self.features = train[0]

    def steps_per_epoch(self, accum):
        return max(1, len(self.train[1]) // self.batch // accum)

    def train_rows(self):
        return len(self.train[1])

    def prepare(self, phase_model, runner, cached):
        x, y = self.train
        self.features = x
        if cached and runner.needs_inputs:  # the frozen prefix runs once per phase, not once per epoch
            self.features = phase_model.cached_features(x)
        return len(y) if cached and runner.needs_inputs else 0

    def train_batches(self, phase_model, runner, epoch, steps, start_step, accum, cached, seed):
        y = self.train[1]
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
        batch = self.batch
        # A pipeline's micro-batch shapes are fixed at its first step: it skips a last, smaller batch.
        stop = len(order) - len(order) % batch if not runner.shards_data else len(order)
        if accum > 1 or self.capped:  # whole optimizer steps only, at most `steps` of them
            stop = min(len(order) // (batch * accum), steps) * batch * accum
        for start in range(0, stop, batch):
            index = order[start: start + batch]
            inputs = None
            if runner.needs_inputs:
                inputs = self.features[index] if cached else phase_model.features(self.train[0][index])
            yield inputs, y[index], len(index)

    def eval_batches(self, rank, world, batch: int = 512):
        x, y = self.val
        for i, start in enumerate(range(0, len(y), batch)):
            if i % world == rank:
                yield x[start: start + batch], y[start: start + batch], {}


class _Streamed(_Source):
    """Token blocks streamed from Ray Data (`iter_torch_batches`): no rank holds a split, memory stays flat.

    The train stream is one position-addressed sequence of micro-batches over every epoch and phase:
    pass p reads the split in its stored order, window by window, and permutes each window of
    `window` global batches with a generator seeded by (train.seed, p); rank r takes its slice of each
    global batch. A run resumed after s optimizer steps skips the first s * accum micro-batches (read,
    not trained), so it sees exactly the batches an uninterrupted run would.
    """

    rows_are_tokens = True

    def __init__(self, *, train, val, task: Task, rank: int, world: int, batch: int, seed: int, rows: int,
                 device: torch.device, val_batches: int, window: int = 64):
        self.train, self.val, self.task = train, val, task
        self.rank, self.world, self.batch, self.seed = rank, world, batch, seed
        self.device, self.val_batches = device, val_batches
        self.global_batch = batch * world
        self.window_rows = self.global_batch * window
        full_windows, tail = divmod(rows, self.window_rows)
        self.per_pass = full_windows * window + tail // self.global_batch
        if self.per_pass < 1:
            raise ValueError(
                f"the training split has {rows} blocks: fewer than one global batch of {self.global_batch}"
            )
        self._stream: Optional[Iterator[Dict[str, torch.Tensor]]] = None
        self._position = -1

    def steps_per_epoch(self, accum):
        return max(1, self.per_pass // accum)

    def train_batches(self, phase_model, runner, epoch, steps, start_step, accum, cached, seed):
        position = start_step * accum
        if self._stream is None or self._position != position:
            self._stream, self._position = self._from(position), position
        for _ in range(steps * accum):
            batch = next(self._stream)
            self._position += 1
            inputs, targets = self.task.batch(batch, self.device)
            yield (phase_model.features(inputs) if runner.needs_inputs else None), targets, len(targets)

    def _from(self, position: int) -> Iterator[Dict[str, torch.Tensor]]:
        pass_index, skip = divmod(position, self.per_pass)
        while True:
            for i, batch in enumerate(self._pass(pass_index)):
                if i >= skip:
                    yield batch
            pass_index, skip = pass_index + 1, 0

    def _pass(self, index: int) -> Iterator[Dict[str, torch.Tensor]]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        mine = slice(self.rank * self.batch, (self.rank + 1) * self.batch)
        for window in self.train.iter_torch_batches(batch_size=self.window_rows, drop_last=False):
            count = len(window["tokens"]) // self.global_batch * self.global_batch
            order = torch.randperm(len(window["tokens"]), generator=generator)[:count]
            for start in range(0, count, self.global_batch):
                rows = order[start: start + self.global_batch][mine]
                yield {name: column[rows] for name, column in window.items()}

    def eval_batches(self, rank, world, batch: int = 0):
        size = batch or self.batch
        for i, raw in enumerate(self.val.iter_torch_batches(batch_size=size)):
            if self.val_batches and i >= self.val_batches:
                break
            if i % world == rank:
                inputs, targets = self.task.batch(raw, self.device)
                yield inputs, targets, raw


@dataclass(kw_only=True)
class _Run:
    """State one worker carries through a schedule."""

    cfg: PipelineConfig
    task: Task
    model: StagedModel
    aux_heads: nn.ModuleDict
    flops: Dict[str, float]
    rank: int
    world: int
    device: torch.device
    source: _Source
    resume: _Resume
    tracker: Any
    phases: List[Phase]
    flops_per_token: Optional[float] = None
    peak: Optional[float] = None
    cache_mb: float = 0.0
    """MB of the current phase's cached frozen prefix on this worker (0: not cached)."""

    def total_steps(self) -> int:
        per_epoch = self.epoch_steps()
        return per_epoch * sum(p.end_epoch - p.first_epoch for p in self.phases)

    def epoch_steps(self) -> int:
        accum = self.cfg.train.grad_accum_steps
        return self.cfg.train.steps_per_epoch or self.source.steps_per_epoch(accum)

    def phase(self, phase: Phase) -> None:
        cfg = self.cfg
        phase_model = PhaseModel(self.model, self.aux_heads, phase)
        runner = make_runner(
            cfg.parallel, phase_model.trainable, phase_model.param_groups(), cfg.train, self.device,
            loss=self.task.loss_sum, counted=self.task.counted, padded=self.task.padded, start_step=self.resume.steps,
            total_steps=self.total_steps(),
        )
        start = max(phase.first_epoch, self.resume.epoch)
        if start > phase.first_epoch and self.resume.optimizer is not None:
            runner.load_optimizer_state(self.resume.optimizer)  # mid-phase resume keeps the optimizer's moments
        # A frozen prefix is computed once per phase where the rows are held (tabular); streamed data runs it
        # per batch, outside autograd.
        cached = cfg.schedule.cache_frozen and bool(phase.frozen_prefix) and not self.source.rows_are_tokens
        self.cache_mb = self._cache_mb(phase_model) if cached else 0.0
        if self.cache_mb > cfg.schedule.cache_max_mb:  # too big to hold: recompute the prefix batch by batch
            cached, self.cache_mb = False, 0.0
        prefix_rows = self.source.prepare(phase_model, runner, cached)
        if cached:
            add_cache_compute(self.resume.compute, phase, self.flops, self._global(prefix_rows, runner))
        for epoch in range(start, phase.end_epoch):
            self._epoch(phase, phase_model, runner, epoch, cached)

    def _cache_mb(self, phase_model: PhaseModel) -> float:
        """MB this worker's cache of the phase's frozen prefix would take."""
        return self.source.train_rows() * phase_model.prefix_bytes_per_row() / 2**20

    def _epoch(self, phase: Phase, phase_model: PhaseModel, runner, epoch: int, cached: bool) -> None:
        cfg = self.cfg
        started = time.perf_counter()
        phase_model.train()
        steps = self.epoch_steps()
        # Running sums on the device: a float() per step would sync a GPU every step, and a list of one small
        # tensor per step pins glibc's heap between the step's large buffers (worker RSS grew 11x on a 10x corpus).
        total, counted, rows = torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64), 0
        micro = 0
        for inputs, targets, batch_rows in self.source.train_batches(
            phase_model, runner, epoch, steps, self.resume.steps, cfg.train.grad_accum_steps, cached,
            seed=cfg.train.seed + epoch,
        ):
            loss_sum, count = runner.step(inputs, targets)
            total = total.to(loss_sum.device) + loss_sum.detach().double()
            counted = counted.to(loss_sum.device) + torch.as_tensor(count, device=loss_sum.device).double()
            rows += batch_rows
            micro += 1
        runner.sync()
        taken = micro // cfg.train.grad_accum_steps
        self.resume.steps += taken
        total, counted = total.cpu(), counted.cpu()
        train_stats = _all_reduce(torch.stack([total.double(), counted.double()]))
        train_loss = float(train_stats[0] / max(float(train_stats[1]), 1.0))
        train_time = time.perf_counter() - started
        add_epoch_compute(self.resume.compute, phase, self.flops, self._global(rows, runner), cached=cached)
        self.model.eval()
        val = self._evaluate(self.model)
        metrics: Dict[str, Any] = {
            "epoch": epoch + 1,
            "phase": phase.index,
            "phase_name": phase.name,
            "train_loss": train_loss,
            **val,
        }
        if phase.output != HEAD:  # what the phase trains (stage + auxiliary head), beside the whole model
            phase_model.trainable.eval()
            phase_val = self._evaluate(lambda v: phase_model.trainable(phase_model.features(v)))
            metrics[f"phase_{self.task.selection_metric}"] = phase_val[self.task.selection_metric]
        else:
            metrics[f"phase_{self.task.selection_metric}"] = val[self.task.selection_metric]
        if self.source.rows_are_tokens:
            predicted = float(train_stats[1])  # tokens that were targets, over every rank
            metrics["train_tokens"] = predicted
            metrics["tokens_per_s"] = predicted / train_time
            metrics["tokens_seen"] = self._tokens_seen(predicted)
            if self.flops_per_token and self.peak:
                metrics["mfu"] = metrics["tokens_per_s"] * self.flops_per_token / (self.peak * self.world)
        metrics.update({
            "peak_rss_mb": _peak_rss_mb(),
            "epoch_time_s": time.perf_counter() - started,
            "train_time_s": train_time,
            "restored_epoch": self.resume.epoch,
            "prefix_cache_mb": self.cache_mb,
            "steps": self.resume.steps,
            **self.resume.compute.as_metrics(),
            **self.tracker.run_reference(),  # rank 0's report names its tracking run for the driver
        })
        self.resume.history.append(metrics)
        self.tracker.log(metrics, step=epoch + 1)
        optimizer_state = runner.optimizer_state()  # every rank: some plans gather it collectively
        state = {
            "model": self.model.state_dict(),
            "aux_heads": self.aux_heads.state_dict(),
            "optimizer": optimizer_state,
            "epoch": metrics["epoch"],
        }
        report_epoch(metrics, self.resume.history, state, self.rank)

    def _tokens_seen(self, this_epoch: float) -> float:
        earlier = self.resume.history[-1]["tokens_seen"] if self.resume.history else 0.0
        return float(earlier) + this_epoch

    @torch.no_grad()
    def _evaluate(self, forward) -> Dict[str, float]:
        """The task's val metrics of `forward` over the whole val split (or train.val_batches of it)."""
        sums: Optional[torch.Tensor] = None
        for inputs, targets, batch in self.source.eval_batches(self.rank, self.world):
            part = self.task.eval_sums(forward(inputs), targets, batch)
            sums = part if sums is None else sums + part
        if sums is None:  # a rank with no val batch still takes part in the all-reduce
            sums = self.task.zero_sums()
        return self.task.metrics(_all_reduce(sums), "val_")

    def _global(self, rows: int, runner) -> int:
        # Sharded plans train on different rows per rank; a pipeline's ranks all see the same rows.
        if not runner.shards_data or not dist.is_initialized():
            return rows
        return int(_all_reduce(torch.tensor([float(rows)]))[0])


def worker_rows(shard, rank: int, world: int, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """All rows of a Ray Data shard as tensors (x, y), keeping every `world`-th from `rank`.

    Every rank keeps the same number of rows (the remainder is dropped), so data-parallel ranks take
    the same number of steps; the stride over a fixed row order makes each rank's share the same in
    every run, which is what lets a resumed or a cached run repeat a plain one exactly.
    """
    xs, ys = [], []
    for batch in shard.iter_torch_batches(batch_size=4096):
        xs.append(batch["x"])
        ys.append(batch["y"])
    x, y = torch.cat(xs), torch.cat(ys)
    keep = len(y) // world
    return x[rank::world][:keep].to(device), y[rank::world][:keep].to(device)


def _resume_point(root: str, run_url: str, ray_checkpoint, rank: int) -> Optional[str]:
    """Path of the checkpoint every rank resumes from: the newest complete one, chosen by rank 0."""
    choice: List[Optional[str]] = [None]
    if rank == 0:
        newest = newest_complete(
            root, storage.filesystem(run_url)[1], also=ray_checkpoint.path if ray_checkpoint is not None else None
        )
        choice = [newest.path if newest is not None else None]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(choice, src=0)  # one choice, even if a checkpoint completes mid-scan
    return choice[0]


def _restore(path: Optional[str], root: str, model: nn.Module, aux_heads: nn.ModuleDict) -> _Resume:
    """Load the checkpoint at `path` (verified against its manifest), or start fresh when None."""
    if path is None:
        return _Resume()
    _, files = read_verified(root, path)  # every file read once, each checked against the manifest
    state = torch.load(io.BytesIO(files[STATE_FILE]), weights_only=True)
    history = json.loads(files[HISTORY_FILE])
    model.load_state_dict(state["model"])
    aux_heads.load_state_dict(state["aux_heads"])
    last = history[-1] if history else {}
    compute = Compute(
        forward_passes=int(last.get("forward_passes", 0)),
        backward_passes=int(last.get("backward_passes", 0)),
        flops=float(last.get("train_gflops", 0.0)) * 1e9,
    )
    return _Resume(
        epoch=int(state["epoch"]),
        history=history,
        optimizer=state["optimizer"],
        compute=compute,
        steps=int(last.get("steps", 0)),
    )


def _peak_rss_mb() -> float:
    """The largest peak resident memory of any rank's process so far, in MiB (Linux reports KiB)."""
    import resource

    peak = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0], dtype=torch.float64)
    if dist.is_initialized() and dist.get_backend() != "nccl":
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    return float(peak[0])


def _all_reduce(stats: torch.Tensor) -> torch.Tensor:
    """Sum a small CPU tensor over ranks (through the GPU when the backend is NCCL, which has no CPU path)."""
    if not dist.is_initialized():
        return stats
    if dist.get_backend() == "nccl":
        on_device = stats.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(on_device)
        return on_device.cpu()
    dist.all_reduce(stats)
    return stats


def report_epoch(metrics: Dict[str, Any], history: List[Dict[str, Any]], state: Dict[str, Any], rank: int) -> None:
    """Report `metrics` to Ray Train; rank 0 attaches a checkpoint of `state` and `history`.

    The checkpoint's manifest is written last (orchestrator.training.checkpoints): one that is cut short never counts.
    """
    import ray.train

    with tempfile.TemporaryDirectory() as folder:
        checkpoint = None
        if rank == 0:  # one copy of the weights is enough; other ranks report metrics only
            torch.save(state, os.path.join(folder, STATE_FILE))
            with open(os.path.join(folder, HISTORY_FILE), "w") as f:
                json.dump(history, f)
            write_manifest(folder, metrics["epoch"])
            checkpoint = ray.train.Checkpoint.from_directory(folder)
        ray.train.report(metrics, checkpoint=checkpoint)


def build_trainer(
    cfg: PipelineConfig,
    info: DatasetInfo,
    *,
    run_name: str,
    group: str,
    storage_subdir: str,
    datasets=None,
    callbacks=None,
    loop: Callable[[Dict[str, Any]], Any] = train_loop_per_worker,
    extra_loop_config: Optional[Dict[str, Any]] = None,
):
    """A TorchTrainer for one run of `cfg` on `info`, storing results under <root>/<storage_subdir>/<run_name>.

    `datasets` are the Ray datasets of `info` when the caller already materialized them (a sweep
    shares one copy between trials). `loop` replaces the worker function (benchmarks time their own);
    `extra_loop_config` adds entries to the dict it receives.
    """
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    fs, path = storage.pyarrow_filesystem(storage.join(cfg.storage.root, storage_subdir))
    run_url = storage.join(cfg.storage.root, storage_subdir, run_name)
    return TorchTrainer(
        loop,
        train_loop_config={
            "cfg": cfg,
            "data": info,
            "run_name": run_name,
            "group": group,
            "run_url": run_url,
            **(extra_loop_config or {}),
        },
        torch_config=TorchConfig(backend=cfg.parallel.backend),
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.scaling.num_workers,
            use_gpu=cfg.scaling.use_gpu,
            resources_per_worker={"CPU": cfg.scaling.cpus_per_worker},
        ),
        # No split by Ray: every rank reads each split in the same order and keeps its own stride of rows
        # (see worker_rows), so a rank's share does not depend on which worker asked for blocks first.
        dataset_config=ray.train.DataConfig(datasets_to_split=[]),
        datasets=datasets or ray_datasets(info),
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=path,
            storage_filesystem=fs,
            callbacks=callbacks or [],
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.train.checkpoints_to_keep,
                checkpoint_score_attribute=get_task(cfg.task.name).selection_metric,
                checkpoint_score_order=get_task(cfg.task.name).selection_mode,
            ),
        ),
    )


def result_from_ray(result, root: str, info: DatasetInfo, task: Optional[Task] = None) -> TrainResult:
    """Turn a Ray Train Result into a TrainResult pointing at the run's best complete checkpoint.

    Checkpoints are taken from storage, verified, rather than from Ray's report bookkeeping, which
    can miss a checkpoint whose worker was killed right after writing it.
    """
    if result.error is not None:
        raise RuntimeError(f"training failed: {result.error}") from result.error
    histories = {
        c.path: json.loads(c.files[HISTORY_FILE]) for c in complete_checkpoints(root, result.path, keep=(HISTORY_FILE,))
    }
    if not histories:
        raise RuntimeError(f"training left no complete checkpoint under {result.path}")
    task = task or get_task("classification")
    sign = 1.0 if task.selection_mode == "max" else -1.0
    best = max(histories, key=lambda path: (sign * histories[path][-1][task.selection_metric],
                                            -histories[path][-1]["epoch"]))
    latest = max(histories, key=lambda path: histories[path][-1]["epoch"])
    return TrainResult(
        metrics=dict(histories[best][-1]), checkpoint_path=best, history=histories[best], run_path=result.path,
        data=info, run_history=histories[latest],
    )


def run_train(cfg: PipelineConfig, info: Optional[DatasetInfo] = None, datasets=None) -> TrainResult:
    """Train `cfg` once (Ray must be connected). Returns metrics and the best checkpoint.

    `datasets` are `ray_datasets(info)` when the caller already materialized them for several runs.
    With `cfg.resume`, continues the newest unfinished training run of `cfg.run_name` instead.
    """
    from orchestrator.training.reports import follow_runs

    info = info or prepare_dataset(cfg.data, cfg.storage.root)
    run_name = run_name_for(cfg, "train")
    task = get_task(cfg.task.name)
    # The Train controller's reports, printed by the driver as they come: a line per epoch, then a summary.
    with follow_runs(task, planned=schedule_epochs(cfg.schedule, cfg.train.epochs)) as runs:
        trainer = build_trainer(
            cfg, info, run_name=run_name, group=cfg.run_name, storage_subdir="ray_results", datasets=datasets,
            callbacks=[runs.events.named(run_name, reports=True)],
        )
        fitted = trainer.fit()
    runs.finished(run_name)
    result = result_from_ray(fitted, cfg.storage.root, info, task)
    mark_done(cfg.storage.root, run_name, {"best_checkpoint": result.checkpoint_path, "metrics": result.metrics})
    return result


def read_checkpoint_file(root: str, checkpoint_path: str, name: str) -> bytes:
    """Bytes of one file of a complete checkpoint that Ray stored under the storage root.

    Raises TornCheckpoint when the file does not match the checkpoint's manifest (or it has none):
    nothing reads a torn checkpoint.
    """
    # Ray reports checkpoint paths inside the storage root's filesystem (absolute paths when local).
    _, contents = read_verified(root, checkpoint_path)
    if name not in contents:
        raise TornCheckpoint(f"{checkpoint_path.rstrip('/')}: {name} is not part of the complete checkpoint")
    return contents[name]


def load_state(root: str, checkpoint_path: str) -> Dict[str, Any]:
    """The torch state of a complete checkpoint (weights_only=True: no pickled code)."""
    return torch.load(io.BytesIO(read_checkpoint_file(root, checkpoint_path, STATE_FILE)), weights_only=True)


def read_history(root: str, checkpoint_path: str) -> List[Dict[str, Any]]:
    """Per-epoch metrics stored in a checkpoint."""
    return json.loads(read_checkpoint_file(root, checkpoint_path, HISTORY_FILE))


def checkpoint_weights(root: str, checkpoint_path: str) -> Dict[str, np.ndarray]:
    """The model weights of a complete checkpoint as numpy arrays."""
    state = load_state(root, checkpoint_path)
    return {name: tensor.detach().cpu().numpy() for name, tensor in state["model"].items()}


def evaluate_checkpoint(cfg: PipelineConfig, info: DatasetInfo, checkpoint_path: str, split: str) -> Dict[str, float]:
    """The task's metrics of a complete checkpoint on one split (e.g. 'test'), named '<split>_<metric>'.

    Runs in a Ray task holding the training workers' resources (free again once training ended), which
    streams the split from Ray Data: the driver never reads it.
    """
    import ray

    cpus = cfg.scaling.num_workers * cfg.scaling.cpus_per_worker

    @ray.remote(num_cpus=cpus, num_gpus=1 if cfg.scaling.use_gpu else 0)
    def evaluate() -> Dict[str, float]:
        torch.set_num_threads(max(1, int(cpus)))
        device = torch.device("cuda") if cfg.scaling.use_gpu and torch.cuda.is_available() else torch.device("cpu")
        task = get_task(cfg.task.name)
        model = build_model(cfg.model, info.input_shape, info.num_classes)
        model.load_state_dict(load_state(cfg.storage.root, checkpoint_path)["model"])
        model.to(device).eval()
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.train.precision == "bf16")
        sums = task.zero_sums()
        with torch.no_grad(), autocast:
            for raw in ray_datasets(info, [split])[split].iter_torch_batches(batch_size=max(1, cfg.train.batch_size)):
                inputs, targets = task.batch(raw, device)
                sums = sums + task.eval_sums(model(inputs), targets, raw)
        return task.metrics(sums, f"{split}_")

    return ray.get(evaluate.remote())
