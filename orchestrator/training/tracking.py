"""Experiment tracking, rank 0 only: one wandb run per training run (offline by default), or one MLflow run.

MLflow (`tracking.backend=mlflow`): the run carries the flattened config as params and every epoch's
numeric metrics, is tagged with its Train run's storage URL (a restarted or resumed run continues the
same MLflow run), and reports its id in each epoch's metrics (`MLFLOW_RUN_KEY`), so the driver can tag
it with the registry version once that exists (`tag_registered_version`). The store is
`tracking.uri`, else a sqlite file under the storage root: no server needed.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import numbers
import os
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

from orchestrator.config import TrackingBackend, TrackingConfig, flatten
from orchestrator.registry import storage

log = logging.getLogger(__name__)

MLFLOW_RUN_KEY = "mlflow_run_id"
"""Key of each epoch's metrics that names the MLflow run logging them."""
RUN_URL_TAG = "orchestrator.run_url"
"""MLflow tag: storage URL of the Ray Train run the MLflow run tracks."""
GROUP_TAG = "orchestrator.group"
"""MLflow tag: the sweep (or run name) the run belongs to."""
REGISTRY_TAG = "registry.reference"
"""MLflow tag: the registry version trained by the run, as 'name:version'."""
_PARAM_LIMIT = 6000
"""Longest param value MLflow stores (longer ones are cut, with a marker)."""
_BATCH = 100
"""Params per log_batch call (MLflow's limit)."""


class Tracker:
    """Logs metrics of one run. The base class does nothing (tracking off, or not rank 0)."""

    def log(self, metrics: Dict[str, Any], step: int) -> None:
        pass

    def run_reference(self) -> Dict[str, str]:
        """Entries each epoch's reported metrics carry so the driver can find this run later (none here)."""
        return {}

    def finish(self) -> None:
        pass


class WandbTracker(Tracker):
    def __init__(self, run):
        self._run = run

    def log(self, metrics: Dict[str, Any], step: int) -> None:
        self._run.log(metrics, step=step)

    def finish(self) -> None:
        self._run.finish()


class MlflowTracker(Tracker):
    """One MLflow run, written through MlflowClient (no global active run, so runs of one process never mix)."""

    def __init__(self, client, run_id: str):
        self._client, self.run_id = client, run_id

    def log(self, metrics: Dict[str, Any], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        numeric = [Metric(key, float(value), now, step) for key, value in metrics.items()
                   if isinstance(value, numbers.Real) and not isinstance(value, bool)]
        self._client.log_batch(self.run_id, metrics=numeric)

    def run_reference(self) -> Dict[str, str]:
        return {MLFLOW_RUN_KEY: self.run_id}

    def finish(self) -> None:
        self._client.set_terminated(self.run_id)


def tracking_dir(cfg: TrackingConfig, root: str) -> str:
    """Local folder for wandb files: `cfg.dir`, else <root>/wandb for a local root, else ./wandb."""
    if cfg.dir:
        return cfg.dir
    return storage.filesystem(storage.join(root, "wandb"))[1] if storage.is_local(root) else os.path.abspath("wandb")


def start_tracking(
    cfg: TrackingConfig, root: str, *, name: str, group: str, config: Dict[str, Any], rank: int, run_url: str,
) -> Tracker:
    """A wandb or MLflow run for rank 0 when tracking is on; a do-nothing Tracker otherwise.

    Under Ray Train V2 `setup_wandb(rank_zero_only=True)` is ignored (every rank makes a run),
    so the rank check lives here. `run_url` (the Train run's storage URL) identifies the MLflow run:
    a restarted worker group continues it instead of starting another.
    """
    if not cfg.enabled or rank != 0:
        return Tracker()
    if cfg.backend == TrackingBackend.mlflow:
        return _start_mlflow(cfg, root, name=name, group=group, config=config, run_url=run_url)
    if cfg.mode == "disabled":
        return Tracker()
    import wandb

    directory = tracking_dir(cfg, root)
    os.makedirs(directory, exist_ok=True)
    run = wandb.init(
        project=cfg.project, name=name, group=group, config=config, dir=directory,
        mode=cfg.mode,  # type: ignore[arg-type]  # a str that TrackingConfig checks against wandb's modes
        reinit="create_new", settings=wandb.Settings(silent=True, console="off"),
    )
    return WandbTracker(run)


# --- MLflow -----------------------------------------------------------------------------------------


def mlflow_uri(cfg: TrackingConfig, root: str) -> str:
    """`tracking.uri`, else a sqlite store at <root>/mlflow/mlflow.db (local roots only).

    Raises ValueError naming tracking.uri for a non-local root without one: sqlite cannot live on
    S3, and a file on one worker's disk is out of the driver's reach.
    """
    if cfg.uri:
        return cfg.uri
    if not storage.is_local(root):
        raise ValueError(f"tracking.uri must be set for tracking.backend=mlflow with storage.root={root!r} "
                         "(the default store is a sqlite file under a local root)")
    return "sqlite:///" + os.path.join(_default_store_dir(root), "mlflow.db")


def _default_store_dir(root: str) -> str:
    return storage.filesystem(storage.join(root, "mlflow"))[1]


@contextlib.contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """Exclusive use of a local sqlite store while it is opened: MLflow creates its tables on first use,
    and two trials doing so at once break each other's schema migration."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    path = uri.removeprefix("sqlite:///").split("?", 1)[0]
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(f"{path}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def mlflow_client(cfg: TrackingConfig, root: str):
    """An MlflowClient on the configured store (its tables created under the store lock on first use)."""
    from mlflow.tracking import MlflowClient

    # A first use migrates the sqlite schema and logs every step at INFO: noise in every trial's output.
    for name in ("alembic", "mlflow.store.db.utils"):
        logging.getLogger(name).setLevel(logging.WARNING)
    uri = mlflow_uri(cfg, root)
    with _store_lock(uri):
        client = MlflowClient(uri)  # opens the store: creates or upgrades its tables
        client.search_experiments(max_results=1)
    return client


def _experiment_id(client, cfg: TrackingConfig, root: str) -> str:
    """Id of the experiment named `tracking.project`, created (artifacts beside the default store) if missing."""
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(cfg.project)
    if found is not None:
        return found.experiment_id
    artifacts = None if cfg.uri else Path(_default_store_dir(root), "artifacts").as_uri()
    try:
        return client.create_experiment(cfg.project, artifact_location=artifacts)
    except MlflowException:  # another trial created it first
        found = client.get_experiment_by_name(cfg.project)
        if found is None:
            raise
        return found.experiment_id


def _start_mlflow(cfg: TrackingConfig, root: str, *, name: str, group: str, config: Dict[str, Any],
                  run_url: str) -> MlflowTracker:
    client = mlflow_client(cfg, root)
    uri = mlflow_uri(cfg, root)
    with _store_lock(uri):  # two trials must not both create the experiment, nor a restart its run twice
        experiment = _experiment_id(client, cfg, root)
        existing = client.search_runs([experiment], filter_string=f"tags.`{RUN_URL_TAG}` = {_quoted(run_url)}",
                                      max_results=1)
        if existing:
            log.info("MLflow run %s continues (%s)", existing[0].info.run_id, run_url)
            return MlflowTracker(client, existing[0].info.run_id)
        run = client.create_run(experiment, run_name=name, tags={RUN_URL_TAG: run_url, GROUP_TAG: group})
    for chunk in _param_batches(config):
        client.log_batch(run.info.run_id, params=chunk)
    return MlflowTracker(client, run.info.run_id)


def _quoted(value: str) -> str:
    """`value` as a string literal of MLflow's search filter (which has no escapes: pick the quote it lacks)."""
    if "'" in value and '"' in value:
        raise ValueError(f"tracking: a storage URL with both quote characters cannot be searched for: {value!r}")
    return f'"{value}"' if "'" in value else f"'{value}'"


def _param_batches(config: Dict[str, Any]) -> List[list]:
    """The config as MLflow params ('train.lr' -> '0.01'), in batches MLflow accepts."""
    from mlflow.entities import Param

    params = []
    for key, value in sorted(flatten(config).items()):
        text = str(value)
        if len(text) > _PARAM_LIMIT:
            text = text[: _PARAM_LIMIT - 12] + "...(cut)"
        params.append(Param(key, text))
    return [params[i: i + _BATCH] for i in range(0, len(params), _BATCH)]


def tag_registered_version(cfg: TrackingConfig, root: str, history: List[Dict[str, Any]],
                           reference: str) -> Optional[str]:
    """Tag the MLflow run that logged `history` (a registered checkpoint's epochs) with `reference`.

    Returns the run id; None when MLflow tracking is off or the history names no run. A store that
    cannot be reached is logged, not raised: the version is registered either way.
    """
    run_id = next((row[MLFLOW_RUN_KEY] for row in reversed(history) if MLFLOW_RUN_KEY in row), None)
    if not cfg.enabled or cfg.backend != TrackingBackend.mlflow or run_id is None:
        return None
    try:
        mlflow_client(cfg, root).set_tag(run_id, REGISTRY_TAG, reference)
    except Exception as error:  # tracking must not undo a registration that succeeded
        log.warning("could not tag MLflow run %s with %s=%s: %s", run_id, REGISTRY_TAG, reference, error)
        return None
    return run_id
