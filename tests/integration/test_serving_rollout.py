"""Rollout on a real Serve over HTTP: a 90/10 canary split, rollback and hot-swap under concurrent
load with zero failed requests, previous-version rollback, automatic rollback of a failing
candidate, and the request limits (504 timeout, 503 + Retry-After)."""

import json
import subprocess
import sys
import threading
import time
from types import SimpleNamespace
from typing import List

import pytest
import requests
import torch
from ray import serve

from orchestrator.config import LimitsConfig, ModelConfig, PipelineConfig, RolloutConfig, ServeConfig, StorageConfig
from orchestrator.registry import ModelRegistry
from orchestrator.training.models import build_model
from serve.deploy import run_deploy
from serve.names import INGRESS_DEPLOYMENT
from tests.integration.serving_support import (
    INPUT_SHAPE,
    MODEL,
    digits,
    hammer,
    register,
    register_user_model,
    served_versions,
)
from tests.support import REPO, fit, free_port, infer_body

pytestmark = pytest.mark.slow

SYNC_S = 0.25
TIMEOUT_S = 3.0
SLOW_S = 4.5


@pytest.fixture(scope="module")
def app(ray_cluster, tmp_path_factory):
    """digits v1 (production) and v2 trained; v3 fails on every forward; v4 sleeps SLOW_S per batch."""
    x, y = digits()
    cfg = PipelineConfig(
        model=ModelConfig(hidden=[32]), storage=StorageConfig(root=str(tmp_path_factory.mktemp("rollout"))),
        serve=ServeConfig(
            port=free_port(), min_replicas=2, max_replicas=2,
            limits=LimitsConfig(request_timeout_s=TIMEOUT_S, max_pending_requests=12),
            rollout=RolloutConfig(min_requests=10, sync_interval_s=SYNC_S, max_error_rate=0.2),
        ),
    )
    for seed, steps in ((0, 200), (1, 60)):
        torch.manual_seed(seed)
        model = build_model(cfg.model, INPUT_SHAPE, 10)
        fit(model, x[:1400], y[:1400], steps)
        register(cfg, model, alias="production" if seed == 0 else None)
    register_user_model(cfg, "tests.integration.serving_models.failing_net")
    register_user_model(cfg, "tests.integration.serving_models.slow_net", seconds=SLOW_S)
    deployed = run_deploy(cfg)
    yield SimpleNamespace(cfg=cfg, deployed=deployed, rows=x[1400:1408], key=deployed.api_key,
                          admin=f"{deployed.base_url}/admin/models/{MODEL}")
    serve.shutdown()


def headers(app) -> dict:
    return {"Authorization": f"Bearer {app.key}"}


def infer(app, i: int = 0, url: str = "") -> requests.Response:
    rows = app.rows[i % len(app.rows):][:1]
    return requests.post(
        url or f"{app.deployed.endpoint}/infer", json=infer_body(rows), headers=headers(app), timeout=60
    )


def admin(app, action: str, body=None) -> dict:
    method = "GET" if action == "status" else "POST"
    url = f"{app.admin}/rollout" if action in ("status", "start") else f"{app.admin}/{action}"
    response = requests.request(method, url, json=body or {}, headers=headers(app), timeout=60)
    assert response.status_code == 200, response.text
    time.sleep(SYNC_S * 3)  # every ingress replica has synced the new table
    return response.json()


def rollout_job(app, *args: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.rollout", "--url", app.deployed.base_url, "--key", app.key, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    time.sleep(SYNC_S * 3)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def replicas(app, version: int) -> dict:
    """{replica id: weights_info} of the serving replicas, for version `version` (loads it where missing)."""
    handle = serve.get_deployment_handle(INGRESS_DEPLOYMENT, app_name=app.cfg.serve.app_name)
    infos = {}
    for _ in range(40):
        info = handle.weights_info.remote(MODEL, version).result(timeout_s=30)
        infos[info["replica"]] = info
    return infos


def test_canary_split_90_10(app):
    status = rollout_job(app, "start", f"models:/{MODEL}/2", "--percent", "10")  # any reference form names it
    assert status["stable"] == 1 and status["candidate"] == 2 and status["percent"] == 10
    responses = hammer(lambda i: infer(app, i), 400)
    assert [r.status_code for r in responses].count(200) == 400
    counts = served_versions(responses)
    assert set(counts) == {"1", "2"}, counts
    # Binomial(400, 0.1): mean 40, sd 6; [19, 61] is +-3.5 sd.
    assert 19 <= counts["2"] <= 61, counts


def _under_load(app, action: str, total: int = 320, after: int = 100, late: int = 120) -> tuple:
    """`total` infer requests from 8 clients; POST the admin `action` once `after` have been answered.
    The last `late` requests wait until every replica has synced the change (3 sync rounds after
    it), however fast the others were answered. Returns ([(sent_at, response)], acted_at)."""
    done, acted_at = [0], [float("inf")]

    def send(i):
        while i >= total - late and time.monotonic() < acted_at[0] + 3 * SYNC_S:
            time.sleep(0.01)
        started = time.monotonic()
        response = infer(app, i)
        done[0] += 1
        return started, response

    def act_midway():
        while done[0] < after:
            time.sleep(0.01)
        requests.post(f"{app.admin}/{action}", headers=headers(app), timeout=60).raise_for_status()
        acted_at[0] = time.monotonic()

    trigger = threading.Thread(target=act_midway)
    trigger.start()
    results = hammer(send, total)
    trigger.join()
    return results, acted_at[0]


def test_rollback_under_load_fails_no_request(app):
    admin(app, "start", {"version": 2, "percent": 50})
    results, rolled_back_at = _under_load(app, "rollback")
    assert [r.status_code for _, r in results].count(200) == 320, [r.text for _, r in results if r.status_code != 200][
        :3
    ]
    before = served_versions([r for started, r in results[:80]])
    after = served_versions([r for started, r in results if started > rolled_back_at + 2 * SYNC_S])
    assert before.get("2", 0) > 0 and set(after) == {"1"}, (before, after)
    assert admin(app, "status")["candidate"] is None


def test_hot_swap_under_load_keeps_the_replicas(app):
    before = replicas(app, 1)
    admin(app, "start", {"version": 2, "percent": 0})
    results, promoted_at = _under_load(app, "promote")
    assert [r.status_code for _, r in results].count(200) == 320
    assert set(served_versions([r for _, r in results[:80]])) == {"1"}
    assert set(served_versions([r for started, r in results if started > promoted_at + 2 * SYNC_S])) == {"2"}
    after = replicas(app, 2)
    # The same replica processes now run version 2, on a different object-store copy than version 1.
    assert set(after) <= set(before) and {i["pid"] for i in after.values()} <= {i["pid"] for i in before.values()}
    assert {i["object_ref"] for i in after.values()}.isdisjoint({i["object_ref"] for i in before.values()})
    assert ModelRegistry(app.cfg.storage.root).aliases(MODEL)["production"] == 2  # the next deploy starts from v2


def test_rollback_without_candidate_returns_to_the_previous_version(app):
    status = rollout_job(app, "rollback")
    assert status["stable"] == 1 and status["candidate"] is None
    assert infer(app).headers["X-Model-Version"] == "1"
    assert ModelRegistry(app.cfg.storage.root).aliases(MODEL)["production"] == 1


def test_failing_candidate_is_rolled_back_automatically(app):
    admin(app, "start", {"version": 3, "percent": 50})
    statuses: List[int] = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        statuses.append(infer(app, len(statuses)).status_code)
        if len(statuses) % 10 == 0 and admin(app, "status")["candidate"] is None:
            break
    status = admin(app, "status")
    assert status["candidate"] is None and status["stable"] == 1
    assert status["events"][-1]["action"] == "rollback" and status["events"][-1]["reason"].startswith(
        "automatic: error rate"
    )
    assert 500 in statuses and len(statuses) < 200
    after = hammer(lambda i: infer(app, i), 40)
    assert [r.status_code for r in after].count(200) == 40 and set(served_versions(after)) == {"1"}


def test_timeout_is_504_and_a_full_queue_is_503_with_retry_after(app):
    slow = f"{app.deployed.endpoint}/versions/4/infer"
    responses = hammer(lambda i: infer(app, i, url=slow), 30, clients=30)
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {503, 504}, statuses
    assert 504 in statuses and 503 in statuses
    full = next(r for r in responses if r.status_code == 503)
    assert full.headers["Retry-After"] == "1" and "retry" in full.json()["error"]
    assert all(r.headers["X-Model-Version"] == "4" for r in responses)
    deadline = time.monotonic() + 60  # the slow batches drain, then the endpoint serves again
    while infer(app).status_code != 200:
        assert time.monotonic() < deadline
        time.sleep(1)
