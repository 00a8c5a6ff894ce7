"""Hydra multirun (`-m`): its jobs run one after another in one process, each connecting to its own
embedded Ray and printing its own result line; a multirun that would serve forever is refused."""

import json
import re
import time

import pytest

from tests.support import run_job


@pytest.mark.slow
def test_train_multirun_registers_one_version_per_job_and_shows_rays_output_when_verbose(tmp_path):
    # verbose=true on both jobs: Ray's worker output comes back (log_to_driver), beside the progress lines.
    proc = run_job("train", "-m", "train.lr=0.003,0.01", "experiment=smoke", "train.epochs=2", "verbose=true",
                   f"storage.root=file://{tmp_path}", timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summaries = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [s["version"] for s in summaries] == [1, 2]  # one result line per job, each a new version
    versions = sorted(int(p.name) for p in (tmp_path / "registry" / "digits" / "versions").iterdir())
    assert versions == [1, 2]
    lrs = [json.loads((tmp_path / "registry" / "digits" / "versions" / str(v) / "manifest.json").read_text())
           ["config"]["train"]["lr"] for v in versions]
    assert lrs == [0.003, 0.01]
    # Each job: its two epochs, then its summary, in the job's own run.
    runs = re.findall(r"^\[(\S+-train-\S+)\] epoch (\d)/2  train_loss ", proc.stdout, re.MULTILINE)
    assert len(runs) == 4 and [epoch for _, epoch in runs] == ["1", "2", "1", "2"], proc.stdout
    assert len({run for run, _ in runs}) == 2
    assert len(re.findall(r"^\[\S+-train-\S+\] done: 2/2 epochs, best val_accuracy ", proc.stdout, re.MULTILINE)) == 2
    assert proc.stderr.count("started an embedded local Ray") == 2  # a Ray per job, started after the last stopped
    assert "(RayTrainWorker pid=" in proc.stdout + proc.stderr  # verbose: the workers' own lines reach the driver


def test_a_pipeline_multirun_that_would_serve_is_refused_before_ray_starts(tmp_path):
    started = time.time()
    proc = run_job("pipeline", "-m", "train.lr=0.003,0.01", "serve.block=true", f"storage.root=file://{tmp_path}",
                   timeout=120)
    assert proc.returncode != 0
    assert "serve.block=true cannot run under Hydra multirun (-m)" in proc.stderr
    assert "serve.block=false" in proc.stderr
    assert "started an embedded local Ray" not in proc.stdout + proc.stderr
    assert not (tmp_path / "datasets").exists()
    assert time.time() - started < 60
