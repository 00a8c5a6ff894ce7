"""A real multi-node Ray cluster on this machine (cluster/local_cluster.py): a head and two worker
nodes, each its own host in its own network namespace where the machine allows. Jobs reach it the
ways users do (`ray job submit`, a driver on the head with RAY_ADDRESS), and worker hosts are killed
mid-training.

The head has no CPUs, so everything that computes (trials, training workers, Ray Data tasks,
replicas) runs on the worker nodes while drivers, the GCS and Serve's proxy run on the head.
"""

import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import List

import numpy as np
import pytest

from cluster.local_cluster import (
    ClusterSpec,
    dashboard_get,
    host_command,
    kill_node,
    node_env,
    ray_nodes,
    restart_node,
    start_cluster,
    stop_cluster,
    submit_job,
)
from orchestrator.client import http_json
from orchestrator.training.checkpoints import newest_complete
from tests.support import REPO, free_port, last_json_line

pytestmark = pytest.mark.slow

PIPELINE = [
    "experiment=smoke",
    "serve.block=false",
    "tune.num_samples=1",
    "tune.search_space.train.lr=[grid,0.01,0.003]",
    "train.epochs=4",
]
KILLS = 2


@pytest.fixture(scope="module")
def cluster():
    """Netns mode where the machine allows; ORC_CLUSTER_MODE=local tests the fallback anywhere."""
    # Short: Ray's Unix sockets live under it, and their paths must stay under 108 bytes.
    directory = tempfile.mkdtemp(prefix="orc-", dir="/tmp")
    spec = ClusterSpec(workers=2, head_cpus=0, worker_cpus=4, mode=os.environ.get("ORC_CLUSTER_MODE", "auto"))
    try:
        yield start_cluster(directory, spec)
    finally:
        stop_cluster(directory)
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="module")
def submitted_pipeline(cluster, tmp_path_factory):
    """`ray job submit -- python -m jobs.pipeline ...` from this machine: sweep, register, deploy, check."""
    root = tmp_path_factory.mktemp("cluster-runs")
    port = free_port()
    # In netns mode the proxy must listen beyond the head's loopback for this machine to reach it;
    # 0.0.0.0 inside a node's namespace is only the cluster's private bridge.
    host = "0.0.0.0" if cluster.mode == "netns" else "127.0.0.1"
    submission = f"pipeline-{cluster.name}"
    started = time.time()
    proc = submit_job(cluster, ["python", "-m", "jobs.pipeline", *PIPELINE, f"serve.host={host}", f"serve.port={port}",
                                f"storage.root=file://{root}"], submission_id=submission)
    print(f"submitted pipeline ({cluster.mode} mode): {time.time() - started:.1f} s")
    return proc, root, port, submission


def test_dashboard_and_jobs_api_want_the_cluster_token(cluster):
    for headers, status in (({}, 401), ({"Authorization": "Bearer not-the-token"}, 403)):
        request = urllib.request.Request(f"{cluster.dashboard_url}/api/jobs/", headers=headers)
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10)
        assert refused.value.code == status
    alive = sorted(row["name"] for row in ray_nodes(cluster) if row["state"] == "ALIVE")
    assert alive == ["head", "worker1", "worker2"]


def test_submitted_pipeline_serves_from_the_cluster(cluster, submitted_pipeline):
    proc, _, port, _ = submitted_pipeline
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = last_json_line(proc.stdout)
    assert summary["version"] == 1 and summary["endpoint_check_accuracy"] >= 0.8
    from sklearn.datasets import load_digits

    digits = load_digits()
    rows = (digits.data[:50] / 16.0).astype(np.float32)  # the scaling the dataset uses
    body = {"inputs": [{"name": "input", "shape": list(rows.shape), "datatype": "FP32", "data": rows.ravel().tolist()}]}
    # From this machine, through the head's address: the proxy on the head node, replicas on workers.
    url = f"http://{cluster.head.ip}:{port}/v2/models/digits/infer"
    assert http_json("POST", url, body)[0] == 401
    status, answer = http_json("POST", url, body, api_key=summary["api_key"])
    assert status == 200, answer
    labels = np.asarray(next(o for o in answer["outputs"] if o["name"] == "label")["data"])
    assert len(labels) == 50 and (labels == digits.target[:50]).mean() >= 0.8


def test_submitted_pipeline_spanned_the_nodes(cluster, submitted_pipeline):
    """The driver ran on the head, every training worker on a worker node (the head has no CPUs)."""
    _, _, _, submission = submitted_pipeline
    job = dashboard_get(cluster, f"/api/jobs/{submission}")
    names = {row["node_id"]: row["name"] for row in ray_nodes(cluster)}
    assert names[job["driver_node_id"]] == "head"
    train_nodes = [
        names[actor["node_id"]] for actor in _actors(cluster, "RayTrainWorker") if actor["job_id"] == job["job_id"]
    ]
    print("training workers per node:", {name: train_nodes.count(name) for name in set(train_nodes)})
    assert len(train_nodes) >= 4 and set(train_nodes) <= {"worker1", "worker2"}  # 2 trials x 2 workers


def test_driver_on_the_head_joins_through_ray_address(cluster, submitted_pipeline):
    _, root, _, _ = submitted_pipeline
    argv = [
        sys.executable,
        "-m",
        "jobs.train",
        "experiment=smoke",
        f"storage.root=file://{root}",
        "train.epochs=2",
        "train.lr=0.01",
    ]
    proc = subprocess.run(
        host_command(cluster, argv), env=node_env(cluster), cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    # It joined this cluster (whose dashboard it names), not an embedded Ray of its own.
    assert "connected to the Ray cluster at" in proc.stderr and cluster.dashboard_url.split("//")[1] in proc.stderr
    assert "started an embedded local Ray" not in proc.stderr
    summary = last_json_line(proc.stdout)
    assert summary["version"] == 2 and summary["epochs_trained"] == 2


@pytest.mark.faults
def test_training_survives_worker_hosts_killed_mid_training(cluster, tmp_path):
    """SIGKILL the whole worker node that hosts training workers (host loss) at a random point of the
    run, then bring the node back; twice in one run."""
    epochs = 30
    submission = f"train-kills-{cluster.name}"
    # Small batches make an epoch about 0.3 s here, so 30 epochs outlast the kills and restarts.
    proc = submit_job(
        cluster,
        [
            "python",
            "-m",
            "jobs.train",
            "experiment=smoke",
            f"storage.root=file://{tmp_path}",
            f"train.epochs={epochs}",
            "train.batch_size=8",
            "train.lr=0.01",
            f"train.max_failures={KILLS}",
        ],
        submission_id=submission,
        wait=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    kills = _kill_while_training(cluster, submission, str(tmp_path), random.Random())
    job = _wait_for_job(cluster, submission, timeout=600)
    logs = dashboard_get(cluster, f"/api/jobs/{submission}/logs")["logs"]
    assert job["status"] == "SUCCEEDED", logs[-4000:]
    summary = last_json_line(logs)
    print("kills:", json.dumps(kills), "resumed_from:", summary["resumed_from"])
    assert len(kills) == KILLS, f"the run ended after {len(kills)} kills"
    assert summary["epochs_trained"] == epochs and summary["version"] == 1
    # Each restart resumes from a checkpoint at least as new as the newest complete one at the kill.
    assert len(summary["resumed_from"]) == KILLS
    assert all(resumed >= kill["epoch_on_disk"] for resumed, kill in zip(summary["resumed_from"], kills))
    assert (tmp_path / "registry" / "digits" / "versions" / "1" / "manifest.json").exists()


def _kill_while_training(cluster, submission: str, root: str, rng: random.Random) -> list:
    """Kill a worker host running training workers 1 to 3 epochs after the newest complete checkpoint at
    the last kill (so the run has restarted and trains again), at a random moment inside that epoch;
    restart the node each time. Counting in epochs keeps every kill inside the run however fast it is."""
    kills: List[dict] = []
    started = time.time()
    target = rng.randint(1, 3)
    while len(kills) < KILLS and time.time() < started + 500:
        if dashboard_get(cluster, f"/api/jobs/{submission}")["status"] not in ("PENDING", "RUNNING"):
            break
        if (_newest_epoch(root) or 0) < target:
            time.sleep(0.2)
            continue
        time.sleep(rng.uniform(0, 0.3))  # an epoch takes about 0.3 s here
        hosts = _training_hosts(cluster)
        if not hosts:
            continue  # between worker groups
        node = rng.choice(hosts)
        on_disk = _newest_epoch(root) or 0  # read just before the kill: what a restart may resume from
        killed = kill_node(cluster, node)
        kills.append(
            {"node": node, "epoch_on_disk": on_disk, "pids": len(killed), "at_s": round(time.time() - started, 1)}
        )
        restart_node(cluster, node)
        target = on_disk + rng.randint(1, 3)
    return kills


def _training_hosts(cluster) -> list:
    names = {row["node_id"]: row["name"] for row in ray_nodes(cluster)}
    return sorted({names[a["node_id"]] for a in _actors(cluster, "RayTrainWorker") if a["state"] == "ALIVE"} - {"head"})


def _actors(cluster, class_name: str) -> list:
    path = (
        f"/api/v0/actors?detail=1&limit=10000&filter_keys=class_name&filter_predicates=%3D&filter_values={class_name}"
    )
    return dashboard_get(cluster, path)["data"]["result"]["result"]


def _newest_epoch(root: str):
    runs = sorted(Path(root, "ray_results").glob("*-train-*"))
    newest = newest_complete(f"file://{root}", str(runs[-1])) if runs else None
    return newest.epoch if newest else None


def _wait_for_job(cluster, submission: str, timeout: float) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = dashboard_get(cluster, f"/api/jobs/{submission}")
        if job["status"] not in ("PENDING", "RUNNING"):
            return job
        time.sleep(1)
    raise AssertionError(f"job {submission} still {job['status']} after {timeout:.0f} s")
