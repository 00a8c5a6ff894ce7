"""`python -m jobs.train storage.root=s3://...` as a user runs it: a subprocess whose only link to the
S3-compatible server (tests/s3_server.py) is the AWS_* environment it inherits."""

import json
import uuid

from orchestrator.registry import MANIFEST, WEIGHTS
from orchestrator.train import STATE_FILE
from tests.e2e.conftest import last_json_line, run_job


def test_train_job_keeps_data_checkpoints_and_the_version_in_the_bucket(s3_server):
    prefix = f"e2e-{uuid.uuid4().hex[:8]}"
    proc = run_job("train", "experiment=smoke", f"storage.root=s3://{s3_server.bucket}/{prefix}", "train.epochs=2", "train.lr=0.01",
                   "model.hidden=[32]")
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = last_json_line(proc.stdout)
    assert summary["model"] == "digits" and summary["version"] == 1

    keys = set(s3_server.keys(f"{prefix}/"))
    version = f"{prefix}/registry/digits/versions/1"
    assert {f"{version}/{WEIGHTS}", f"{version}/{MANIFEST}"} <= keys
    manifest = json.loads(s3_server.read(f"{version}/{MANIFEST}"))
    assert manifest["metrics"]["val_accuracy"] == summary["val_accuracy"]
    assert json.loads(s3_server.read(f"{prefix}/registry/digits/aliases.json")) == {"production": 1}
    # The checkpoint the version came from, and the prepared data it trained on, are objects in the same bucket.
    checkpoint = manifest["lineage"]["checkpoint"]
    assert checkpoint.startswith(f"{s3_server.bucket}/{prefix}/ray_results/smoke-train-")
    assert f"{checkpoint.split('/', 1)[1]}/{STATE_FILE}" in keys
    assert manifest["lineage"]["data_url"].startswith(f"s3://{s3_server.bucket}/{prefix}/datasets/digits-")
    assert f"{manifest['lineage']['data_url'].split('/', 3)[3]}/train.parquet" in keys
