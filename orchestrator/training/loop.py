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
from typing import Any, Callable, Dict, List, Optional, Tuple

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
from orchestrator.training.schedules import HEAD, Phase, expand_schedule
from orchestrator.training.tracking import start_tracking

STATE_FILE = "state.pt"
HISTORY_FILE = "history.json"


@dataclass(kw_only=True)
class TrainResult:
    """What a training run produced."""

    metrics: Dict[str, Any]
    """Metrics of the best checkpoint (by val accuracy)."""
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
    train_rows = worker_rows(ray.train.get_dataset_shard("train"), rank if shard else 0, world if shard else 1, device)
    val_rows = worker_rows(ray.train.get_dataset_shard("val"), 0, 1, device)
    tracker = start_tracking(
        cfg.tracking,
        cfg.storage.root,
        name=loop_config["run_name"],
        group=loop_config["group"],
        config=to_dict(cfg),
        rank=rank,
    )
    run = _Run(cfg=cfg, model=model, aux_heads=aux_heads, flops=flops, rank=rank, world=world, device=device,
               train=train_rows, val=val_rows, resume=resume, tracker=tracker)
    for phase in phases:
        if phase.end_epoch > resume.epoch:
            run.phase(phase)
    tracker.finish()


@dataclass(kw_only=True)
class _Run:
    """State one worker carries through a schedule."""

    cfg: PipelineConfig
    model: StagedModel
    aux_heads: nn.ModuleDict
    flops: Dict[str, float]
    rank: int
    world: int
    device: torch.device
    train: Tuple[torch.Tensor, torch.Tensor]
    val: Tuple[torch.Tensor, torch.Tensor]
    resume: _Resume
    tracker: Any

    def phase(self, phase: Phase) -> None:
        cfg = self.cfg
        phase_model = PhaseModel(self.model, self.aux_heads, phase)
        runner = make_runner(cfg.parallel, phase_model.trainable, phase_model.param_groups(), cfg.train, self.device)
        start = max(phase.first_epoch, self.resume.epoch)
        if start > phase.first_epoch and self.resume.optimizer is not None:
            runner.load_optimizer_state(self.resume.optimizer)  # mid-phase resume keeps the optimizer's moments
        compute = self.resume.compute
        cached = cfg.schedule.cache_frozen and bool(phase.frozen_prefix)
        x, y = self.train
        if cached:  # the frozen prefix runs once per phase, not once per epoch
            x = phase_model.cached_features(x) if runner.needs_inputs else x
            add_cache_compute(
                compute, phase, self.flops, self._global_rows(len(y), runner) if runner.needs_inputs else 0
            )
        for epoch in range(start, phase.end_epoch):
            self._epoch(phase, phase_model, runner, x, y, epoch, cached)

    def _epoch(self, phase: Phase, phase_model: PhaseModel, runner, x, y, epoch: int, cached: bool) -> None:
        cfg = self.cfg
        started = time.perf_counter()
        phase_model.train()
        batch = cfg.train.batch_size if not runner.shards_data else max(1, cfg.train.batch_size // self.world)
        train_loss, rows, steps = _train_epoch(
            runner, phase_model, x, y, batch=batch, seed=cfg.train.seed + epoch, cached=cached
        )
        runner.sync()
        self.resume.steps += steps
        add_epoch_compute(self.resume.compute, phase, self.flops, self._global_rows(rows, runner), cached=cached)
        self.model.eval()
        val_loss, val_accuracy = _evaluate(self.model, *self.val, self.rank, self.world)
        phase_accuracy = val_accuracy
        if phase.output != HEAD:  # what the phase trains (stage + auxiliary head), beside the whole model
            phase_model.trainable.eval()
            _, phase_accuracy = _evaluate(
                lambda v: phase_model.trainable(phase_model.features(v)), *self.val, self.rank, self.world
            )
        metrics = {
            "epoch": epoch + 1,
            "phase": phase.index,
            "phase_name": phase.name,
            "train_loss": train_loss,
            "val_loss": val_loss,
            "val_accuracy": val_accuracy,
            "phase_val_accuracy": phase_accuracy,
            "epoch_time_s": time.perf_counter() - started,
            "restored_epoch": self.resume.epoch,
            "steps": self.resume.steps,
            **self.resume.compute.as_metrics(),
        }
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

    def _global_rows(self, rows: int, runner) -> int:
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


def _train_epoch(runner, phase_model: PhaseModel, x, y, *, batch: int, seed: int, cached: bool) -> tuple:
    """One pass over this rank's rows in a seeded order; (mean loss over all ranks, rows trained here, steps)."""
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    losses, count, steps = [], 0, 0
    # A pipeline's micro-batch shapes are fixed at its first step: it skips a last, smaller batch.
    stop = len(order) - len(order) % batch if not runner.shards_data else len(order)
    for start in range(0, stop, batch):
        index = order[start: start + batch]
        inputs = None
        if runner.needs_inputs:
            inputs = x[index] if cached else phase_model.features(x[index])
        loss_sum, rows = runner.step(inputs, y[index])
        losses.append(loss_sum)  # kept as tensors: a float() per step would sync a GPU every step
        count += rows
        steps += 1
    total = torch.stack(losses).sum().cpu() if losses else torch.zeros(())
    return _global_mean(total, torch.tensor(float(count))), stop, steps


@torch.no_grad()
def _evaluate(forward, x, y, rank: int, world: int, batch: int = 512) -> tuple:
    """Loss and accuracy over every row of (x, y) exactly once: rank r takes chunks r, r+world, ..."""
    loss_sum, correct, count = torch.zeros(()), torch.zeros(()), torch.zeros(())
    for i, start in enumerate(range(0, len(y), batch)):
        if i % world != rank:
            continue
        logits, labels = forward(x[start: start + batch]), y[start: start + batch]
        loss_sum += nn.functional.cross_entropy(logits, labels, reduction="sum").cpu()
        correct += (logits.argmax(dim=1) == labels).sum().cpu()
        count += len(labels)
    stats = _all_reduce(torch.stack([loss_sum, correct, count]))
    return float(stats[0] / stats[2]), float(stats[1] / stats[2])


def _global_mean(total: torch.Tensor, count: torch.Tensor) -> float:
    stats = _all_reduce(torch.stack([total.float(), count.float()]))
    return float(stats[0] / stats[1])


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
                checkpoint_score_attribute="val_accuracy",
                checkpoint_score_order="max",
            ),
        ),
    )


def result_from_ray(result, root: str, info: DatasetInfo) -> TrainResult:
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
    best = max(histories, key=lambda path: (histories[path][-1]["val_accuracy"], -histories[path][-1]["epoch"]))
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
    info = info or prepare_dataset(cfg.data, cfg.storage.root)
    run_name = run_name_for(cfg, "train")
    trainer = build_trainer(
        cfg, info, run_name=run_name, group=cfg.run_name, storage_subdir="ray_results", datasets=datasets
    )
    result = result_from_ray(trainer.fit(), cfg.storage.root, info)
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
