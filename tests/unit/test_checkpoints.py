"""Checkpoint integrity (no Ray): a checkpoint counts only when every file matches its manifest,
and nothing resumes from, registers or reads a torn one."""

import json
import os

import numpy as np
import pytest
import torch

from orchestrator.config import PipelineConfig, StorageConfig
from orchestrator.registry import ModelRegistry
from orchestrator.training.checkpoints import (
    MANIFEST,
    TornCheckpoint,
    complete_checkpoints,
    newest_complete,
    verify,
    write_manifest,
)
from orchestrator.training.loop import HISTORY_FILE, STATE_FILE, checkpoint_weights, load_state, read_history
from orchestrator.training.resume import mark_done, newest_unfinished, run_name_for


def _write_checkpoint(folder, epoch: int, *, manifest: bool = True) -> None:
    os.makedirs(folder)
    torch.save({"model": {"w": torch.full((3, 4), float(epoch))}, "epoch": epoch}, os.path.join(folder, STATE_FILE))
    with open(os.path.join(folder, HISTORY_FILE), "w") as f:
        json.dump([{"epoch": e, "val_accuracy": 0.5 + e / 100} for e in range(1, epoch + 1)], f)
    if manifest:
        write_manifest(str(folder), epoch)


def _tear(path, how: str) -> None:
    if how == "truncated":
        data = open(path, "rb").read()
        open(path, "wb").write(data[: len(data) // 2])
    elif how == "flipped":
        flipped = bytearray(open(path, "rb").read())
        flipped[len(flipped) // 2] ^= 0xFF
        open(path, "wb").write(bytes(flipped))
    elif how == "missing":
        os.remove(path)


@pytest.fixture
def run(tmp_path):
    """A run folder with complete checkpoints of epochs 1-3, as Ray Train lays them out."""
    folder = tmp_path / "ray_results" / "default-train-1"
    for epoch in (1, 2, 3):
        _write_checkpoint(folder / f"checkpoint_2026-11-24_00-00-0{epoch}", epoch)
    return folder


def test_complete_checkpoint_verifies_and_loads(run, tmp_path):
    root = f"file://{tmp_path}"
    path = str(run / "checkpoint_2026-11-24_00-00-03")
    manifest = verify(root, path)
    assert manifest["epoch"] == 3 and set(manifest["files"]) == {STATE_FILE, HISTORY_FILE}
    assert load_state(root, path)["epoch"] == 3
    assert [h["epoch"] for h in read_history(root, path)] == [1, 2, 3]
    assert np.array_equal(checkpoint_weights(root, path)["w"], np.full((3, 4), 3.0, dtype=np.float32))
    assert [c.epoch for c in complete_checkpoints(root, str(run))] == [1, 2, 3]


@pytest.mark.parametrize("how", ["truncated", "flipped", "missing"])
@pytest.mark.parametrize("name", [STATE_FILE, HISTORY_FILE, MANIFEST])
def test_a_torn_newest_checkpoint_is_never_resumed_from_or_read(run, tmp_path, name, how):
    root = f"file://{tmp_path}"
    newest = str(run / "checkpoint_2026-11-24_00-00-03")
    _tear(os.path.join(newest, name), how)
    with pytest.raises(TornCheckpoint):
        verify(root, newest)
    assert newest_complete(root, str(run)).epoch == 2  # one interval back, not to scratch
    with pytest.raises(TornCheckpoint):
        load_state(root, newest)
    with pytest.raises(TornCheckpoint):
        read_history(root, newest)


def test_a_checkpoint_without_manifest_does_not_count_and_a_lost_report_is_found(run, tmp_path):
    root = f"file://{tmp_path}"
    _write_checkpoint(run / "checkpoint_2026-11-24_00-00-05", 5, manifest=False)  # cut off before its manifest
    _write_checkpoint(run / "checkpoint_2026-11-24_00-00-04", 4)  # complete, but Ray lost its report
    ray_latest = str(run / "checkpoint_2026-11-24_00-00-03")
    assert newest_complete(root, str(run), also=ray_latest).epoch == 4


def test_registration_refuses_a_torn_checkpoint_and_writes_nothing(run, tmp_path):
    from orchestrator.flows import register_run
    from orchestrator.training.loop import TrainResult

    root = f"file://{tmp_path}"
    path = str(run / "checkpoint_2026-11-24_00-00-03")
    _tear(os.path.join(path, STATE_FILE), "flipped")
    cfg = PipelineConfig(storage=StorageConfig(root=root))
    result = TrainResult(metrics={"val_accuracy": 0.9, "epoch": 3}, checkpoint_path=path)
    with pytest.raises(TornCheckpoint):
        register_run(cfg, result, {"kind": "train"})
    assert ModelRegistry(root).versions(cfg.registry.model_name) == []


def test_resume_picks_the_newest_unfinished_run_of_its_kind(tmp_path):
    root = f"file://{tmp_path}"
    results = tmp_path / "ray_results"
    for name in (
        "nightly-train-20261101-000000",
        "nightly-train-20261102-000000",
        "nightly-sweep-20261103-000000",
        "other-train-20261104-000000",
    ):
        (results / name).mkdir(parents=True)
    mark_done(root, "nightly-train-20261102-000000", {})
    assert newest_unfinished(root, "nightly-train-") == "nightly-train-20261101-000000"
    assert newest_unfinished(root, "nightly-sweep-") == "nightly-sweep-20261103-000000"
    cfg = PipelineConfig(storage=StorageConfig(root=root), run_name="nightly", resume=True)
    assert run_name_for(cfg, "train") == "nightly-train-20261101-000000"
    mark_done(root, "nightly-train-20261101-000000", {})
    fresh = run_name_for(cfg, "train")
    assert fresh.startswith("nightly-train-") and not (results / fresh).exists()
    no_resume = PipelineConfig(storage=StorageConfig(root=root), run_name="nightly")
    assert run_name_for(no_resume, "sweep") != "nightly-sweep-20261103-000000"
