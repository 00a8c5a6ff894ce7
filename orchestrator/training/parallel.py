"""Parallel plans: how the workers of one run split a phase's training step.

Each plan wraps a phase's trainable module (`PhaseModel.trainable`) into a `Runner` whose `step`
takes one batch and whose `sync` leaves the trained weights in the plain module on every rank, so
evaluation, checkpoints and the next phase see ordinary tensors whatever the plan.

  ddp       every rank holds the module; gradients are all-reduced (DistributedDataParallel).
  fsdp      FSDP2 `fully_shard` on a copy: each child, then the root, so parameters, gradients and
            optimizer state are sharded across ranks; `sync` gathers full weights back.
  pipeline  the module's children split into contiguous groups, one per rank, run by a
            torch.distributed.pipelining schedule (GPipe or 1F1B) over micro-batches; every rank sees
            the same batches (no data parallelism); `sync` broadcasts each group from its owner.
"""

from __future__ import annotations

import contextlib
import copy
import math
from typing import Any, Callable, Dict, List, Optional, cast

import torch
import torch.distributed as dist
from torch import nn

from orchestrator.config import ParallelConfig, Precision, TrainConfig
from orchestrator.training.tasks import Classification

_DEFAULT_TASK = Classification()
"""The task a runner trains when its caller names none (benchmarks, tests of the plans)."""

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""(outputs, targets) -> loss summed over a micro-batch's counted predictions (a task's `loss_sum`)."""
Counted = Callable[[torch.Tensor], torch.Tensor]
"""targets -> how many predictions the loss sums over, a float tensor (a task's `counted`)."""


def make_optimizer(cfg: TrainConfig, params) -> torch.optim.Optimizer:
    """The configured optimizer over `params` (tensors or parameter groups with their own 'lr')."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    optimizer_cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return optimizer_cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def lr_factor(cfg: TrainConfig, step: int, total_steps: int) -> float:
    """Multiplier of every group's learning rate at optimizer step `step` (0-based) of `total_steps`:
    linear warmup over train.warmup_steps, then constant or cosine decay to train.min_lr_ratio."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule != "cosine":
        return 1.0
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class Runner:
    """One phase's training step under a plan.

    `step` takes one micro-batch; every `train.grad_accum_steps` micro-batches make one optimizer step,
    with the learning-rate schedule applied and the gradient norm clipped first (train.grad_clip).
    """

    shards_data = True
    """Whether each rank trains on its own share of the rows (False: every rank sees every batch)."""
    needs_inputs = True
    """Whether `step` reads its inputs on this rank (a pipeline's later ranks only receive activations)."""
    optimizer: Optional[torch.optim.Optimizer] = None

    def _setup(self, train_cfg: TrainConfig, device: torch.device, loss: Loss, counted: Counted,
               start_step: int, total_steps: int, padded: bool = False) -> None:
        self.train_cfg, self.device = train_cfg, device
        self.loss_sum, self.counted, self.padded = loss, counted, padded
        self.steps_done, self.total_steps = start_step, total_steps
        self.accum, self._micro = train_cfg.grad_accum_steps, 0
        self.bf16 = train_cfg.precision == Precision.bf16
        if self.optimizer is not None:
            for group in self.optimizer.param_groups:
                group.setdefault("base_lr", group["lr"])

    def autocast(self):
        """bf16 autocast on the worker's device when train.precision=bf16 (a no-op context otherwise)."""
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def step(self, inputs: Optional[torch.Tensor], targets: torch.Tensor) -> tuple:
        """One micro-batch; (loss sum, predictions counted) this rank can vouch for. `inputs` is None
        where `needs_inputs` is False."""
        first, last = self._micro == 0, self._micro == self.accum - 1
        if first and self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
        loss_sum, count = self._forward_backward(inputs, targets, last=last)
        self._micro = 0 if last else self._micro + 1
        if last:
            self._optimizer_step()
        return loss_sum, count

    def _forward_backward(self, inputs, targets, *, last: bool) -> tuple:
        raise NotImplementedError

    def _mean_scale(self, count: torch.Tensor) -> torch.Tensor:
        """1 / (predictions per rank in this micro-batch, over every rank), times 1 / accumulation steps.

        Data-parallel plans average gradients over ranks, so a rank's loss sum times this gives the mean over
        the global micro-batch. Rows are the same on every rank; with padding the count is summed over ranks
        (one scalar all-reduce), so padding on one rank weighs its tokens like anyone else's.
        """
        if self.padded and _distributed():
            total = count.detach().clone()
            dist.all_reduce(total)
            per_rank = total / dist.get_world_size()
        else:
            per_rank = count
        return 1.0 / (per_rank.clamp(min=1.0) * self.accum)

    def _optimizer_step(self) -> None:
        if self.optimizer is not None:
            factor = lr_factor(self.train_cfg, self.steps_done, self.total_steps)
            for group in self.optimizer.param_groups:
                group["lr"] = group["base_lr"] * factor
            if self.train_cfg.grad_clip > 0:
                self._clip(self.train_cfg.grad_clip)
            self.optimizer.step()
        self.steps_done += 1

    def _clip(self, max_norm: float) -> None:
        params = [p for group in self.optimizer.param_groups for p in group["params"]] if self.optimizer else []
        torch.nn.utils.clip_grad_norm_(params, max_norm)

    def sync(self) -> None:
        """Leave the trained weights in the plain module on every rank."""

    def optimizer_state(self) -> Any:
        """Optimizer state as rank 0 should checkpoint it (call on every rank: some plans communicate)."""
        raise NotImplementedError

    def load_optimizer_state(self, state: Any) -> None:
        raise NotImplementedError


class DDPRunner(Runner):
    def __init__(self, module: nn.Module, groups: List[Dict[str, Any]], train_cfg: TrainConfig,
                 device: torch.device, loss: Loss = _DEFAULT_TASK.loss_sum, counted: Counted = _DEFAULT_TASK.counted,
                 start_step: int = 0, total_steps: int = 0, padded: bool = False):
        # Frozen parameters are skipped by DDP (requires_grad=False); the frozen prefix is not in `module`.
        self.module = nn.parallel.DistributedDataParallel(module) if _distributed() else module
        self.optimizer = make_optimizer(train_cfg, groups)
        self._setup(train_cfg, device, loss, counted, start_step, total_steps, padded)

    def _forward_backward(self, inputs, targets, *, last):
        # Gradients of the micro-batches before the last stay local: one all-reduce per optimizer step.
        no_sync = isinstance(self.module, nn.parallel.DistributedDataParallel) and not last
        count = self.counted(targets)
        with self.module.no_sync() if no_sync else contextlib.nullcontext():  # type: ignore[operator]
            with self.autocast():
                outputs = self.module(inputs)
            loss_sum = self.loss_sum(outputs, targets)
            (loss_sum * self._mean_scale(count)).backward()
        return loss_sum.detach(), count

    def optimizer_state(self):
        return self.optimizer.state_dict()  # type: ignore[union-attr]

    def load_optimizer_state(self, state):
        self.optimizer.load_state_dict(state)  # type: ignore[union-attr]


def _shares_parameters(child: nn.Module, others: List[nn.Module]) -> bool:
    mine = {id(p) for p in child.parameters()}
    return any(id(p) in mine for other in others for p in other.parameters())


class FSDPRunner(Runner):
    def __init__(self, module: nn.Module, groups: List[Dict[str, Any]], train_cfg: TrainConfig,
                 device: torch.device, loss: Loss = _DEFAULT_TASK.loss_sum, counted: Counted = _DEFAULT_TASK.counted,
                 start_step: int = 0, total_steps: int = 0, padded: bool = False):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        self.plain = module
        # Shard a copy: fully_shard turns parameters into DTensors in place, and the plain module is shared
        # with the rest of the model (the next phase, evaluation, checkpoints).
        self.module = copy.deepcopy(module)
        mesh = init_device_mesh(device.type, (dist.get_world_size(),)) if _distributed() else None
        self.sharded_precision = False
        if mesh is not None:
            policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
                if train_cfg.precision == Precision.bf16 else MixedPrecisionPolicy()
            self.sharded_precision = train_cfg.precision == Precision.bf16
            children = list(self.module.children())
            for i, child in enumerate(children):  # one communication unit per stage: overlap and free early
                # A parameter two stages share (tied embeddings) stays with the root unit.
                if any(p.requires_grad for p in child.parameters()) and \
                        not _shares_parameters(child, children[:i] + children[i + 1:]):
                    fully_shard(child, mesh=mesh, mp_policy=policy)
            fully_shard(self.module, mesh=mesh, mp_policy=policy)
        params = dict(self.module.named_parameters())
        names = {id(p): n for n, p in module.named_parameters()}
        copied = [{**g, "params": [params[names[id(p)]] for p in g["params"]]} for g in groups]
        self.optimizer = make_optimizer(train_cfg, copied)
        self._setup(train_cfg, device, loss, counted, start_step, total_steps, padded)

    def autocast(self):
        # Sharded bf16 runs through FSDP2's mixed-precision policy (bf16 compute, fp32 reduce and master weights).
        return contextlib.nullcontext() if self.sharded_precision else super().autocast()

    def _forward_backward(self, inputs, targets, *, last):
        from torch.distributed.fsdp import FSDPModule

        if isinstance(self.module, FSDPModule):  # reduce-scatter gradients only on the last micro-batch
            self.module.set_requires_gradient_sync(last)
        count = self.counted(targets)
        with self.autocast():
            outputs = self.module(inputs)
        loss_sum = self.loss_sum(outputs, targets)
        (loss_sum * self._mean_scale(count)).backward()
        return loss_sum.detach(), count

    def sync(self):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        # Every rank gets the full tensors (no cpu_offload: with it only rank 0 would).
        full = get_model_state_dict(self.module, options=StateDictOptions(full_state_dict=True))
        tensors = cast(Dict[str, torch.Tensor], full)  # a model's full state dict holds only tensors
        self.plain.load_state_dict({k: v.detach().cpu() for k, v in tensors.items()})

    def optimizer_state(self):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        optimizer = cast(torch.optim.Optimizer, self.optimizer)
        return get_optimizer_state_dict(self.module, optimizer, options=StateDictOptions(full_state_dict=True))

    def load_optimizer_state(self, state):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        optimizer = cast(torch.optim.Optimizer, self.optimizer)
        set_optimizer_state_dict(self.module, optimizer, state, options=StateDictOptions(full_state_dict=True))


class _Autocast(nn.Module):
    """Runs `module` under bf16 autocast: a pipeline stage's forward is called by the schedule, not by us."""

    def __init__(self, module: nn.Module, device_type: str):
        super().__init__()
        self.module, self.device_type = module, device_type

    def forward(self, *args):
        with torch.autocast(self.device_type, dtype=torch.bfloat16):
            return self.module(*args)


class PipelineRunner(Runner):
    shards_data = False

    def __init__(self, module: nn.Module, groups: List[Dict[str, Any]], train_cfg: TrainConfig,
                 cfg: ParallelConfig, device: torch.device, loss: Loss = _DEFAULT_TASK.loss_sum,
                 counted: Counted = _DEFAULT_TASK.counted, start_step: int = 0, total_steps: int = 0,
                 padded: bool = False):
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.needs_inputs = self.rank == 0
        self.parts = split_stages(list(module.named_children()), self.world)
        local: nn.Module = nn.Sequential(*(child for _, child in self.parts[self.rank]))
        if train_cfg.precision == Precision.bf16:
            local = _Autocast(local, device.type)
        stage = PipelineStage(local, self.rank, self.world, device)
        schedule_cls = ScheduleGPipe if cfg.pipeline_schedule == "gpipe" else Schedule1F1B
        # The schedule averages its micro-batches' gradients (each a 1/n slice of the batch), so a micro-batch's
        # loss sum is scaled by n / (predictions in the whole batch), and by 1 / accumulation steps.
        self.microbatches = cfg.microbatches
        self._batch_scale = torch.ones(())
        self.schedule = schedule_cls(
            stage, n_microbatches=cfg.microbatches, loss_fn=lambda out, target: loss(out, target) * self._batch_scale
        )
        mine = {id(p) for _, child in self.parts[self.rank] for p in child.parameters()}
        local_groups = [{**g, "params": [p for p in g["params"] if id(p) in mine]} for g in groups]
        # A rank whose part is all frozen (or padding) has nothing to optimize.
        self.optimizer = (
            make_optimizer(train_cfg, [g for g in local_groups if g["params"]])
            if any(g["params"] for g in local_groups)
            else None
        )
        self._setup(train_cfg, device, loss, counted, start_step, total_steps, padded)

    def _forward_backward(self, inputs, targets, *, last):
        losses: List[torch.Tensor] = []
        if self.rank == 0:
            self.schedule.step(inputs)
        elif self.rank == self.world - 1:
            count = self.counted(targets)
            self._batch_scale = self.microbatches / (count.clamp(min=1.0) * self.accum)
            self.schedule.step(target=targets, losses=losses)
        else:
            self.schedule.step()
        if not losses:  # only the last rank sees the loss; the others count no rows
            return torch.zeros(()), torch.zeros(())
        return (torch.stack(losses).sum() / self._batch_scale).detach(), count

    def _clip(self, max_norm: float) -> None:
        # The global norm spans every rank's part: sum the squares over ranks, then scale locally.
        params = [p for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None] \
            if self.optimizer else []
        squares = torch.zeros((), device=self.device)
        for p in params:
            squares += p.grad.detach().float().pow(2).sum()
        dist.all_reduce(squares)
        scale = max_norm / (float(squares.sqrt()) + 1e-6)
        if scale < 1.0:
            for p in params:
                p.grad.mul_(scale)

    def _optimizer_step(self) -> None:
        if self.optimizer is None and self.train_cfg.grad_clip > 0:
            dist.all_reduce(torch.zeros((), device=self.device))  # take part in the other ranks' norm
        super()._optimizer_step()

    def sync(self):
        with torch.no_grad():
            for owner, part in enumerate(self.parts):
                for _, child in part:
                    for tensor in [*child.parameters(), *child.buffers()]:
                        dist.broadcast(tensor.data, src=owner)

    def optimizer_state(self):
        states: List[Optional[dict]] = [None] * self.world
        dist.all_gather_object(states, self.optimizer.state_dict() if self.optimizer else None)
        return states

    def load_optimizer_state(self, state):
        if self.optimizer is not None and state[self.rank] is not None:
            self.optimizer.load_state_dict(state[self.rank])


class _Padding(nn.Identity):
    """Stands in as a rank's pipeline part when a phase has fewer modules than ranks."""


def split_stages(children: List[tuple], parts: int) -> List[List[tuple]]:
    """Contiguous groups of (name, module), one per pipeline rank, as even as possible (extra to the front);
    fewer modules than ranks are padded at the front with identities, which do no work."""
    if len(children) < parts:
        children = [(f"pad{i}", _Padding()) for i in range(parts - len(children))] + children
    base, extra = divmod(len(children), parts)
    groups, start = [], 0
    for i in range(parts):
        size = base + (1 if i < extra else 0)
        groups.append(children[start: start + size])
        start += size
    return groups


def make_runner(
    cfg: ParallelConfig,
    module: nn.Module,
    groups: List[Dict[str, Any]],
    train_cfg: TrainConfig,
    device: torch.device,
    *,
    loss: Loss = _DEFAULT_TASK.loss_sum,
    counted: Counted = _DEFAULT_TASK.counted,
    padded: bool = False,
    start_step: int = 0,
    total_steps: int = 0,
) -> Runner:
    """The runner of plan `cfg.strategy` for `module` (a phase's trainable part) and its parameter groups.

    `loss`, `counted` and `padded` come from the task (orchestrator.training.tasks); `start_step` is the optimizer steps
    the run has already taken and `total_steps` its length, for the learning-rate schedule.
    """
    common = dict(loss=loss, counted=counted, start_step=start_step, total_steps=total_steps, padded=padded)
    if cfg.strategy == "fsdp":
        return FSDPRunner(module, groups, train_cfg, device, **common)  # type: ignore[arg-type]
    if cfg.strategy == "pipeline" and _distributed():
        return PipelineRunner(module, groups, train_cfg, cfg, device, **common)  # type: ignore[arg-type]
    # One worker: a pipeline of one stage is plain training.
    return DDPRunner(module, groups, train_cfg, device, **common)  # type: ignore[arg-type]


def shards_data(cfg: ParallelConfig) -> bool:
    """Whether ranks split the training rows (all plans but a multi-worker pipeline)."""
    return cfg.strategy != "pipeline" or not _distributed()
