"""A version's training curves (no Ray): one point per epoch that reports each metric, drawn as a PNG
that decodes, has the figure's size and shows the curves' colours."""

from __future__ import annotations

import io

import matplotlib.image
import numpy as np
import pytest

from orchestrator.registry.curves import curve_metric, training_curves, training_curves_png


def _history(epochs: int, *, skip_metric_at: int = 0):
    rows = []
    for e in range(1, epochs + 1):
        row = {"epoch": e, "phase": 0 if e <= 2 else 1, "train_loss": 2.0 / e, "val_loss": 2.2 / e}
        if e != skip_metric_at:
            row["val_accuracy"] = 0.4 + e / 20
        rows.append(row)
    return rows


def test_one_point_per_epoch_that_reports_the_metric():
    history = _history(6, skip_metric_at=4)
    curves = training_curves(history, "classification")
    assert set(curves) == {"train_loss", "val_loss", "val_accuracy"}
    assert curves["train_loss"] == ([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], [2.0 / e for e in range(1, 7)])
    assert curves["val_accuracy"][0] == [1.0, 2.0, 3.0, 5.0, 6.0]
    assert curves["val_accuracy"][1] == pytest.approx([0.4 + e / 20 for e in (1, 2, 3, 5, 6)])


def test_each_task_plots_its_own_metric():
    assert curve_metric("classification") == "val_accuracy"
    assert curve_metric("causal_lm") == "val_bits_per_byte"
    lm = [{"epoch": e, "train_loss": 5.0 / e, "val_loss": 5.5 / e, "val_bits_per_byte": 3.0 / e} for e in (1, 2, 3)]
    assert training_curves(lm, "causal_lm")["val_bits_per_byte"][0] == [1.0, 2.0, 3.0]


def _close_to(image: np.ndarray, hex_colour: str) -> int:
    rgb = np.array([int(hex_colour[i:i + 2], 16) for i in (1, 3, 5)]) / 255
    return int((np.abs(image[..., :3] - rgb).max(axis=-1) < 0.05).sum())


def test_the_png_decodes_at_the_figure_size_and_draws_the_curves():
    png = training_curves_png(_history(5), "classification")
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    image = matplotlib.image.imread(io.BytesIO(png), format="png")
    assert image.shape == (360, 900, 4)  # 9 x 3.6 inches at 100 dpi
    # Matplotlib's first three cycle colours: train loss, val loss, the metric; a blank figure has none.
    for colour in ("#1f77b4", "#ff7f0e", "#2ca02c"):
        assert _close_to(image, colour) > 200, colour


def test_nothing_to_draw_is_an_error():
    with pytest.raises(ValueError, match="no epochs"):
        training_curves_png([], "classification")
    with pytest.raises(ValueError, match="unknown task 'regression'"):
        training_curves_png(_history(2), "regression")
