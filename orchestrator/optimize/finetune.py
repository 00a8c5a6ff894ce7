"""The Ray Train loop of compression: fine-tuning a pruned model and training a distilled student.

Both are "train a model of the recorded architecture from given start weights (or from scratch),
with a loss, keeping some entries at zero"; one loop serves both, configured by a `FinetuneSpec`
that travels in the loop config. Start weights and masks are put once in the object store and
every worker reads that copy. Checkpoints use orchestrator.training.loop's file layout, so
`result_from_ray` and `checkpoint_weights` read them. These runs are a few epochs long: a retry after
a worker failure (train.max_failures) starts again from the start weights rather than resuming.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from orchestrator.optimize.prune import masked_in_place
from orchestrator.training.loop import report_epoch  # the same checkpoint layout: its readers then read ours


class HardLabelLoss:
    """Cross-entropy on the labels (pruning fine-tune)."""

    def __call__(self, logits: torch.Tensor, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        return nn.functional.cross_entropy(logits, batch["y"])


@dataclass(frozen=True)
class DistillationLoss:
    """alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(labels) (Hinton et al., 2015).

    T^2 keeps the soft-target gradients on the same scale as the hard-label ones as T grows.
    The batch carries the teacher's logits as "teacher".
    """

    temperature: float
    alpha: float

    def __call__(self, logits: torch.Tensor, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        t = self.temperature
        soft = nn.functional.kl_div(
            nn.functional.log_softmax(logits / t, dim=1), nn.functional.log_softmax(batch["teacher"] / t, dim=1),
            reduction="batchmean", log_target=True,
        )
        hard = nn.functional.cross_entropy(logits, batch["y"])
        return self.alpha * t * t * soft + (1.0 - self.alpha) * hard


@dataclass(frozen=True, kw_only=True)
class FinetuneSpec:
    """What a compression run trains, beyond the PipelineConfig it gets."""

    loss: Any = field(default_factory=HardLabelLoss)
    """Callable (logits, batch) -> loss."""
    shared: Optional[Dict[str, Any]] = None
    """{"ref": ObjectRef of {"weights": arrays or None, "masks": {name: bool array}}}, put once by the driver
    (wrapped in a dict so Ray hands the ref over instead of resolving it); None: from scratch, no masks."""


def compress_loop_per_worker(loop_config: Dict[str, Any]) -> None:
    """Ray Train worker: train `cfg.model` for `cfg.train.epochs` under `loop_config["finetune"]`."""
    import ray
    import ray.train
    import ray.train.torch

    from orchestrator.training.models import build_model
    from orchestrator.training.parallel import make_optimizer

    cfg, info, spec = loop_config["cfg"], loop_config["data"], loop_config["finetune"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(cfg.scaling.torch_threads)
    torch.manual_seed(cfg.train.seed)
    model: nn.Module = build_model(cfg.model, info.input_shape, info.num_classes)
    shared = ray.get(spec.shared["ref"]) if spec.shared else {"weights": None, "masks": {}}
    if shared["weights"] is not None:
        model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in shared["weights"].items()})
    params = dict(model.named_parameters())  # DDP wraps the module; these stay the live tensors
    masks = {name: torch.from_numpy(np.array(m)).to(params[name].dtype) for name, m in shared["masks"].items()}
    model = ray.train.torch.prepare_model(model)
    optimizer = make_optimizer(cfg.train, model.parameters())
    train, val = _rows("train", rank, world), _rows("val", rank, world)
    batch_size = max(1, cfg.train.batch_size // world)
    history = []
    for epoch in range(cfg.train.epochs):
        started = time.perf_counter()
        train_loss = _train_epoch(
            model, optimizer, spec.loss, params, masks, train, batch_size, seed=cfg.train.seed + epoch
        )
        val_accuracy = _val_accuracy(_unwrap(model), val)
        history.append(
            {
                "epoch": epoch + 1,
                "train_loss": train_loss,
                "val_accuracy": val_accuracy,
                "epoch_time_s": time.perf_counter() - started,
            }
        )
        report_epoch(history[-1], history, {"model": _unwrap(model).state_dict(), "epoch": history[-1]["epoch"]}, rank)


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _rows(split: str, rank: int, world: int) -> Dict[str, torch.Tensor]:
    """This rank's rows of a split, in memory: every `world`-th row from `rank`.

    build_trainer hands every rank the whole dataset (it splits none, so that each rank's share is
    the same stride in every run); the training rows are equal in number on every rank, so DDP
    ranks take the same number of steps.
    """
    import ray.train

    parts: Dict[str, list] = {}
    for batch in ray.train.get_dataset_shard(split).iter_torch_batches(batch_size=4096):
        for key, value in batch.items():
            parts.setdefault(key, []).append(value)
    columns = {key: torch.cat(values) for key, values in parts.items()}
    keep = len(columns["y"]) // world if split == "train" else None
    return {key: value[rank::world][:keep] for key, value in columns.items()}


def _batches(rows: Dict[str, torch.Tensor], batch_size: int, seed: int):
    order = torch.randperm(len(rows["y"]), generator=torch.Generator().manual_seed(seed))
    for start in range(0, len(order), batch_size):
        index = order[start: start + batch_size]
        yield {key: value[index] for key, value in rows.items()}


def _train_epoch(model, optimizer, loss_fn, params, masks, rows, batch_size: int, seed: int) -> float:
    model.train()
    total, count = torch.zeros(()), torch.zeros(())
    for batch in _batches(rows, batch_size, seed):
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(batch["x"]), batch)
        loss.backward()
        optimizer.step()
        masked_in_place(params, masks)
        total += loss.detach() * len(batch["y"])
        count += len(batch["y"])
    return _all_reduced_ratio(total, count)


@torch.no_grad()
def _val_accuracy(model: nn.Module, rows: Dict[str, torch.Tensor]) -> float:
    """Accuracy over every val row once (each rank holds its stride; the counts are summed)."""
    model.eval()
    correct = (model(rows["x"]).argmax(dim=1) == rows["y"]).sum()
    return _all_reduced_ratio(correct, torch.tensor(len(rows["y"])))


def _all_reduced_ratio(numerator: torch.Tensor, denominator: torch.Tensor) -> float:
    stats = torch.stack([numerator.float(), denominator.float()])
    if dist.is_initialized():
        dist.all_reduce(stats)
    return float(stats[0] / stats[1])


def run_finetune(cfg, info, spec: FinetuneSpec, *, method: str, datasets=None):
    """Fit `compress_loop_per_worker` on Ray Train; the TrainResult of its best epoch (by val accuracy)."""
    from orchestrator.training.loop import build_trainer, result_from_ray

    run_name = f"{cfg.run_name}-{method}-{time.strftime('%Y%m%d-%H%M%S')}"
    trainer = build_trainer(
        cfg, info, run_name=run_name, group=cfg.run_name, storage_subdir="optimize", datasets=datasets,
        loop=compress_loop_per_worker, extra_loop_config={"finetune": spec},
    )
    return result_from_ray(trainer.fit(), cfg.storage.root, info)
