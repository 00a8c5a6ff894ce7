"""All state on S3 (`storage.root=s3://...`) against a real S3-compatible server on loopback
(tests/s3_server.py): a Parquet source, the prepared dataset, Ray Train checkpoints, a Tune sweep,
the registry, the key store and a deployment that reads the registry.

Each storage-touching path runs once here on S3; the rest of the integration tier uses file://
roots. Objects are checked with boto3, not through the s3fs the code under test uses.
"""

import dataclasses
import hashlib
import io
import uuid
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from ray import serve

from orchestrator.config import (
    DataConfig,
    ModelConfig,
    PipelineConfig,
    ServeConfig,
    StorageConfig,
    TrackingConfig,
    TrainConfig,
    TuneConfig,
    TuneScheduler,
)
from orchestrator.flows import register_run
from orchestrator.registry import MANIFEST, MANIFEST_SUM, WEIGHTS, ModelRegistry, storage
from orchestrator.registry.servable import build_servable
from orchestrator.training.data import load_split, prepare_dataset, ray_datasets
from orchestrator.training.loop import HISTORY_FILE, STATE_FILE, checkpoint_weights, run_train
from orchestrator.training.sweep import run_sweep
from serve.deploy import run_deploy
from tests.integration.serving_support import client, digits
from tests.support import free_port, infer_body

pytestmark = pytest.mark.slow

MODEL = "digits"


@pytest.fixture(scope="module")
def s3(s3_server):
    """A fresh prefix in the test bucket as the storage root, holding the digits as a user's Parquet source."""
    prefix = f"integration-{uuid.uuid4().hex[:8]}"
    root = f"s3://{s3_server.bucket}/{prefix}"
    x, y = digits()
    buffer = io.BytesIO()
    pq.write_table(pa.table({**{f"p{i}": x[:, i] for i in range(x.shape[1])}, "label": y}), buffer)
    source = storage.join(root, "source", "digits.parquet")
    storage.write_bytes_atomic(source, buffer.getvalue())
    cfg = PipelineConfig(
        data=DataConfig(source=source), model=ModelConfig(hidden=[32]), storage=StorageConfig(root=root),
        tracking=TrackingConfig(enabled=False), train=TrainConfig(epochs=2, lr=0.01),
        serve=ServeConfig(port=free_port(), min_replicas=1, max_replicas=1),
    )
    return SimpleNamespace(cfg=cfg, prefix=prefix, x=x, y=y, server=s3_server)


@pytest.fixture(scope="module")
def prepared(ray_cluster, s3):
    """The source prepared under the root, and its splits materialized by Ray Data from S3 (once, shared)."""
    info = prepare_dataset(s3.cfg.data, s3.cfg.storage.root)
    return SimpleNamespace(info=info, datasets=ray_datasets(info))


@pytest.fixture(scope="module")
def trained(s3, prepared):
    result = run_train(s3.cfg, prepared.info, datasets=prepared.datasets)
    version = register_run(s3.cfg, result, {"kind": "train", "run": result.run_path})
    return SimpleNamespace(result=result, version=version)


@pytest.fixture(scope="module")
def deployed(s3, trained):
    yield run_deploy(s3.cfg)
    serve.shutdown()


def key_of(url_or_path: str) -> str:
    """The object key of an s3:// URL or of a path inside the root's filesystem ('bucket/key')."""
    return url_or_path.removeprefix("s3://").split("/", 1)[1]


def sorted_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    rows = np.column_stack([x, y.astype(np.float32)])
    return rows[np.lexsort(rows.T[::-1])]


def test_parquet_source_is_prepared_on_s3_and_reads_back_row_for_row(s3, prepared):
    info = prepared.info
    assert info.url.startswith(s3.cfg.storage.root + "/datasets/")
    assert info.feature_columns == [f"p{i}" for i in range(64)]
    assert info.num_train + info.num_val + info.num_test == len(s3.y)
    keys = s3.server.keys(key_of(info.url))
    assert sorted(k.rsplit("/", 1)[1] for k in keys) == ["info.json", "test.parquet", "train.parquet", "val.parquet"]
    train_x, train_y = load_split(info, "train")
    val_x, val_y = load_split(info, "val")
    test_x, test_y = load_split(info, "test")
    assert (len(train_y), len(val_y), len(test_y)) == (info.num_train, info.num_val, info.num_test)
    np.testing.assert_array_equal(
        sorted_rows(np.vstack([train_x, val_x, test_x]), np.concatenate([train_y, val_y, test_y])),
        sorted_rows(s3.x, s3.y),
    )
    # What Ray Data's read tasks (other processes) streamed from the bucket is the same split, in the same order.
    rows = prepared.datasets["train"].take_all()
    np.testing.assert_array_equal(np.stack([r["x"] for r in rows]), train_x)
    np.testing.assert_array_equal(np.array([r["y"] for r in rows]), train_y)
    # Prepared once per digest: a second call finds info.json and writes nothing.
    assert prepare_dataset(s3.cfg.data, s3.cfg.storage.root) == info


def test_checkpoints_land_in_the_bucket_and_the_registered_weights_match(s3, trained):
    result, version = trained.result, trained.version
    run_key = key_of(result.run_path)
    assert run_key.startswith(f"{s3.prefix}/ray_results/")
    assert [h["epoch"] for h in result.history] == list(range(1, result.metrics["epoch"] + 1)) and result.metrics[
        "epoch"
    ] <= 2
    checkpoint_key = key_of(result.checkpoint_path)
    keys = set(s3.server.keys(run_key))
    assert {f"{checkpoint_key}/{STATE_FILE}", f"{checkpoint_key}/{HISTORY_FILE}"} <= keys
    folders = {k.rsplit("/", 2)[1] for k in keys if k.endswith(f"/{STATE_FILE}")}
    assert 1 <= len(folders) <= s3.cfg.train.checkpoints_to_keep and all(f.startswith("checkpoint_") for f in folders)

    version_key = key_of(version.url)
    assert version_key == f"{s3.prefix}/registry/{MODEL}/versions/1"
    assert {f"{version_key}/{name}" for name in (WEIGHTS, MANIFEST, MANIFEST_SUM)} <= set(s3.server.keys(version_key))
    assert hashlib.sha256(s3.server.read(f"{version_key}/{WEIGHTS}")).hexdigest() == version.manifest["files"][WEIGHTS]
    loaded, weights = ModelRegistry(s3.cfg.storage.root).load(MODEL, "production")
    assert loaded.version == 1 and loaded.manifest["lineage"]["checkpoint"] == result.checkpoint_path
    expected = checkpoint_weights(s3.cfg.storage.root, result.checkpoint_path)
    assert weights.keys() == expected.keys()
    for name, array in expected.items():
        np.testing.assert_array_equal(weights[name], array, err_msg=name)


def test_sweep_keeps_trials_state_and_plot_in_the_bucket(s3, prepared):
    cfg = dataclasses.replace(s3.cfg, run_name="s3sweep", tune=TuneConfig(
        num_samples=1, scheduler=TuneScheduler.fifo, search_space={"train": {"lr": ["grid", 0.01, 0.003]}}))
    sweep = run_sweep(cfg, prepared.info)
    assert sorted(t.overrides["train.lr"] for t in sweep.trials) == [0.003, 0.01]
    assert [t.status for t in sweep.trials] == ["completed", "completed"] and all(
        t.epochs_run == 2 for t in sweep.trials
    )
    sweep_key = f"{s3.prefix}/ray_results/{sweep.name}"
    keys = s3.server.keys(sweep_key + "/")
    assert key_of(sweep.best.checkpoint_path).startswith(sweep_key + "/")
    assert f"{key_of(sweep.best.checkpoint_path)}/{STATE_FILE}" in keys
    # Tune's experiment state (what a restore reads) is in the bucket, beside one folder per trial.
    assert any(k.rsplit("/", 1)[1].startswith("experiment_state") for k in keys), keys
    assert len({k for k in keys if k.endswith(f"/{STATE_FILE}")}) >= 2
    assert sweep.plot_url == f"s3://{s3.server.bucket}/{sweep_key}/val_accuracy.png"
    assert s3.server.read(f"{sweep_key}/val_accuracy.png").startswith(b"\x89PNG")


def predict(s3, version: int, rows: np.ndarray) -> tuple:
    """(labels, probabilities) of the registry's `version` computed in this process."""
    loaded, weights = ModelRegistry(s3.cfg.storage.root).load(MODEL, version)
    with torch.no_grad():
        probabilities = torch.softmax(build_servable(loaded.manifest, weights)(torch.from_numpy(rows)), dim=1).numpy()
    return probabilities.argmax(axis=1), probabilities


def served(deployed, path: str, rows: np.ndarray) -> tuple:
    response = client(deployed.api_key).post(f"{deployed.endpoint}{path}", json=infer_body(rows), timeout=60)
    assert response.status_code == 200, response.text
    outputs = {o["name"]: o for o in response.json()["outputs"]}
    probabilities = np.reshape(outputs["probabilities"]["data"], outputs["probabilities"]["shape"])
    return response.headers["X-Model-Version"], np.asarray(outputs["label"]["data"]), probabilities


def test_deployment_serves_the_s3_registry_version(s3, prepared, deployed):
    assert (deployed.model, deployed.version) == (MODEL, 1)
    rows = load_split(prepared.info, "val")[0][:50]
    version, labels, probabilities = served(deployed, "/infer", rows)
    expected_labels, expected_probabilities = predict(s3, 1, rows)
    assert version == "1"
    np.testing.assert_array_equal(labels, expected_labels)
    np.testing.assert_allclose(probabilities, expected_probabilities, atol=1e-5)
    assert f"{s3.prefix}/serving/api_keys.json" in s3.server.keys(f"{s3.prefix}/serving/")


def test_deployment_sees_a_version_registered_after_it_started(s3, prepared, deployed):
    # v2 is written after the serving controller (another process) listed the registry: a listing
    # cached there would answer 404.
    registry = ModelRegistry(s3.cfg.storage.root)
    v1, weights = registry.load(MODEL, 1)
    registry.register(
        MODEL,
        {name: -array for name, array in weights.items()},
        metrics={},
        config=v1.manifest["config"],
        lineage={"source": "s3 test"},
        signature=v1.signature,
    )
    rows = load_split(prepared.info, "val")[0][:50]
    version, labels, _ = served(deployed, "/versions/2/infer", rows)
    assert version == "2"
    np.testing.assert_array_equal(labels, predict(s3, 2, rows)[0])
    assert not np.array_equal(labels, predict(s3, 1, rows)[0])
