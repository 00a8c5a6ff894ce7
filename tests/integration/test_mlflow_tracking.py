"""tracking=mlflow on a real local Ray: a two-trial sweep of two-rank runs makes one MLflow run per
trial (rank 0 only) in the default store under the storage root, with the flattened config as params,
one point per epoch, and the registered version as a tag. Everything is read back through MLflow's
own client."""

import pytest
from mlflow.tracking import MlflowClient

from orchestrator.config import (
    ModelConfig,
    PipelineConfig,
    ScalingConfig,
    StorageConfig,
    TrackingBackend,
    TrackingConfig,
    TrainConfig,
    TuneConfig,
    TuneScheduler,
)
from orchestrator.flows import register_sweep
from orchestrator.registry import ModelRegistry
from orchestrator.training.sweep import run_sweep
from orchestrator.training.tracking import MLFLOW_RUN_KEY, REGISTRY_TAG, RUN_URL_TAG, mlflow_uri

pytestmark = pytest.mark.slow

EPOCHS = 3
RATES = (0.003, 0.01)


@pytest.fixture(scope="module")
def tracked(ray_cluster, tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow")
    cfg = PipelineConfig(
        model=ModelConfig(hidden=[16]),
        storage=StorageConfig(root=f"file://{root}"),
        tracking=TrackingConfig(backend=TrackingBackend.mlflow, project="it"),
        scaling=ScalingConfig(num_workers=2, cpus_per_worker=0.5),
        train=TrainConfig(epochs=EPOCHS),
        tune=TuneConfig(scheduler=TuneScheduler.fifo, num_samples=1, max_concurrent_trials=2,
                        search_space={"train": {"lr": ["grid", *RATES]}}),
    )
    sweep = run_sweep(cfg)
    version = register_sweep(cfg, sweep)
    client = MlflowClient(mlflow_uri(cfg.tracking, cfg.storage.root))
    runs = client.search_runs([client.get_experiment_by_name("it").experiment_id])
    return cfg, sweep, version, client, runs


def test_the_default_store_lives_under_the_storage_root(tracked):
    cfg, *_ = tracked
    assert mlflow_uri(cfg.tracking, cfg.storage.root) == f"sqlite:///{cfg.storage.root.removeprefix('file://')}" \
        "/mlflow/mlflow.db"


def test_one_run_per_trial_from_rank_zero_with_the_flat_config(tracked):
    _, sweep, _, _, runs = tracked
    assert len(sweep.trials) == 2 and len(runs) == 2  # two ranks per trial, one run each
    assert sorted(float(r.data.params["train.lr"]) for r in runs) == sorted(RATES)
    for run in runs:
        assert run.info.status == "FINISHED"
        assert run.data.params["model.hidden"] == "[16]" and run.data.params["scaling.num_workers"] == "2"
        assert run.data.params["tracking.backend"] == "mlflow"
        assert run.data.tags[RUN_URL_TAG].endswith(f"/trials/{run.info.run_name}")


def test_every_epoch_is_one_point_of_each_metric(tracked):
    _, _, _, client, runs = tracked
    for run in runs:
        for metric in ("train_loss", "val_loss", "val_accuracy"):
            history = client.get_metric_history(run.info.run_id, metric)
            assert sorted(m.step for m in history) == list(range(1, EPOCHS + 1)), metric
    best = max(runs, key=lambda r: r.data.metrics["val_accuracy"])
    assert best.data.metrics["val_accuracy"] > 0.8


def test_the_registered_version_tags_the_best_trials_run(tracked):
    cfg, sweep, version, client, runs = tracked
    tagged = [r for r in (client.get_run(r.info.run_id) for r in runs) if REGISTRY_TAG in r.data.tags]
    assert [r.data.tags[REGISTRY_TAG] for r in tagged] == [f"{cfg.registry.model_name}:{version.version}"]
    assert tagged[0].info.run_name == sweep.best_trial_id
    manifest = ModelRegistry(cfg.storage.root).get(cfg.registry.model_name, version.version).manifest
    assert {row[MLFLOW_RUN_KEY] for row in manifest["metrics"]["history"]} == {tagged[0].info.run_id}
    assert float(tagged[0].data.params["train.lr"]) == sweep.best_overrides["train.lr"]
