"""What one phase of a schedule trains, and what it costs.

A `PhaseModel` splits a `StagedModel` for one `Phase`: the frozen prefix runs outside autograd (and can
be computed once: `cached_features`), the suffix and the phase's head (the model's own or an auxiliary
one) form the `trainable` module that a parallel plan wraps.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Dict, List, Sequence, Set

import torch
from torch import nn

from orchestrator.training.flops import flop_counter
from orchestrator.training.models import StagedModel
from orchestrator.training.schedules import AUX, HEAD, Phase


def make_aux_heads(model: StagedModel, phases: Sequence[Phase], num_classes: int, seed: int) -> nn.ModuleDict:
    """A fresh head (`model.make_aux_head`) on every stage some phase uses as its output; seeded so every
    rank builds the same."""
    needed = sorted({p.output for p in phases if p.output != HEAD}, key=model.stage_names.index)
    shapes = _stage_output_shapes(model)
    heads = nn.ModuleDict()
    for offset, name in enumerate(needed):
        torch.manual_seed(seed + 1000 + offset)
        heads[name] = model.make_aux_head(name, shapes[name], num_classes)
    return heads


@torch.no_grad()
def _stage_output_shapes(model: StagedModel) -> Dict[str, tuple]:
    was_training = model.training
    model.eval()  # batch statistics of two zero rows would be meaningless
    x = model.example_input(2)
    shapes = {}
    for name, stage in model.stages.items():
        x = stage(x)
        shapes[name] = tuple(x.shape[1:])
    model.train(was_training)
    return shapes


class PhaseModel:
    """The modules of `model` (and `aux_heads`) that one `phase` runs, with requires_grad set for it."""

    def __init__(self, model: StagedModel, aux_heads: nn.ModuleDict, phase: Phase):
        self.model, self.phase = model, phase
        self.prefix = [model.stages[name] for name in phase.frozen_prefix]
        children = OrderedDict((name, model.stages[name]) for name in phase.suffix)
        top = HEAD if phase.output == HEAD else AUX
        children[top] = model.head if top == HEAD else aux_heads[phase.output]
        self.trainable = nn.Sequential(children)
        """Suffix stages then the phase's head, named as in `phase.trainable`: what a parallel plan wraps."""
        for param in [*model.parameters(), *aux_heads.parameters()]:
            param.requires_grad_(False)
        for name, child in self.trainable.named_children():
            child.requires_grad_(name in phase.trainable)
        for stage in self.prefix:  # a weight a frozen stage shares (tied embeddings) stays frozen, so the
            stage.requires_grad_(False)  # prefix's outputs, cached or not, do not move under the phase

    def train(self) -> None:
        """Trainable children in train mode; frozen ones (and the prefix) in eval: frozen means no dropout
        and no batch-statistics updates, which is also what makes a cached prefix exact."""
        for stage in self.prefix:
            stage.eval()
        for name, child in self.trainable.named_children():
            child.train(name in self.phase.trainable)

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen prefix's output for raw rows `x` (prepared as the model's first stage takes them)."""
        x = self.model.prepare(x)
        for stage in self.prefix:
            x = stage(x)
        return x

    @torch.no_grad()
    def prefix_bytes_per_row(self) -> int:
        """Bytes one row's cached prefix output takes (fp32 features of the prefix's last stage)."""
        # In eval mode: a stage's dropout in train mode would draw from the global RNG, and a cached run would
        # then see other dropout masks than a recomputing one.
        was_training = [stage.training for stage in self.prefix]
        for stage in self.prefix:
            stage.eval()
        x = self.features(self.model.example_input(1))
        for stage, mode in zip(self.prefix, was_training):
            stage.train(mode)
        return x[0].numel() * x.element_size()

    def cached_features(self, x: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
        """`features` of every row of `x`, computed once in eval mode, chunk by chunk."""
        for stage in self.prefix:
            stage.eval()
        return torch.cat([self.features(x[i: i + chunk]) for i in range(0, len(x), chunk)]) if len(x) else x

    def param_groups(self) -> List[Dict[str, object]]:
        """Optimizer parameter groups, one per trainable child, at the phase's learning rate for it. A parameter
        two children share (a GPT's tied embedding and head) goes to the first one only: torch's optimizers
        refuse a parameter in two groups."""
        groups: List[Dict[str, object]] = []
        seen: Set[int] = set()
        for name, child in self.trainable.named_children():
            params = [p for p in child.parameters() if p.requires_grad and id(p) not in seen]
            if name in self.phase.trainable and params:
                seen.update(id(p) for p in params)
                groups.append({"params": params, "lr": self.phase.lr[name], "name": name})
        return groups


# ---------------------------------------------------------------------------------------------
# Compute accounting
# ---------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class Compute:
    """Training compute so far, counted per stage and per sample."""

    forward_passes: int = 0
    """Stage-sample forward passes (one stage run on one sample counts 1)."""
    backward_passes: int = 0
    """Stage-sample backward passes."""
    flops: float = 0.0
    """Estimated FLOPs: measured forward FLOPs of each stage, backward counted as 2x forward for a
    trainable stage (weight and input gradients) and 1x for a frozen stage gradients pass through."""

    def as_metrics(self) -> Dict[str, float]:
        return {
            "train_gflops": self.flops / 1e9,
            "forward_passes": self.forward_passes,
            "backward_passes": self.backward_passes,
        }


@torch.no_grad()
def forward_flops(model: StagedModel, aux_heads: nn.ModuleDict) -> Dict[str, float]:
    """Forward FLOPs of one sample (`model.example_input(1)`: a GPT's sample is one sequence) through each
    stage, the head ('head') and each aux head ('aux:<stage>')."""
    was_training = model.training
    model.eval()
    flops, x = {}, model.example_input(1)
    for name, stage in model.stages.items():
        flops[name], out = _count(stage, x)
        if name in aux_heads:
            flops[f"aux:{name}"], _ = _count(aux_heads[name], out)
        x = out
    flops[HEAD], _ = _count(model.head, x)
    model.train(was_training)
    return flops


def _count(module: nn.Module, x: torch.Tensor) -> tuple:
    counter = flop_counter()
    with counter:
        out = module(x)
    return float(counter.get_total_flops()), out


def add_epoch_compute(compute: Compute, phase: Phase, flops: Dict[str, float], samples: int, *, cached: bool) -> None:
    """Count one training epoch of `phase` over `samples` rows (with the prefix cached or recomputed)."""
    top = HEAD if phase.output == HEAD else f"aux:{phase.output}"
    forward = [*(phase.suffix if cached else phase.path), top]
    lowest = min((phase.path.index(n) for n in phase.trainable if n in phase.path), default=len(phase.path))
    backward = [*phase.path[lowest:], top]
    trainable = set(phase.trainable) | ({top} if (HEAD in phase.trainable or AUX in phase.trainable) else set())
    compute.forward_passes += samples * len(forward)
    compute.backward_passes += samples * len(backward)
    compute.flops += samples * sum(flops[n] for n in forward)
    compute.flops += samples * sum(flops[n] * (2 if n in trainable else 1) for n in backward)


def add_cache_compute(compute: Compute, phase: Phase, flops: Dict[str, float], samples: int) -> None:
    """Count computing the frozen prefix once over `samples` rows."""
    compute.forward_passes += samples * len(phase.frozen_prefix)
    compute.flops += samples * sum(flops[n] for n in phase.frozen_prefix)
