"""The jobs driven from outside: `python -m jobs.<verb> overrides...` as subprocesses, then real HTTP."""

import json
import re
import signal
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest

from tests.support import REPO, free_port, job_env, last_json_line, run_job

pytestmark = pytest.mark.slow


def _post(url: str, body: dict, key: str = "") -> tuple:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


@pytest.fixture(scope="module")
def pipeline_run(installed, tmp_path_factory):
    """The main job, end to end, on a small budget: data -> sweep -> register -> deploy -> check -> exit.
    It runs from the installed wheel in a folder outside the checkout (tests/e2e/installed.py), as a user
    of the package runs it; the jobs below run from the checkout against the same storage root."""
    root = tmp_path_factory.mktemp("pipeline")
    port = free_port()
    started = time.time()
    proc = installed.job(
        "pipeline",
        "experiment=smoke",
        "serve.block=false",
        f"serve.port={port}",
        f"storage.root=file://{root}",
        "tune.num_samples=1",
        "tune.search_space.train.lr=[grid,0.01,0.003,0.00001,0.00001]",
        "train.epochs=4",
    )
    return proc, root, port, time.time() - started


def test_pipeline_prints_summary_and_exits(pipeline_run):
    proc, root, port, _ = pipeline_run
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = last_json_line(proc.stdout)
    assert {"model", "version", "val_accuracy", "best_config", "endpoint"} <= set(summary)
    assert summary["model"] == "digits" and summary["version"] == 1
    assert summary["val_accuracy"] >= 0.9
    assert summary["best_config"]["train.lr"] in (0.01, 0.003)
    assert summary["endpoint"] == f"http://127.0.0.1:{port}/v2/models/digits"
    assert summary["endpoint_check_accuracy"] >= 0.85
    assert summary["api_key"].startswith("orc_")  # first start: a generated key, printed once


def test_pipeline_prints_a_line_per_trial_epoch_and_little_else(pipeline_run):
    proc, root, _, _ = pipeline_run
    lines = proc.stdout.splitlines()
    (sweep,) = (root / "ray_results").glob("smoke-sweep-*")
    trials = {re.match(r"_run_trial_([0-9a-f]+_\d+)_", d.name).group(1): d for d in sweep.glob("_run_trial_*")}
    assert len(trials) == 4
    for trial_id, folder in trials.items():
        reported = [json.loads(row)["epoch"] for row in (folder / "result.json").read_text().splitlines()]
        shown = [line for line in lines if line.startswith(f"[trial {trial_id}] epoch ")]
        # One line per epoch the trial reported, in order, each with its loss and val accuracy.
        assert [int(line.split()[3].split("/")[0]) for line in shown] == reported, proc.stdout
        assert all("train_loss " in line and "val_accuracy " in line for line in shown)
        assert sum(line.startswith(f"[trial {trial_id}] started ") for line in lines) == 1
        ends = [line for line in lines if line.startswith((f"[trial {trial_id}] completed: ",
                                                           f"[trial {trial_id}] stopped early: "))]
        assert len(ends) == 1 and f"{len(reported)}/4 epochs" in ends[0], proc.stdout
    assert any(line.startswith("data: ") for line in lines)
    # Ray's own output stays off: no worker or Train lines, Ray's INFO logs or Tune's table.
    output = proc.stdout + proc.stderr
    for chatter in ("(RayTrainWorker", "(TrainController", "Reporting training result", "(ServeController",
                    "Configuration for experiment", "INFO worker.py", "RayDeprecationWarning"):
        assert chatter not in output, output
    assert len(output.splitlines()) < 60, output


def test_pipeline_state_lives_under_storage_root(pipeline_run):
    _, root, _, _ = pipeline_run
    assert (root / "registry" / "digits" / "versions" / "1" / "manifest.json").exists()
    assert json.loads((root / "registry" / "digits" / "aliases.json").read_text()) == {"production": 1}
    assert list((root / "datasets").glob("digits-*/train.parquet"))
    assert list((root / "ray_results").glob("smoke-sweep-*/val_accuracy.png"))


def test_train_job_alone_adds_a_version(pipeline_run):
    _, root, _, _ = pipeline_run
    proc = run_job("train", "experiment=smoke", f"storage.root=file://{root}", "train.epochs=3", "train.lr=0.01")
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = last_json_line(proc.stdout)
    assert summary["version"] == 2 and summary["val_accuracy"] > 0.9


def test_deploy_job_serves_an_alias_until_interrupted(pipeline_run):
    _, root, _, _ = pipeline_run
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "jobs.deploy", f"storage.root=file://{root}", f"serve.port={port}",
                             "serve.model_version=production"], cwd=REPO, env=job_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        summary = _wait_for_json(proc, timeout=240)
        assert (
            summary["version"] == json.loads((root / "registry" / "digits" / "aliases.json").read_text())["production"]
        )
        x = np.zeros((2, 64), dtype=np.float32)
        body = {"inputs": [{"name": "input", "shape": [2, 64], "datatype": "FP32", "data": x.ravel().tolist()}]}
        assert _post(f"{summary['endpoint']}/infer", body)[0] == 401  # keys are on by default
        status, answer = _post(f"{summary['endpoint']}/infer", body, summary["api_key"])
        assert status == 200 and len(answer["outputs"][1]["data"]) == 2
        proc.send_signal(signal.SIGINT)
        # communicate, not wait: the job logs while it shuts down, and an unread pipe would block it.
        output, _ = proc.communicate(timeout=120)  # about 9 s here
        assert proc.returncode == 0, output[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _wait_for_json(proc: subprocess.Popen, timeout: float) -> dict:
    deadline = time.time() + timeout
    seen = []
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
        seen.append(line)
        if line.startswith("{"):
            return json.loads(line)
    raise AssertionError("deploy job printed no summary:\n" + "".join(seen[-60:]))


@pytest.mark.parametrize("override, field", [
    ("scaling.num_workers=0", "scaling.num_workers"),
    ("scaling.num_wrkers=2", "num_wrkers"),
    ("train.lr=fast", "train.lr"),
    ("serve.max_replicas=0", "serve.max_replicas"),
    ("tune.search_space.train.lr=[bogus,1]", "tune.search_space.train.lr"),
    ("data=parquet", "data.source"),
    ("schedule=layerwise schedule.phase_epochs=[1,2]", "schedule.phase_epochs"),
    ("parallel=pipeline parallel.microbatches=5", "parallel.microbatches"),
    ("schedule.kind=sideways", "schedule.kind"),
])
def test_bad_override_fails_before_ray_starts(override, field, tmp_path):
    started = time.time()
    proc = run_job("pipeline", *override.split(), f"storage.root=file://{tmp_path}", timeout=120)
    assert proc.returncode != 0
    assert field in proc.stderr + proc.stdout
    assert "started an embedded local Ray" not in proc.stderr + proc.stdout
    assert not (tmp_path / "datasets").exists()
    assert time.time() - started < 60


@pytest.mark.parametrize("override, named, known", [
    ("experiment=smok", "experiment/smok", "smoke"),  # a misspelt option: Hydra lists the group's options
    ("+foo=bar", "foo is not a config key", "the top-level keys are task, data, model"),  # an unknown key
])
def test_a_mistyped_option_or_key_fails_before_ray_starts_naming_what_exists(override, named, known, tmp_path):
    started = time.time()
    proc = run_job("pipeline", override, f"storage.root=file://{tmp_path}", timeout=120)
    output = proc.stderr + proc.stdout
    assert proc.returncode != 0
    assert named in output and known in output
    assert "started an embedded local Ray" not in output
    assert not (tmp_path / "datasets").exists()
    assert time.time() - started < 60
