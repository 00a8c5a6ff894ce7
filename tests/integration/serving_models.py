"""User models for the serving tests (plugged in with model._target_): one that fails, one that is slow."""

import os
import time
from pathlib import Path

from torch import nn


class Fail(nn.Module):
    def forward(self, x):
        raise RuntimeError("injected serving failure")


class Sleep(nn.Module):
    """Sleeps `seconds` per forward; with `mark_dir`, first leaves a file named by its pid there,
    so a test knows which replica process holds a request."""

    def __init__(self, seconds: float, mark_dir: str = ""):
        super().__init__()
        self.seconds, self.mark_dir = seconds, mark_dir

    def forward(self, x):
        if self.mark_dir:
            Path(self.mark_dir, str(os.getpid())).touch()
        time.sleep(self.seconds)
        return x


def failing_net(in_features: int, num_classes: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Sequential(nn.Flatten(), nn.Linear(in_features, 32), nn.ReLU()), Fail(), nn.Linear(32, num_classes)
    )


def slow_net(in_features: int, num_classes: int, seconds: float = 0.5, mark_dir: str = "") -> nn.Sequential:
    return nn.Sequential(
        nn.Sequential(nn.Flatten(), nn.Linear(in_features, 32), nn.ReLU()),
        Sleep(seconds, mark_dir),
        nn.Linear(32, num_classes),
    )
