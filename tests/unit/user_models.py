"""Sample user models, plugged in with `model=custom model._target_=tests.unit.user_models.<name>`."""

from __future__ import annotations

from torch import nn


def sequential_net(in_features: int, num_classes: int, width: int = 32) -> nn.Sequential:
    """A factory returning a plain nn.Sequential; its last child is the head."""
    return nn.Sequential(nn.Flatten(), nn.Linear(in_features, width), nn.ReLU(), nn.Linear(width, num_classes))


class TwoLayerNet(nn.Sequential):
    """A class taking only some of the offered arguments (no input_shape)."""

    def __init__(self, in_features: int, num_classes: int, width: int = 16):
        super().__init__()
        self.add_module("flatten", nn.Flatten())
        self.add_module("hidden", nn.Linear(in_features, width))
        self.add_module("act", nn.ReLU())
        self.add_module("classifier", nn.Linear(width, num_classes))


def bare_linear(in_features: int, num_classes: int) -> nn.Module:
    """Not a Sequential: has no stages to split off, so build_model must refuse it."""
    return nn.Linear(in_features, num_classes)


def head_only(**offered) -> nn.Sequential:
    """A Sequential of one child: a head with no stage before it."""
    return nn.Sequential(nn.Linear(offered["in_features"], offered["num_classes"]))
