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

import copy
from typing import Any, Dict, List, Optional, cast

import torch
import torch.distributed as dist
from torch import nn

from orchestrator.config import ParallelConfig, TrainConfig

_LOSS = nn.CrossEntropyLoss()


def make_optimizer(cfg: TrainConfig, params) -> torch.optim.Optimizer:
    """The configured optimizer over `params` (tensors or parameter groups with their own 'lr')."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    optimizer_cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return optimizer_cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class Runner:
    """One phase's training step under a plan."""

    shards_data = True
    """Whether each rank trains on its own share of the rows (False: every rank sees every batch)."""
    needs_inputs = True
    """Whether `step` reads its inputs on this rank (a pipeline's later ranks only receive activations)."""

    def step(self, inputs: Optional[torch.Tensor], targets: torch.Tensor) -> tuple:
        """One optimizer step on a batch; (loss sum, rows) this rank can vouch for. `inputs` is None
        where `needs_inputs` is False."""
        raise NotImplementedError

    def sync(self) -> None:
        """Leave the trained weights in the plain module on every rank."""

    def optimizer_state(self) -> Any:
        """Optimizer state as rank 0 should checkpoint it (call on every rank: some plans communicate)."""
        raise NotImplementedError

    def load_optimizer_state(self, state: Any) -> None:
        raise NotImplementedError


class DDPRunner(Runner):
    def __init__(self, module: nn.Module, groups: List[Dict[str, Any]], train_cfg: TrainConfig):
        # Frozen parameters are skipped by DDP (requires_grad=False); the frozen prefix is not in `module`.
        self.module = nn.parallel.DistributedDataParallel(module) if _distributed() else module
        self.optimizer = make_optimizer(train_cfg, groups)

    def step(self, inputs, targets):
        self.optimizer.zero_grad(set_to_none=True)
        loss = _LOSS(self.module(inputs), targets)
        loss.backward()
        self.optimizer.step()
        return loss.detach() * len(targets), len(targets)

    def optimizer_state(self):
        return self.optimizer.state_dict()

    def load_optimizer_state(self, state):
        self.optimizer.load_state_dict(state)


class FSDPRunner(Runner):
    def __init__(self, module: nn.Module, groups: List[Dict[str, Any]], train_cfg: TrainConfig, device: torch.device):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        self.plain = module
        # Shard a copy: fully_shard turns parameters into DTensors in place, and the plain module is shared
        # with the rest of the model (the next phase, evaluation, checkpoints).
        self.module = copy.deepcopy(module)
        mesh = init_device_mesh(device.type, (dist.get_world_size(),)) if _distributed() else None
        if mesh is not None:
            for child in self.module.children():  # one communication unit per stage: overlap and free early
                if any(p.requires_grad for p in child.parameters()):
                    fully_shard(child, mesh=mesh)
            fully_shard(self.module, mesh=mesh)
        params = dict(self.module.named_parameters())
        names = {id(p): n for n, p in module.named_parameters()}
        copied = [{**g, "params": [params[names[id(p)]] for p in g["params"]]} for g in groups]
        self.optimizer = make_optimizer(train_cfg, copied)

    step = DDPRunner.step

    def sync(self):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        # Every rank gets the full tensors (no cpu_offload: with it only rank 0 would).
        full = get_model_state_dict(self.module, options=StateDictOptions(full_state_dict=True))
        tensors = cast(Dict[str, torch.Tensor], full)  # a model's full state dict holds only tensors
        self.plain.load_state_dict({k: v.detach().cpu() for k, v in tensors.items()})

    def optimizer_state(self):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(self.module, self.optimizer, options=StateDictOptions(full_state_dict=True))

    def load_optimizer_state(self, state):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(self.module, self.optimizer, state, options=StateDictOptions(full_state_dict=True))


class PipelineRunner(Runner):
    shards_data = False


    def __init__(
        self,
        module: nn.Module,
        groups: List[Dict[str, Any]],
        train_cfg: TrainConfig,
        cfg: ParallelConfig,
        device: torch.device,
    ):
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.needs_inputs = self.rank == 0
        self.parts = split_stages(list(module.named_children()), self.world)
        local = nn.Sequential(*(child for _, child in self.parts[self.rank]))
        stage = PipelineStage(local, self.rank, self.world, device)
        schedule_cls = ScheduleGPipe if cfg.pipeline_schedule == "gpipe" else Schedule1F1B
        self.schedule = schedule_cls(stage, n_microbatches=cfg.microbatches, loss_fn=_LOSS)
        mine = {id(p) for _, child in self.parts[self.rank] for p in child.parameters()}
        local_groups = [{**g, "params": [p for p in g["params"] if id(p) in mine]} for g in groups]
        # A rank whose part is all frozen (or padding) has nothing to optimize.
        self.optimizer = (
            make_optimizer(train_cfg, [g for g in local_groups if g["params"]])
            if any(g["params"] for g in local_groups)
            else None
        )

    def step(self, inputs, targets):
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
        losses: List[torch.Tensor] = []
        if self.rank == 0:
            self.schedule.step(inputs)
        elif self.rank == self.world - 1:
            self.schedule.step(target=targets, losses=losses)
        else:
            self.schedule.step()
        if self.optimizer is not None:
            self.optimizer.step()
        if not losses:  # only the last rank sees the loss; the others count no rows
            return torch.zeros(()), 0
        return torch.stack(losses).mean().detach() * len(targets), len(targets)

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
    cfg: ParallelConfig, module: nn.Module, groups: List[Dict[str, Any]], train_cfg: TrainConfig, device: torch.device
) -> Runner:
    """The runner of plan `cfg.strategy` for `module` (a phase's trainable part) and its parameter groups."""
    if cfg.strategy == "fsdp":
        return FSDPRunner(module, groups, train_cfg, device)
    if cfg.strategy == "pipeline":
        if not _distributed():
            return DDPRunner(module, groups, train_cfg)  # one worker: a pipeline of one stage is plain training
        return PipelineRunner(module, groups, train_cfg, cfg, device)
    return DDPRunner(module, groups, train_cfg)


def shards_data(cfg: ParallelConfig) -> bool:
    """Whether ranks split the training rows (all plans but a multi-worker pipeline)."""
    return cfg.strategy != "pipeline" or not _distributed()
