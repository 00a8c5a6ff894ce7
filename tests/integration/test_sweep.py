"""Ray Tune over Ray Train on a real local Ray: ASHA stops weak trials, the best is registered."""

import io
import os

import matplotlib.image
import pytest

from orchestrator.config import (
    PipelineConfig,
    ScheduleConfig,
    ScheduleKind,
    StorageConfig,
    TrackingConfig,
    TrackingMode,
    TrainConfig,
    TuneConfig,
    TuneScheduler,
)
from orchestrator.flows import register_sweep
from orchestrator.registry import ModelRegistry
from orchestrator.registry.curves import CURVES_FILE
from orchestrator.training.sweep import run_sweep

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sweep_and_root(ray_cluster, tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    cfg = PipelineConfig(
        storage=StorageConfig(root=f"file://{root}"),
        tracking=TrackingConfig(enabled=True, mode=TrackingMode.offline),
        train=TrainConfig(epochs=4),
        # Two good learning rates first, then hopeless ones: once the good trials have reported,
        # ASHA must stop the late, hopeless trials at their first rung.
        tune=TuneConfig(num_samples=1, max_concurrent_trials=4, grace_period=1, reduction_factor=2,
                        search_space={"train": {"lr": ["grid", 0.01, 0.005, 1e-6, 1e-6, 1e-6, 1e-6]}}),
    )
    return cfg, run_sweep(cfg), root


def test_asha_stops_weak_trials_early(sweep_and_root):
    cfg, sweep, _ = sweep_and_root
    assert len(sweep.trials) == 6
    stopped = [t for t in sweep.trials if t.status == "stopped early"]
    assert stopped, f"ASHA stopped nothing: {sweep.trials}"
    assert all(t.epochs_run < cfg.train.epochs for t in stopped)
    # A good trial may also trail a better one at a rung; the hopeless ones that start late never lead.
    assert any(t.overrides["train.lr"] == 1e-6 for t in stopped)
    assert any(t.status == "completed" for t in sweep.trials)
    assert not [t for t in sweep.trials if t.status.startswith("error")]


def test_best_trial_is_accurate_and_registered(sweep_and_root):
    cfg, sweep, root = sweep_and_root
    assert sweep.best_overrides["train.lr"] in (0.01, 0.005)
    assert sweep.best.metrics["val_accuracy"] > 0.9
    version = register_sweep(cfg, sweep)
    registry = ModelRegistry(cfg.storage.root)
    loaded, weights = registry.load(cfg.registry.model_name, "production")
    assert loaded.version == version.version
    assert loaded.manifest["lineage"]["trial_id"] == sweep.best_trial_id
    assert loaded.manifest["config"]["train"]["lr"] == sweep.best_overrides["train.lr"]
    assert loaded.metrics["val_accuracy"] == pytest.approx(sweep.best.metrics["val_accuracy"])
    # Its training curves were drawn at registration, checksummed like any version file.
    curves = registry.read_file(cfg.registry.model_name, version.version, CURVES_FILE)
    image = matplotlib.image.imread(io.BytesIO(curves), format="png")
    assert image.ndim == 3 and image.shape[2] == 4 and image[..., :3].min() < 0.5


def test_plot_written_beside_results(sweep_and_root):
    _, sweep, root = sweep_and_root
    path = sweep.plot_url.removeprefix("file://")
    assert path.startswith(str(root)) and os.path.dirname(path).endswith(sweep.name)
    import matplotlib.image

    image = matplotlib.image.imread(path)
    assert image.shape[0] > 200 and image.shape[1] > 300


def test_one_offline_wandb_run_per_trial(sweep_and_root):
    _, sweep, root = sweep_and_root
    runs = [d for d in os.listdir(root / "wandb" / "wandb") if d.startswith("offline-run-")]
    assert len(runs) == len(sweep.trials), "expected exactly one (rank 0) run per trial"


def test_schedule_boundaries_and_decay_are_swept_like_any_hyperparameter(ray_cluster, tmp_path):
    cfg = PipelineConfig(
        storage=StorageConfig(root=f"file://{tmp_path}"),
        tracking=TrackingConfig(enabled=False),
        train=TrainConfig(epochs=4),
        schedule=ScheduleConfig(kind=ScheduleKind.layerwise),
        tune=TuneConfig(
            num_samples=1,
            scheduler=TuneScheduler.fifo,
            search_space={"schedule": {"phase_epochs": ["grid", [1, 1, 2], [2, 1, 1]], "lr_decay": ["grid", 0.5]}},
        ),
    )
    sweep = run_sweep(cfg)
    assert sorted(tuple(t.overrides["schedule.phase_epochs"]) for t in sweep.trials) == [(1, 1, 2), (2, 1, 1)]
    assert all(t.status == "completed" and t.epochs_run == 4 for t in sweep.trials)
    # The best trial's history shows its own phase boundaries.
    boundaries = sweep.best_overrides["schedule.phase_epochs"]
    phases = [h["phase"] for h in sweep.best.history]
    expected = [p for p, n in enumerate(boundaries) for _ in range(n)]
    assert phases == expected[: len(phases)]
