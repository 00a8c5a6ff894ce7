"""Models as ordered, named stages plus a head.

Every model, built-in or user-supplied, becomes a `StagedModel`, so training, freezing and
serving treat them the same way.
"""

from __future__ import annotations

import inspect
import math
from collections import OrderedDict
from typing import List, Mapping, Sequence

import torch
from torch import nn

from orchestrator.config import ModelConfig


class StagedModel(nn.Module):
    """`head(stage_n(...stage_1(prepare(x))))`.

    Three hooks say what a sample is, so schedules, phases and compute accounting never assume float
    feature rows: `prepare` (raw batch -> the first stage's input), `example_input` (a batch to trace
    shapes and FLOPs with) and `make_aux_head` (the head a layer-staged phase trains on a stage).
    """

    def __init__(self, stages: Mapping[str, nn.Module], head: nn.Module, input_shape: Sequence[int]):
        super().__init__()
        if not stages:
            raise ValueError("a StagedModel needs at least one stage before its head")
        self.input_shape = tuple(int(d) for d in input_shape)
        self.stages = nn.ModuleDict(stages)
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.prepare(x)
        for stage in self.stages.values():
            x = stage(x)
        return self.head(x)

    @property
    def stage_names(self) -> List[str]:
        return list(self.stages.keys())

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """A raw batch (flat rows, as data sources deliver them) as the first stage takes it: [n, *input_shape]."""
        return x.reshape(x.shape[0], *self.input_shape)

    def example_input(self, n: int) -> torch.Tensor:
        """A batch of `n` samples, already prepared, for tracing shapes and counting FLOPs."""
        return torch.zeros(n, *self.input_shape)

    def make_aux_head(self, stage: str, stage_output_shape: tuple, num_outputs: int) -> nn.Module:
        """A fresh head on `stage`'s output (one sample of `stage_output_shape`) with `num_outputs` outputs."""
        return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(stage_output_shape), num_outputs))


def build_model(cfg: ModelConfig, input_shape: Sequence[int], num_classes: int) -> StagedModel:
    """Build the configured model for samples of `input_shape` and `num_classes` classes (for a GPT:
    `input_shape` is [sequence length] and `num_classes` the vocabulary size)."""
    if cfg._target_:
        return _user_model(cfg._target_, cfg, input_shape, num_classes)
    if cfg.name == "cnn":
        return _cnn(cfg, input_shape, num_classes)
    if cfg.name == "gpt":
        from orchestrator.training.gpt import build_gpt  # gpt.py subclasses StagedModel: import it late

        return build_gpt(cfg, input_shape, vocab_size=num_classes)
    if cfg.name == "hf":
        from orchestrator.training.hf import build_hf  # likewise, and transformers loads only when asked for

        return build_hf(cfg, input_shape, num_classes)
    return _mlp(cfg, input_shape, num_classes)


def _block(*layers: nn.Module, dropout: float) -> nn.Sequential:
    return nn.Sequential(*layers, *([nn.Dropout(dropout)] if dropout else []))


def _mlp(cfg: ModelConfig, input_shape: Sequence[int], num_classes: int) -> StagedModel:
    width = math.prod(input_shape)  # not torch: building must work under torch.device('meta')
    stages = OrderedDict()
    for i, hidden in enumerate(cfg.hidden):
        flatten = [nn.Flatten()] if i == 0 else []
        stages[f"block{i}"] = _block(*flatten, nn.Linear(width, hidden), nn.ReLU(), dropout=cfg.dropout)
        width = hidden
    return StagedModel(stages, nn.Linear(width, num_classes), input_shape)


def _cnn(cfg: ModelConfig, input_shape: Sequence[int], num_classes: int) -> StagedModel:
    if len(input_shape) != 3:
        raise ValueError(f"model.name=cnn needs data.input_shape [channels, height, width], got {list(input_shape)}")
    channels, height, width = input_shape
    stages = OrderedDict()
    for i, out in enumerate(cfg.channels):
        # Pool only while the feature map can still halve, so tiny images keep working.
        pool = [nn.MaxPool2d(2)] if min(height, width) >= 2 else []
        stages[f"conv{i}"] = _block(nn.Conv2d(channels, out, 3, padding=1), nn.ReLU(), *pool, dropout=cfg.dropout)
        channels = out
        if pool:
            height, width = height // 2, width // 2
    stages["dense"] = _block(
        nn.Flatten(), nn.Linear(channels * height * width, cfg.hidden[0]), nn.ReLU(), dropout=cfg.dropout
    )
    return StagedModel(stages, nn.Linear(cfg.hidden[0], num_classes), input_shape)


def _user_model(target: str, cfg: ModelConfig, input_shape: Sequence[int], num_classes: int) -> StagedModel:
    from hydra.utils import get_object

    factory = get_object(target)
    offered = {"in_features": math.prod(input_shape), "input_shape": list(input_shape), "num_classes": num_classes}
    params = inspect.signature(factory).parameters
    accepts_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    kwargs = {k: v for k, v in offered.items() if accepts_all or k in params}
    model = factory(**{**kwargs, **cfg.kwargs})
    if isinstance(model, StagedModel):
        return model
    if isinstance(model, nn.Sequential) and len(model) >= 2:
        children = list(model.named_children())
        return StagedModel(OrderedDict(children[:-1]), children[-1][1], input_shape)
    raise TypeError(
        f"model._target_ {target!r} built a {type(model).__name__}; it must build an orchestrator.StagedModel "
        "or a torch.nn.Sequential of at least two children (the last one is the head)"
    )
