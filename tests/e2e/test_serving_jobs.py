"""The serving commands that need no Ray, driven as a user runs them: jobs.keys and
`jobs.deploy serve.write_config=...`."""

import json
import subprocess
import sys

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from tests.support import REPO, job_env, last_json_line, run_job

pytestmark = pytest.mark.slow


def keys(root, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "jobs.keys", "--root", f"file://{root}", *args],
        cwd=REPO,
        env=job_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_keys_command_creates_lists_and_revokes(tmp_path):
    created = keys(tmp_path, "create", "ci-bot", "--scope", "infer", "--scope", "admin")
    assert created.returncode == 0, created.stderr
    record = json.loads(created.stdout)
    assert record["api_key"].startswith(f"orc_{record['id']}_") and record["scopes"] == ["infer", "admin"]
    stored = (tmp_path / "serving" / "api_keys.json").read_text()
    assert record["api_key"].split("_", 2)[2] not in stored  # hashed, never the secret
    listed = [json.loads(line) for line in keys(tmp_path, "list").stdout.splitlines()]
    assert [(k["id"], k["name"], k["revoked_at"]) for k in listed] == [(record["id"], "ci-bot", None)]
    revoked = keys(tmp_path, "revoke", record["id"])
    assert revoked.returncode == 0 and json.loads(revoked.stdout)["revoked_at"]
    assert keys(tmp_path, "revoke", "nope").returncode == 1
    assert keys(tmp_path, "create", "x", "--scope", "root").returncode != 0  # argparse refuses an unknown scope


def test_deploy_job_writes_a_serve_config_without_starting_ray(tmp_path):
    out = tmp_path / "serve.yaml"
    proc = run_job("deploy", f"serve.write_config={out}", "serve.model_version=production", f"storage.root=file://{tmp_path}",
                   "serve.port=8123", "serve.max_replicas=3", "serve.auth.enabled=false", timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert last_json_line(proc.stdout)["serve_config"] == str(out)
    assert "started an embedded local Ray" not in proc.stderr + proc.stdout
    config = yaml.safe_load(out.read_text())
    (application,) = ServeDeploySchema(**config).applications
    assert config["http_options"] == {"host": "127.0.0.1", "port": 8123}
    assert application.import_path == "serve.app:app_builder"
    assert application.args["ref"] == "production" and application.args["storage_root"] == f"file://{tmp_path}"
    assert application.args["max_replicas"] == 3 and application.args["auth"]["enabled"] is False
