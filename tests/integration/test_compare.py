"""jobs.compare's core on a real local Ray: every schedule and seed runs, the table and plot land under the root."""

import csv
import io

import pytest

from orchestrator.config import (
    CompareConfig,
    PipelineConfig,
    ScheduleKind,
    StorageConfig,
    TrackingConfig,
    TrainConfig,
)
from orchestrator.registry import storage
from orchestrator.training.compare import run_compare

pytestmark = pytest.mark.slow


def test_compare_writes_table_and_plot_with_honest_compute(ray_cluster, tmp_path):
    cfg = PipelineConfig(
        storage=StorageConfig(root=f"file://{tmp_path}"),
        tracking=TrackingConfig(enabled=False),
        train=TrainConfig(epochs=3),
        compare=CompareConfig(schedules=[ScheduleKind.end_to_end, ScheduleKind.gradual_unfreeze], seeds=[0, 1]),
    )
    result = run_compare(cfg)
    assert [(r["schedule"], r["seed"]) for r in result.runs] == [
        ("end_to_end", 0),
        ("end_to_end", 1),
        ("gradual_unfreeze", 0),
        ("gradual_unfreeze", 1),
    ]
    assert all(len(r["history"]) == 3 for r in result.runs)
    by_kind = {row["schedule"]: row for row in result.rows}
    assert by_kind["end_to_end"]["gflops_vs_end_to_end"] == 1.0
    # Gradual unfreezing trains the head alone first, on cached body outputs: strictly less compute.
    assert by_kind["gradual_unfreeze"]["train_gflops"] < by_kind["end_to_end"]["train_gflops"]
    assert by_kind["gradual_unfreeze"]["backward_passes"] < by_kind["end_to_end"]["backward_passes"]
    assert by_kind["end_to_end"]["val_accuracy"] > 0.8

    fs, folder = storage.filesystem(result.url)
    rows = list(csv.DictReader(io.StringIO(fs.cat_file(f"{folder}/compare.csv").decode())))
    assert [r["schedule"] for r in rows] == ["end_to_end", "gradual_unfreeze"]
    assert fs.cat_file(f"{folder}/compare.png")[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| gradual_unfreeze |" in fs.cat_file(f"{folder}/compare.md").decode()
