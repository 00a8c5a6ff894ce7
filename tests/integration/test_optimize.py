"""Compression on a real local Ray: pruning fine-tunes and distillation on Ray Train (2 workers),
teacher outputs computed once with Ray Data, and an int8 variant served over HTTP by its alias."""

import dataclasses

import numpy as np
import pytest
import requests
import torch
from ray import serve
from ray.data.dataset import MaterializedDataset

from orchestrator.config import (
    DistillConfig,
    ModelConfig,
    OptimizeConfig,
    OptimizeMethod,
    PipelineConfig,
    PruneConfig,
    ScalingConfig,
    ServeConfig,
    StorageConfig,
    TrackingConfig,
    to_dict,
)
from orchestrator.optimize.distill import teacher_datasets
from orchestrator.optimize.gate import accuracy, predict_labels
from orchestrator.optimize.prune import apply_masks, l1_masks
from orchestrator.optimize.run import run_optimize
from orchestrator.registry import ModelRegistry, signature_for
from orchestrator.training.data import load_split, prepare_dataset
from orchestrator.training.models import build_model
from serve.deploy import run_deploy
from tests.support import fit, free_port, last_json_line, run_job

pytestmark = pytest.mark.slow

MODEL = "digits"
SPARSITY = 0.5
TOLERANCE = 0.02


@pytest.fixture(scope="module")
def parent(tmp_path_factory):
    """Registry v1 ('production'): an MLP trained in this process on the digits train split."""
    root = tmp_path_factory.mktemp("optimize").as_uri()
    cfg = PipelineConfig(
        model=ModelConfig(hidden=[64, 32]), storage=StorageConfig(root=root), tracking=TrackingConfig(enabled=False),
        scaling=ScalingConfig(num_workers=2, cpus_per_worker=0.5),
        serve=ServeConfig(port=free_port(), min_replicas=1, max_replicas=1),
    )
    info = prepare_dataset(cfg.data, root)
    x, y = load_split(info, "train")
    torch.manual_seed(0)
    model = build_model(cfg.model, info.input_shape, info.num_classes)
    fit(model, x, y, 250)
    registry = ModelRegistry(root)
    arrays = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    version = registry.register(MODEL, arrays, metrics={}, config=to_dict(cfg), lineage={"data_digest": info.digest},
                                signature=signature_for(info.input_shape, info.num_classes))
    registry.set_alias(MODEL, "production", version.version)
    val_x, val_y = load_split(info, "val")
    return dataclasses.make_dataclass("Parent", ["cfg", "info", "version", "arrays", "train_x", "val_x", "val_y"])(
        cfg, info, version, arrays, x, val_x, val_y)


@pytest.fixture(scope="module")
def compressed(ray_cluster, parent):
    """One optimize run: int8_dynamic, both prunings (2 fine-tune epochs each) and a distilled student."""
    optimize = OptimizeConfig(
        methods=[
            OptimizeMethod.int8_dynamic,
            OptimizeMethod.prune_unstructured,
            OptimizeMethod.prune_structured,
            OptimizeMethod.distill,
        ],
        tolerance=TOLERANCE,
        latency_repeats=5,
        prune=PruneConfig(sparsity=SPARSITY, finetune_epochs=2, lr=0.001),
        distill=DistillConfig(student={"hidden": [32]}, epochs=15, lr=0.01, temperature=4.0, alpha=0.7),
    )
    return run_optimize(dataclasses.replace(parent.cfg, optimize=optimize), "production")


def outcome(result, method: str):
    return next(o for o in result.outcomes if o.method == method)


def report_row(result, method: str):
    return next(r for r in result.report if r.name == method)


def test_unstructured_pruning_keeps_the_configured_sparsity_through_its_fine_tune(parent, compressed):
    found = outcome(compressed, "prune_unstructured")
    assert found.version is not None, found.message
    version, arrays = ModelRegistry(parent.cfg.storage.root).load(MODEL, "prune_unstructured")
    weights = [arrays[name] for name in ("stages.block0.1.weight", "stages.block1.0.weight", "head.weight")]
    zeros = sum((w == 0).sum() for w in weights) / sum(w.size for w in weights)
    assert zeros == pytest.approx(SPARSITY, abs=1e-3)
    assert version.manifest["variant"]["measured_sparsity"] == pytest.approx(SPARSITY, abs=1e-3)
    assert version.manifest["lineage"]["run"] and version.manifest["lineage"]["parent_version"] == 1
    assert found.decision.drop <= TOLERANCE
    # The fine-tune moved the surviving weights (the masks alone would leave them as they were).
    pruned_only = apply_masks(parent.arrays, l1_masks(_float_model(parent), SPARSITY, structured=False))
    assert not np.array_equal(arrays["head.weight"], pruned_only["head.weight"])
    assert np.array_equal(arrays["head.weight"] == 0, pruned_only["head.weight"] == 0)


def test_structured_pruning_removes_half_the_hidden_units(parent, compressed):
    found = outcome(compressed, "prune_structured")
    assert found.version is not None, found.message
    _, arrays = ModelRegistry(parent.cfg.storage.root).load(MODEL, "prune_structured")
    for name, units in (("stages.block0.1", 64), ("stages.block1.0", 32)):
        removed = ~arrays[f"{name}.weight"].any(axis=1)
        assert removed.sum() == units * SPARSITY and not arrays[f"{name}.bias"][removed].any()
    assert (arrays["head.weight"] != 0).any(axis=1).all()
    row = report_row(compressed, "prune_structured")
    assert row.nonzero < report_row(compressed, "parent").nonzero * 0.6


def test_distilled_student_is_smaller_and_within_tolerance(parent, compressed):
    found = outcome(compressed, "distill")
    assert found.version is not None, found.message
    assert found.decision.drop <= TOLERANCE
    version, _ = ModelRegistry(parent.cfg.storage.root).load(MODEL, "distill")
    assert version.manifest["config"]["model"]["hidden"] == [32]
    assert version.manifest["variant"]["temperature"] == 4.0 and version.manifest["variant"]["alpha"] == 0.7
    student, teacher = report_row(compressed, "distill"), report_row(compressed, "parent")
    assert student.parameters == 64 * 32 + 32 + 32 * 10 + 10 < teacher.parameters
    assert student.size_bytes < teacher.size_bytes


def test_teacher_outputs_are_computed_once_into_the_object_store(parent, ray_cluster):
    datasets = teacher_datasets(parent.info, parent.version.manifest, parent.arrays)
    assert isinstance(datasets["train"], MaterializedDataset)
    rows = datasets["train"].take_all()
    assert len(rows) == parent.info.num_train
    x = np.stack([r["x"] for r in rows])
    with torch.no_grad():
        expected = _float_model(parent)(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(np.stack([r["teacher"] for r in rows]), expected, atol=1e-5)


def test_int8_variant_served_over_http_answers_like_its_parent(parent, compressed):
    found = outcome(compressed, "int8_dynamic")
    assert found.version is not None, found.message
    deployed = run_deploy(parent.cfg, "int8_dynamic")  # by alias, like any version
    try:
        assert deployed.version == found.version.version
        rows = parent.val_x
        body = {
            "inputs": [{"name": "input", "shape": list(rows.shape), "datatype": "FP32", "data": rows.ravel().tolist()}]
        }
        headers = {"Authorization": f"Bearer {deployed.api_key}"} if deployed.api_key else {}
        response = requests.post(f"{deployed.endpoint}/infer", json=body, headers=headers, timeout=60)
        assert response.status_code == 200, response.text
        assert response.headers["X-Model-Version"] == str(found.version.version)
        served = np.asarray(next(o for o in response.json()["outputs"] if o["name"] == "label")["data"])
    finally:
        serve.shutdown()
    parent_labels = predict_labels(parent.version.manifest, parent.arrays, rows)
    assert (served == parent_labels).mean() >= 0.99
    assert (
        accuracy(parent.version.manifest, parent.arrays, rows, parent.val_y) - (served == parent.val_y).mean() <= 0.01
    )


def _float_model(parent) -> torch.nn.Module:
    model = build_model(parent.cfg.model, parent.info.input_shape, parent.info.num_classes)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in parent.arrays.items()})
    return model.eval()


def test_optimize_job_prints_the_report_and_a_summary(parent):
    # int8 only: the job runs without starting Ray. Placed last: it moves the int8 aliases.
    root = parent.cfg.storage.root
    done = run_job("optimize", f"storage.root={root}", "optimize=int8", "optimize.source=1", timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| parent | 1 | parent |" in done.stdout and "| int8_static |" in done.stdout
    summary = last_json_line(done.stdout)
    assert summary["parent_version"] == 1 and summary["variants"]["int8_dynamic"]["registered"] is True
    report = summary["report"].removeprefix("file://")
    assert open(report).read().count("\n| ") == 4
    bad = run_job("optimize", f"storage.root={root}", "optimize=int8", "optimize.tolerance=2", timeout=120)
    assert bad.returncode != 0 and "optimize.tolerance must be in [0, 1], got 2" in bad.stderr
