"""A user model (plugged in through model._target_) that fails once, to exercise retry and resume."""

import os

import torch.distributed as dist
from torch import nn


class CrashOnce(nn.Module):
    """Identity stage whose rank-0 forward raises once after `after_calls` calls, if `marker` does not exist yet."""

    def __init__(self, marker: str, after_calls: int):
        super().__init__()
        self._marker, self._after, self._calls = marker, after_calls, 0

    def forward(self, x):
        self._calls += 1
        rank0 = not dist.is_initialized() or dist.get_rank() == 0
        if self._calls >= self._after and rank0 and not os.path.exists(self._marker):
            open(self._marker, "w").close()
            raise RuntimeError("injected failure")
        return x


def crash_once_mlp(in_features: int, num_classes: int, marker: str, crash_after_calls: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Sequential(nn.Flatten(), nn.Linear(in_features, 64), nn.ReLU()),
        CrashOnce(marker, crash_after_calls),
        nn.Linear(64, num_classes),
    )


def crash_once_gpt(input_shape, num_classes: int, marker: str, crash_after_calls: int,
                   layers: int, heads: int, width: int, context: int):
    """A GPT (orchestrator's own) with a CrashOnce stage after its last block."""
    from orchestrator.config import BuiltinModel, ModelConfig
    from orchestrator.training.gpt import build_gpt

    sizes = ModelConfig(name=BuiltinModel.gpt, layers=layers, heads=heads, width=width, context=context)
    model = build_gpt(sizes, input_shape, vocab_size=num_classes)
    model.stages["crash"] = CrashOnce(marker, crash_after_calls)
    return model
