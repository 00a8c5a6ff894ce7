"""MLflow tracking without Ray: where the store is, what a run holds, a restart continuing its run, the
registry tag, trials opening a fresh store at once, and the configs that cannot work failing early.
Runs are read back through MLflow's own client."""

from __future__ import annotations

import logging
import multiprocessing

import pytest
from mlflow.tracking import MlflowClient

from orchestrator.config import (
    PipelineConfig,
    StorageConfig,
    TrackingBackend,
    TrackingConfig,
    TrainConfig,
    to_config,
    to_dict,
    validate,
)
from orchestrator.training.tracking import (
    MLFLOW_RUN_KEY,
    REGISTRY_TAG,
    RUN_URL_TAG,
    MlflowTracker,
    Tracker,
    mlflow_uri,
    start_tracking,
    tag_registered_version,
)

MLFLOW = TrackingConfig(backend=TrackingBackend.mlflow, project="unit")


def _start(root: str, run_url: str, *, rank: int = 0, cfg: TrackingConfig = MLFLOW, lr: float = 0.01) -> Tracker:
    config = to_dict(PipelineConfig(storage=StorageConfig(root=root), train=TrainConfig(lr=lr)))
    return start_tracking(cfg, root, name=run_url.rsplit("/", 1)[-1], group="g", config=config, rank=rank,
                          run_url=run_url)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> str:
    """One local storage root (and so one MLflow store) for the module: a fresh store's tables take
    seconds to create. Tests tell their runs apart by Train run URL."""
    return tmp_path_factory.mktemp("tracking").as_uri()


def _runs(root: str, *run_urls: str):
    """(client, runs of `run_urls`) read through MLflow's own client."""
    client = MlflowClient(mlflow_uri(MLFLOW, root))
    runs = client.search_runs([client.get_experiment_by_name("unit").experiment_id])
    return client, [r for r in runs if r.data.tags[RUN_URL_TAG] in run_urls]


def test_the_default_store_is_a_sqlite_file_under_a_local_root(tmp_path):
    root = tmp_path.as_uri()
    assert mlflow_uri(MLFLOW, root) == f"sqlite:///{tmp_path}/mlflow/mlflow.db"
    assert mlflow_uri(TrackingConfig(backend=TrackingBackend.mlflow, uri="http://tracker:5000"), root) \
        == "http://tracker:5000"
    with pytest.raises(ValueError, match="tracking.uri"):
        mlflow_uri(MLFLOW, "s3://bucket/runs")


def test_a_relative_sqlite_uri_is_resolved_once_at_the_driver(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert TrackingConfig(uri="sqlite:///store/m.db").uri == f"sqlite:///{tmp_path}/store/m.db"
    assert TrackingConfig(uri="sqlite:////abs/m.db").uri == "sqlite:////abs/m.db"
    with pytest.raises(ValueError, match="tracking.uri"):
        TrackingConfig(uri=" ")


def test_mlflow_with_an_s3_root_needs_a_tracking_uri_before_ray_starts(compose):
    with pytest.raises(ValueError, match="tracking.uri"):
        to_config(compose(["tracking=mlflow", "storage=s3"]))
    cfg = to_config(compose(["tracking=mlflow", "storage=s3", "tracking.uri=http://tracker:5000"]))
    assert (cfg.tracking.backend, cfg.tracking.uri) == ("mlflow", "http://tracker:5000")
    validate(to_config(compose(["tracking=mlflow"])))  # a local root needs no uri


def test_a_run_holds_the_flat_config_and_numeric_metrics_per_epoch(root):
    tracker = _start(root, f"{root}/ray_results/r1")
    assert isinstance(tracker, MlflowTracker)
    for epoch in (1, 2, 3):
        tracker.log({"epoch": epoch, "val_accuracy": 0.5 + epoch / 10, "phase_name": "all"}, step=epoch)
    tracker.finish()
    client, (run,) = _runs(root, f"{root}/ray_results/r1")
    assert run.info.status == "FINISHED"
    assert run.data.params["train.lr"] == "0.01" and run.data.params["storage.root"] == root
    assert run.data.tags[RUN_URL_TAG] == f"{root}/ray_results/r1"
    history = client.get_metric_history(run.info.run_id, "val_accuracy")
    assert [(m.step, round(m.value, 6)) for m in history] == [(1, 0.6), (2, 0.7), (3, 0.8)]
    assert "phase_name" not in run.data.metrics  # strings are not metrics
    assert tracker.run_reference() == {MLFLOW_RUN_KEY: run.info.run_id}


def test_a_restarted_worker_group_continues_the_same_run_and_other_ranks_log_nothing(root):
    first = _start(root, f"{root}/ray_results/r2")
    first.log({"val_loss": 1.0}, step=1)
    assert type(_start(root, f"{root}/ray_results/r2", rank=1)) is Tracker
    again = _start(root, f"{root}/ray_results/r2", lr=0.5)  # a param that changed is not re-logged
    again.log({"val_loss": 0.5}, step=2)
    other = _start(root, f"{root}/ray_results/r3")
    client, runs = _runs(root, f"{root}/ray_results/r2", f"{root}/ray_results/r3")
    assert len(runs) == 2 and again.run_reference() == first.run_reference() != other.run_reference()
    run_id = first.run_reference()[MLFLOW_RUN_KEY]
    assert [m.step for m in client.get_metric_history(run_id, "val_loss")] == [1, 2]
    assert client.get_run(run_id).data.params["train.lr"] == "0.01"


def test_the_registered_version_tags_the_run_its_history_names(root, tmp_path, caplog):
    tracker = _start(root, f"{root}/ray_results/r4")
    history = [{"epoch": 1, **tracker.run_reference()}, {"epoch": 2, **tracker.run_reference()}]
    assert tag_registered_version(MLFLOW, root, history, "digits:3") == tracker.run_reference()[MLFLOW_RUN_KEY]
    client, (run,) = _runs(root, f"{root}/ray_results/r4")
    assert run.data.tags[REGISTRY_TAG] == "digits:3"
    assert tag_registered_version(MLFLOW, root, [{"epoch": 1}], "digits:4") is None  # no run reported
    off = TrackingConfig(enabled=False, backend=TrackingBackend.mlflow)
    assert tag_registered_version(off, root, history, "digits:4") is None
    (tmp_path / "a_file").write_text("")
    unreachable = TrackingConfig(backend=TrackingBackend.mlflow, uri=f"sqlite:///{tmp_path}/a_file/x.db")
    with caplog.at_level(logging.WARNING):  # the store cannot be opened: a warning, not an error
        assert tag_registered_version(unreachable, root, history, "digits:4") is None
    assert "could not tag MLflow run" in caplog.text
    assert client.get_run(run.info.run_id).data.tags[REGISTRY_TAG] == "digits:3"


def _open_run(root: str, index: int) -> str:
    return _start(root, f"{root}/ray_results/trial{index}").run_reference()[MLFLOW_RUN_KEY]


@pytest.mark.slow  # three processes create one fresh store's tables: tens of seconds on a busy machine
def test_trials_opening_a_fresh_store_at_once_each_get_their_run(tmp_path):
    # Without the store lock, concurrent first uses race MLflow's schema migration and fail.
    fresh = tmp_path.as_uri()
    with multiprocessing.get_context("fork").Pool(3) as pool:
        ids = pool.starmap(_open_run, [(fresh, i) for i in range(3)])
    _, runs = _runs(fresh, *(f"{fresh}/ray_results/trial{i}" for i in range(3)))
    assert len(set(ids)) == 3 and {r.info.run_id for r in runs} == set(ids)
