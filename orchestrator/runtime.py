"""Connecting to Ray: the embedded local default, or a cluster named by RAY_ADDRESS / ray job submit."""

from __future__ import annotations

import logging
import os

from orchestrator.config import ScalingConfig

log = logging.getLogger(__name__)

# Serve's fast path (measured in bench/serve_latency.py): HAProxy in front, straight to the replicas'
# own HTTP servers (direct ingress), instead of Serve's Python proxy (~11 ms a request here). A
# request cut off by a dying replica is sent to another (inference is idempotent; HAProxy keeps the
# request buffered for that). A stopping replica drains for 2 s, not 30: HAProxy hears of it within
# ~0.1 s. The throughput-optimized mode runs replica code on the replica's own loop (no thread hop
# per request); its handle routers stay on their own loop, as by default, so that a driver's plain
# `handle.method.remote().result()` keeps working (the infer path makes no handle calls).
# Read by Serve at import, so they must be in the environment Ray starts with; each can be
# overridden there (RAY_SERVE_ENABLE_HA_PROXY=0 goes back to Serve's own proxy).
SERVE_ENV = {
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "1",
    "RAY_SERVE_HAPROXY_NBTHREAD": "2",
    "RAY_SERVE_HAPROXY_RETRY_ON": "conn-failure empty-response junk-response",
    "RAY_SERVE_HAPROXY_RETRIES": "8",
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2",
}

# Ray Train's controller polls workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s by default),
# which makes every ray.train.report() block ~2 s; 0.1 s cuts a tiny fit() by ~30% (RAY_NOTES.md).
RAY_ENV = {
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1",
    "RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0",
    "WANDB_SILENT": "true",
    **SERVE_ENV,
}

# Tune's newer reporter prints an experiment table even at verbose=0; its older one prints nothing
# there. TrialProgress (orchestrator.training.reports) prints the sweep instead.
QUIET_ENV = {"RAY_AIR_NEW_OUTPUT": "0", "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
VERBOSE_ENV = {"RAY_AIR_NEW_OUTPUT": "1", "RAY_DATA_DISABLE_PROGRESS_BARS": "0"}


def ensure_ray(scaling: ScalingConfig, *, verbose: bool = False) -> bool:
    """Connect to Ray if not yet connected. Returns True when this call started a local Ray.

    With RAY_ADDRESS set (or inside `ray job submit`), joins that cluster; otherwise starts an
    embedded local Ray with `scaling.local_num_cpus` logical CPUs. Unless `verbose`, Ray's own output
    stays off the driver: workers' stdout and stderr (they still go to Ray's log files), Ray's INFO
    logs, Tune's table, Ray Data's progress bars and Ray's deprecation warnings. A failing worker's
    traceback still reaches the driver, in the exception Ray Train raises and in Tune's error log.
    """
    import ray

    for key, value in RAY_ENV.items():
        os.environ.setdefault(key, value)  # inherited by the local raylet and its workers
    os.environ.update(VERBOSE_ENV if verbose else QUIET_ENV)  # read by this driver; set for each job of a multirun
    if ray.is_initialized():
        quiet_driver(verbose)
        return False
    level = logging.INFO if verbose else logging.WARNING
    if os.environ.get("RAY_ADDRESS"):
        # A cluster (or `ray job submit`) brings its own runtime env; don't fight it.
        context = ray.init(log_to_driver=verbose, logging_level=level)
        quiet_driver(verbose)
        log.info("connected to the Ray cluster at %s (dashboard %s)", ray.get_runtime_context().gcs_address,
                 context.dashboard_url)
        return False
    context = ray.init(num_cpus=scaling.local_num_cpus, log_to_driver=verbose, logging_level=level)
    quiet_driver(verbose)
    log.info("started an embedded local Ray with %d logical CPUs (dashboard %s)", scaling.local_num_cpus,
             context.dashboard_url)
    return True


def quiet_driver(verbose: bool) -> None:
    """This driver's share of Ray's output, as `ensure_ray` describes: Ray Data's console logs and progress
    bars, Serve's driver-side logs and Ray's deprecation warnings (the "ray" logger's level is ray.init's)."""
    import warnings

    import ray.data
    from ray.util.annotations import RayDeprecationWarning

    level = logging.INFO if verbose else logging.WARNING
    for handler in logging.getLogger("ray.data").handlers:
        if handler.name == "console":  # its file handler keeps logging everything to ray-data.log
            handler.setLevel(level)
    # Its only message says the progress bars are off, which is what quiet means here.
    logging.getLogger("ray.data._internal.progress").setLevel(logging.NOTSET if verbose else logging.ERROR)
    logging.getLogger("ray.serve").setLevel(level)
    ray.data.DataContext.get_current().enable_progress_bars = verbose
    warnings.filterwarnings("default" if verbose else "ignore", category=RayDeprecationWarning)
