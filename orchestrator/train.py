"""One distributed training run: a Ray Train V2 TorchTrainer over Ray Data shards.

Each epoch reports train loss, val loss and val accuracy with a checkpoint (rank 0 writes it).
A failed worker group is restarted by Ray Train (`train.max_failures`) and every rank resumes
from the latest reported checkpoint.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from orchestrator import storage
from orchestrator.config import PipelineConfig, TrainConfig, to_dict
from orchestrator.data import DatasetInfo, prepare_dataset, ray_datasets
from orchestrator.models import build_model
from orchestrator.tracking import start_tracking

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


def make_optimizer(cfg: TrainConfig, params) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    optimizer_cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return optimizer_cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def train_loop_per_worker(loop_config: Dict[str, Any]) -> None:
    """The function every Ray Train worker runs. `loop_config` holds 'cfg', 'data', 'run_name', 'group'."""
    import ray.train
    import ray.train.torch

    cfg: PipelineConfig = loop_config["cfg"]
    info: DatasetInfo = loop_config["data"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(cfg.scaling.torch_threads)
    torch.manual_seed(cfg.train.seed)

    model = ray.train.torch.prepare_model(build_model(cfg.model, info.input_shape, info.num_classes))
    optimizer = make_optimizer(cfg.train, model.parameters())
    start_epoch, history = _restore(ray.train.get_checkpoint(), _unwrap(model), optimizer)
    restored_epoch = start_epoch  # recorded in every report: shows a resume happened and from where

    tracker = start_tracking(cfg.tracking, cfg.storage.root, name=loop_config["run_name"], group=loop_config["group"], config=to_dict(cfg), rank=rank)
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    per_worker_batch = max(1, cfg.train.batch_size // world)
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(start_epoch, cfg.train.epochs):
        started = time.perf_counter()
        train_loss = _train_epoch(model, optimizer, loss_fn, train_shard, per_worker_batch, seed=cfg.train.seed + epoch)
        val_loss, val_accuracy = _evaluate(model, loss_fn, val_shard, per_worker_batch, rank, world)
        metrics = {
            "epoch": epoch + 1, "train_loss": train_loss, "val_loss": val_loss, "val_accuracy": val_accuracy,
            "epoch_time_s": time.perf_counter() - started, "restored_epoch": restored_epoch,
        }
        history.append(metrics)
        tracker.log(metrics, step=epoch + 1)
        _report(metrics, history, _unwrap(model), optimizer, rank)
    tracker.finish()


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _restore(checkpoint, model: nn.Module, optimizer) -> tuple:
    """Load the latest checkpoint if Ray Train handed one over: (epoch to start at, history so far)."""
    if checkpoint is None:
        return 0, []
    with checkpoint.as_directory() as folder:
        state = torch.load(os.path.join(folder, STATE_FILE), weights_only=True)
        with open(os.path.join(folder, HISTORY_FILE)) as f:
            history = json.load(f)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    return int(state["epoch"]), history


def _train_epoch(model, optimizer, loss_fn, shard, batch_size: int, seed: int) -> float:
    """One pass over this worker's shard; returns the mean loss over all workers."""
    model.train()
    total, count = torch.zeros(()), torch.zeros(())
    batches = shard.iter_torch_batches(batch_size=batch_size, local_shuffle_buffer_size=4 * batch_size, local_shuffle_seed=seed)
    for batch in batches:
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(batch["x"]), batch["y"])
        loss.backward()
        optimizer.step()
        total += loss.detach() * len(batch["y"])
        count += len(batch["y"])
    return _global_mean(total, count)


@torch.no_grad()
def _evaluate(model, loss_fn, shard, batch_size: int, rank: int, world: int) -> tuple:
    """Val loss and accuracy over every val row exactly once: rank r takes batches r, r+world, ..."""
    model.eval()
    loss_sum, correct, count = torch.zeros(()), torch.zeros(()), torch.zeros(())
    for i, batch in enumerate(shard.iter_torch_batches(batch_size=batch_size)):
        if i % world != rank:
            continue
        # The unwrapped module: a DDP forward in eval would still sync buffers across ranks
        # that may see different batch counts here.
        logits = _unwrap(model)(batch["x"])
        loss_sum += nn.functional.cross_entropy(logits, batch["y"], reduction="sum")
        correct += (logits.argmax(dim=1) == batch["y"]).sum()
        count += len(batch["y"])
    stats = torch.stack([loss_sum, correct, count])
    if dist.is_initialized():
        dist.all_reduce(stats)
    return float(stats[0] / stats[2]), float(stats[1] / stats[2])


def _global_mean(total: torch.Tensor, count: torch.Tensor) -> float:
    stats = torch.stack([total, count])
    if dist.is_initialized():
        dist.all_reduce(stats)
    return float(stats[0] / stats[1])


def _report(metrics: Dict[str, Any], history: List[Dict[str, Any]], model: nn.Module, optimizer, rank: int) -> None:
    import ray.train

    with tempfile.TemporaryDirectory() as folder:
        checkpoint = None
        if rank == 0:  # one copy of the weights is enough; other ranks report metrics only
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": metrics["epoch"]}, os.path.join(folder, STATE_FILE))
            with open(os.path.join(folder, HISTORY_FILE), "w") as f:
                json.dump(history, f)
            checkpoint = ray.train.Checkpoint.from_directory(folder)
        ray.train.report(metrics, checkpoint=checkpoint)


def build_trainer(
    cfg: PipelineConfig, info: DatasetInfo, *, run_name: str, group: str, storage_subdir: str, datasets=None,
    callbacks=None, loop: Callable[[Dict[str, Any]], Any] = train_loop_per_worker,
):
    """A TorchTrainer for one run of `cfg` on `info`, storing results under <root>/<storage_subdir>/<run_name>.

    `datasets` are the Ray datasets of `info` when the caller already materialized them (a sweep
    shares one copy between trials). `loop` replaces the worker function (benchmarks time their own).
    """
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    fs, path = storage.pyarrow_filesystem(storage.join(cfg.storage.root, storage_subdir))
    return TorchTrainer(
        loop,
        train_loop_config={"cfg": cfg, "data": info, "run_name": run_name, "group": group},
        torch_config=TorchConfig(backend=cfg.parallel.backend),
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
            resources_per_worker={"CPU": cfg.scaling.cpus_per_worker},
        ),
        # Only the training split is sharded; every rank reads val and evaluates its stride of batches.
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
        datasets=datasets or ray_datasets(info),
        run_config=ray.train.RunConfig(
            name=run_name, storage_path=path, storage_filesystem=fs, callbacks=callbacks or [],
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.train.checkpoints_to_keep, checkpoint_score_attribute="val_accuracy", checkpoint_score_order="max",
            ),
        ),
    )


def result_from_ray(result, root: str, info: DatasetInfo) -> TrainResult:
    """Turn a Ray Train Result into a TrainResult pointing at its best checkpoint."""
    if result.error is not None:
        raise RuntimeError(f"training failed: {result.error}") from result.error
    if not result.best_checkpoints:
        raise RuntimeError("training reported no checkpoint")
    checkpoint, metrics = max(result.best_checkpoints, key=lambda pair: pair[1]["val_accuracy"])
    return TrainResult(metrics=dict(metrics), checkpoint_path=checkpoint.path, history=read_history(root, checkpoint.path), run_path=result.path, data=info)


def run_train(cfg: PipelineConfig, info: Optional[DatasetInfo] = None) -> TrainResult:
    """Train `cfg` once (Ray must be connected). Returns metrics and the best checkpoint."""
    info = info or prepare_dataset(cfg.data, cfg.storage.root)
    run_name = f"{cfg.run_name}-train-{time.strftime('%Y%m%d-%H%M%S')}"
    trainer = build_trainer(cfg, info, run_name=run_name, group=cfg.run_name, storage_subdir="ray_results")
    return result_from_ray(trainer.fit(), cfg.storage.root, info)


def read_checkpoint_file(root: str, checkpoint_path: str, name: str) -> bytes:
    """Bytes of one file of a checkpoint that Ray stored under the storage root."""
    # Ray reports checkpoint paths inside the storage root's filesystem (absolute paths when local).
    fs, _ = storage.filesystem(root)
    return fs.cat_file(f"{checkpoint_path.rstrip('/')}/{name}")


def read_history(root: str, checkpoint_path: str) -> List[Dict[str, Any]]:
    """Per-epoch metrics stored in a checkpoint."""
    return json.loads(read_checkpoint_file(root, checkpoint_path, HISTORY_FILE))


def checkpoint_weights(root: str, checkpoint_path: str) -> Dict[str, np.ndarray]:
    """The model weights of a checkpoint as numpy arrays (loaded with weights_only=True: no pickled code)."""
    import io

    state = torch.load(io.BytesIO(read_checkpoint_file(root, checkpoint_path, STATE_FILE)), weights_only=True)
    return {name: tensor.detach().cpu().numpy() for name, tensor in state["model"].items()}
