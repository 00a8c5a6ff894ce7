"""User models for the serving tests (plugged in with model._target_): one that fails, one that is slow."""

import time

from torch import nn


class Fail(nn.Module):
    def forward(self, x):
        raise RuntimeError("injected serving failure")


class Sleep(nn.Module):
    def __init__(self, seconds: float):
        super().__init__()
        self.seconds = seconds

    def forward(self, x):
        time.sleep(self.seconds)
        return x


def failing_net(in_features: int, num_classes: int) -> nn.Sequential:
    return nn.Sequential(nn.Sequential(nn.Flatten(), nn.Linear(in_features, 32), nn.ReLU()), Fail(), nn.Linear(32, num_classes))


def slow_net(in_features: int, num_classes: int, seconds: float = 0.5) -> nn.Sequential:
    return nn.Sequential(nn.Sequential(nn.Flatten(), nn.Linear(in_features, 32), nn.ReLU()), Sleep(seconds), nn.Linear(32, num_classes))
