"""Promotion on a real local Ray: two real training runs on digits (a weak one and a good one) registered
in turn through the pipeline's registration step; `production` moves only for a version that is better
on the same test split, and the summary line says whether it did and why."""

from __future__ import annotations

import dataclasses

import pytest

from orchestrator.config import (
    PipelineConfig,
    PromoteMode,
    RegistryConfig,
    ScalingConfig,
    StorageConfig,
    TrackingConfig,
    TrainConfig,
)
from orchestrator.flows import PipelineResult, register_sweep, serving_version, version_summary
from orchestrator.optimize.gate import accuracy
from orchestrator.registry import ModelRegistry
from orchestrator.registry.promotion import CANDIDATE_ALIAS
from orchestrator.training.data import load_split
from orchestrator.training.loop import run_train
from orchestrator.training.sweep import SweepResult
from orchestrator.training.tasks import get_task

pytestmark = pytest.mark.slow  # two real training runs, about a minute


@pytest.fixture(scope="module")
def runs(ray_cluster, tmp_path_factory):
    """(cfg, weak TrainResult, good TrainResult): 1 epoch at lr 1e-4, and 3 epochs at lr 0.01."""
    root = tmp_path_factory.mktemp("promotion").as_uri()
    cfg = PipelineConfig(storage=StorageConfig(root=root), tracking=TrackingConfig(enabled=False),
                         scaling=ScalingConfig(num_workers=1), train=TrainConfig(epochs=3, lr=0.01))
    weak_cfg = dataclasses.replace(cfg, train=TrainConfig(epochs=1, lr=1e-4))
    return cfg, run_train(weak_cfg), run_train(cfg)


def _register(cfg: PipelineConfig, result, model: str, **registry):
    """Register `result` as a version of `model` as the pipeline does (register_sweep on a one-trial sweep);
    (version, the pipeline's summary line)."""
    cfg = dataclasses.replace(cfg, registry=RegistryConfig(model_name=model, **registry))
    sweep = SweepResult(name="promotion", best_trial_id="t0", best_overrides={}, best=result)
    version = register_sweep(cfg, sweep)
    summary = PipelineResult(sweep=sweep, version=version, deployment=None, endpoint_accuracy=None).summary()
    return version, summary


def test_production_moves_only_for_a_version_better_on_test(runs):
    cfg, weak, good = runs
    registry = ModelRegistry(cfg.storage.root)
    model = "better"  # each test registers its own model

    first, summary = _register(cfg, weak, model)
    assert summary["promoted"] is True and summary["promotion_reason"] == "no version holds 'production' yet"
    assert registry.aliases(model) == {"production": first.version}

    better, summary = _register(cfg, good, model)
    assert better.metrics["test_accuracy"] > first.metrics["test_accuracy"] + 0.2
    assert summary["promoted"] is True and summary["alias"] == "production"
    assert f"against production v{first.version}" in summary["promotion_reason"]
    assert registry.aliases(model)["production"] == better.version

    worse, summary = _register(cfg, weak, model)  # a retrain that is worse on test
    assert summary["promoted"] is False and summary["alias"] == CANDIDATE_ALIAS
    assert "not better by more than the margin" in summary["promotion_reason"]
    assert registry.aliases(model) == {"production": better.version, CANDIDATE_ALIAS: worse.version}
    assert worse.manifest["promotion"]["against"] == better.version
    assert serving_version(cfg, worse) == better.version  # the pipeline keeps serving production

    equal, summary = _register(cfg, good, model)  # as good, not better: production stays
    assert summary["promoted"] is False and registry.aliases(model)["production"] == better.version
    assert registry.aliases(model)[CANDIDATE_ALIAS] == equal.version


def test_never_holds_a_better_version_and_always_promotes_a_worse_one(runs):
    cfg, weak, good = runs
    registry = ModelRegistry(cfg.storage.root)
    model = "never-always"
    _register(cfg, weak, model, promote=PromoteMode.always)  # production: the weak version, whatever came before
    weak_production = registry.aliases(model)["production"]

    held, summary = _register(cfg, good, model, promote=PromoteMode.never)
    assert summary["promoted"] is False and "registry.promote=never" in summary["promotion_reason"]
    assert registry.aliases(model) == {"production": weak_production, CANDIDATE_ALIAS: held.version}

    forced, summary = _register(cfg, weak, model, promote=PromoteMode.always)
    assert summary["promoted"] is True and registry.aliases(model)["production"] == forced.version

    margin, summary = _register(cfg, good, model, promote_margin=0.99)  # better, but not by 99 points
    assert summary["promoted"] is False and registry.aliases(model)[CANDIDATE_ALIAS] == margin.version
    assert registry.aliases(model)["production"] == forced.version


def test_the_manifest_records_test_metrics_the_servable_reproduces(runs):
    cfg, _, good = runs
    version, summary = _register(cfg, good, "manifest")
    metrics = version.metrics
    assert {"val_accuracy", "val_loss", "test_accuracy", "test_loss"} <= set(metrics)
    assert {"val_accuracy", "test_accuracy", "promoted"} <= set(summary)
    assert summary == {**summary, **version_summary(version, get_task("classification"))}
    registry = ModelRegistry(cfg.storage.root)
    loaded, arrays = registry.load("manifest", version.version)
    served = accuracy(loaded.manifest, arrays, *load_split(good.data, "test"))
    assert served == pytest.approx(metrics["test_accuracy"], abs=1e-9)  # the same rows, scored the same
    assert good.data.num_test == 180 and metrics["val_accuracy"] == pytest.approx(good.metrics["val_accuracy"])
