"""A version's training curves as a PNG: loss and the task's metric per epoch, registered with the version.

    png = training_curves_png(result.history, "classification")     # bytes of a PNG
    registry.register(..., files={CURVES_FILE: png})

`history` is the per-epoch metrics a run reports (orchestrator.training.loop: 'epoch', 'phase',
'train_loss', 'val_<metric>', ...), the same list the manifest records under metrics["history"].
Drawn with matplotlib's Agg canvas directly (no pyplot, no global backend switch), so it is safe
in any process and never needs a display.
"""

from __future__ import annotations

import io
from typing import Any, Dict, List, Mapping, Sequence, Tuple

from orchestrator.config.schema import TASK_HEADLINE

CURVES_FILE = "training_curves.png"
"""The file name of the curves among a version's registry files."""

Series = Tuple[List[float], List[float]]
"""(epochs, values) of one curve."""


def curve_metric(task: str) -> str:
    """The per-epoch metric plotted beside the loss: the task's first headline metric that is not a loss
    (val_accuracy for classification, val_bits_per_byte for causal_lm). Raises ValueError for an unknown task."""
    if task not in TASK_HEADLINE:
        raise ValueError(f"unknown task {task!r} (tasks: {sorted(TASK_HEADLINE)})")
    return "val_" + next(name for name in TASK_HEADLINE[task] if name != "loss")


def training_curves(history: Sequence[Mapping[str, Any]], task: str) -> Dict[str, Series]:
    """{"train_loss", "val_loss", <curve_metric(task)>: (epochs, values)}: the points the PNG draws, one per
    epoch that reports the metric. Raises ValueError for an empty history or an unknown task."""
    if not history:
        raise ValueError("history has no epochs: there is no curve to draw")
    curves: Dict[str, Series] = {}
    for name in ("train_loss", "val_loss", curve_metric(task)):
        points = [(float(h.get("epoch", i + 1)), float(h[name])) for i, h in enumerate(history) if name in h]
        curves[name] = ([x for x, _ in points], [y for _, y in points])
    return curves


def training_curves_png(history: Sequence[Mapping[str, Any]], task: str) -> bytes:
    """A PNG of `history`: train and val loss on the left, the task's metric on the right, against epochs,
    with dotted lines where a staged schedule moves to its next phase. Raises as `training_curves` does."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    curves = training_curves(history, task)
    metric = curve_metric(task)
    figure = Figure(figsize=(9, 3.6))
    FigureCanvasAgg(figure)
    loss_axes, metric_axes = figure.subplots(1, 2)
    for name in ("train_loss", "val_loss"):
        loss_axes.plot(*curves[name], marker=".", label=name)
    metric_axes.plot(*curves[metric], marker=".", color="C2", label=metric)
    for axes, ylabel in ((loss_axes, "loss"), (metric_axes, metric)):
        for epoch in _phase_starts(history):
            axes.axvline(epoch - 0.5, color="0.6", linestyle=":", linewidth=1)
        axes.set_xlabel("epoch")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.set_ylabel(ylabel)
        axes.grid(alpha=0.3)
        axes.legend()
    figure.suptitle(f"{task}: {len(history)} epochs")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def _phase_starts(history: Sequence[Mapping[str, Any]]) -> List[float]:
    """Epochs whose phase differs from the epoch before (none for end-to-end training)."""
    return [float(h["epoch"]) for before, h in zip(history, history[1:])
            if "phase" in h and "epoch" in h and h["phase"] != before.get("phase")]
