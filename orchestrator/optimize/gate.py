"""The accuracy gate: a variant is registered only if it keeps its parent's test accuracy within tolerance.

The gate compares on the test split: held-out rows that chose nothing (val picked the parent's best epoch
and a fine-tune's best epoch), so the drop it reports is not flattered by selection.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict

import numpy as np
import torch

from orchestrator.registry.servable import build_servable

_EPSILON = 1e-9
"""Accuracies are ratios of row counts: a drop equal to the tolerance must pass despite float rounding."""


@dataclass(frozen=True, kw_only=True)
class GateDecision:
    """Whether a variant passes, and by how much it kept or missed the tolerance."""

    accepted: bool
    parent_accuracy: float
    accuracy: float
    tolerance: float

    @property
    def drop(self) -> float:
        """Accuracy lost against the parent (negative when the variant is better)."""
        return self.parent_accuracy - self.accuracy

    def message(self, name: str) -> str:
        summary = (f"{name}: test accuracy {self.accuracy:.4f} against the parent's {self.parent_accuracy:.4f} "
                   f"(drop {100 * self.drop:+.2f} points, tolerance {100 * self.tolerance:.2f})")
        if self.accepted:
            return f"{summary}: within tolerance, registered"
        return f"{summary}: missed the tolerance by {100 * (self.drop - self.tolerance):.2f} points, not registered"


class AccuracyGate:
    """Accepts a variant whose test accuracy is at most `tolerance` below its parent's."""

    def __init__(self, tolerance: float):
        self.tolerance = tolerance

    def decide(self, parent_accuracy: float, accuracy: float) -> GateDecision:
        accepted = parent_accuracy - accuracy <= self.tolerance + _EPSILON
        return GateDecision(
            accepted=accepted, parent_accuracy=parent_accuracy, accuracy=accuracy, tolerance=self.tolerance
        )


def predict_labels(
    manifest: Dict[str, Any], arrays: Dict[str, np.ndarray], features: np.ndarray, batch: int = 512
) -> np.ndarray:
    """Labels the model of `manifest` gives `features`, run exactly as a serving replica runs it."""
    forward = build_servable(manifest, arrays)
    x = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
    with torch.inference_mode():
        return torch.cat([forward(x[i: i + batch]).argmax(dim=1) for i in range(0, len(x), batch)]).numpy()


def accuracy(
    manifest: Dict[str, Any], arrays: Dict[str, np.ndarray], features: np.ndarray, labels: np.ndarray
) -> float:
    """Accuracy of the model of `manifest` on `arrays` over (`features`, `labels`), through the serving code path."""
    return float((predict_labels(manifest, arrays, features) == labels).mean())
