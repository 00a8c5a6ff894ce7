"""Compression without Ray: int8 quantization, L1 masks, the gate, the report, and run_optimize for
the methods that need no Ray Train (int8, pruning without fine-tune), on a small digits model
trained in this process."""

from __future__ import annotations

import csv
import dataclasses
import io

import numpy as np
import pytest
import torch
from hydra.errors import ConfigCompositionException

from orchestrator.config import (
    BuiltinModel,
    DistillConfig,
    ModelConfig,
    OptimizeConfig,
    OptimizeMethod,
    PipelineConfig,
    PruneConfig,
    QuantizeConfig,
    StorageConfig,
    TrackingConfig,
    to_config,
    to_dict,
)
from orchestrator.optimize.gate import AccuracyGate, predict_labels
from orchestrator.optimize.prune import apply_masks, l1_masks, sparsity_of, unit_sparsity
from orchestrator.optimize.quantize import int8_arrays, int8_model, quantize
from orchestrator.optimize.run import needs_ray, run_optimize
from orchestrator.registry import WEIGHTS, ModelRegistry, signature_for, storage, weights_from_bytes, weights_to_bytes
from orchestrator.registry.servable import build_servable
from orchestrator.training.data import load_split, prepare_dataset
from orchestrator.training.models import build_model
from tests.support import fit

MODEL = "digits"
HEAD = {"int8_dynamic": "head", "int8_static": "module.head"}  # static wraps the model in QuantWrapper


@pytest.fixture(scope="module")
def parent(tmp_path_factory):
    """A registry holding v1: an MLP trained on the digits train split, with its data lineage."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("optimize").as_uri()
    cfg = PipelineConfig(
        model=ModelConfig(hidden=[64, 32]), storage=StorageConfig(root=root), tracking=TrackingConfig(enabled=False)
    )
    info = prepare_dataset(cfg.data, root)
    x, y = load_split(info, "train")
    torch.manual_seed(0)
    model = fit(build_model(cfg.model, info.input_shape, info.num_classes), x, y, 250).eval()  # about 95% val accuracy
    registry = ModelRegistry(root)
    version = registry.register(
        MODEL, {k: v.detach().numpy() for k, v in model.state_dict().items()}, metrics={}, config=to_dict(cfg),
        lineage={"data_digest": info.digest}, signature=signature_for(info.input_shape, info.num_classes),
    )
    registry.set_alias(MODEL, "production", version.version)
    val_x, val_y = load_split(info, "val")
    yield dataclasses.make_dataclass("Parent", ["cfg", "info", "model", "version", "val_x", "val_y", "train_x"])(
        cfg, info, model, version, val_x, val_y, x)
    torch.set_num_threads(threads)


def with_optimize(cfg: PipelineConfig, **fields) -> PipelineConfig:
    return dataclasses.replace(cfg, optimize=OptimizeConfig(**fields))


def variant_manifest(parent, method: str, backend: str = "x86") -> dict:
    return {
        "config": to_dict(parent.cfg),
        "signature": parent.version.signature,
        "variant": {"method": method, "backend": backend},
    }


# --- config -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("fields", "field_name"), [
    ({"methods": ["int4"]}, "optimize.methods"),
    ({"methods": ["int8_dynamic", "int8_dynamic"]}, "optimize.methods"),
    ({"tolerance": -0.1}, "optimize.tolerance"),
    ({"latency_repeats": 0}, "optimize.latency_repeats"),
])
def test_bad_optimize_values_name_the_field(fields, field_name):
    with pytest.raises(ValueError, match=field_name):
        OptimizeConfig(**fields)


@pytest.mark.parametrize(("make", "field_name"), [
    (lambda: PruneConfig(sparsity=1.0), "optimize.prune.sparsity"),
    (lambda: PruneConfig(finetune_epochs=-1), "optimize.prune.finetune_epochs"),
    (lambda: QuantizeConfig(backend="tensorrt"), "optimize.quantize.backend"),  # type: ignore[arg-type]  # a bad string on purpose
    (lambda: DistillConfig(student={"widths": [8]}), "optimize.distill.student"),
    (lambda: DistillConfig(student={"hidden": [0]}), "optimize.distill.student"),
    (lambda: DistillConfig(alpha=1.5), "optimize.distill.alpha"),
    (lambda: DistillConfig(temperature=0), "optimize.distill.temperature"),
])
def test_bad_method_settings_name_the_field(make, field_name):
    with pytest.raises(ValueError, match=field_name):
        make()


def test_optimize_is_off_by_default_and_overrides_compose(compose):
    assert to_config(compose([])).optimize.methods == []
    cfg = to_config(compose(["optimize=int8", "optimize.tolerance=0.005", "optimize.prune.sparsity=0.8"]))
    assert cfg.optimize.methods == ["int8_dynamic", "int8_static"] and cfg.optimize.tolerance == 0.005
    assert cfg.optimize.prune.sparsity == 0.8
    with pytest.raises(ConfigCompositionException, match="optimize.methods"):  # a choice: fails at compose
        compose(["optimize.methods=[int3]"])


def test_only_training_methods_need_ray():
    assert not needs_ray(OptimizeConfig(methods=[OptimizeMethod.int8_dynamic, OptimizeMethod.int8_static]))
    assert not needs_ray(
        OptimizeConfig(methods=[OptimizeMethod.prune_unstructured], prune=PruneConfig(finetune_epochs=0))
    )
    assert needs_ray(OptimizeConfig(methods=[OptimizeMethod.prune_structured]))
    assert needs_ray(OptimizeConfig(methods=[OptimizeMethod.distill]))


# --- int8 -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["int8_dynamic", "int8_static"])
def test_int8_arrays_round_trip_exactly_through_the_registry_format(parent, method):
    qmodel = quantize(parent.model, method, "x86", torch.from_numpy(parent.train_x[:256]))
    arrays = weights_from_bytes(weights_to_bytes(int8_arrays(qmodel)))  # allow_pickle=False inside
    assert all(a.dtype != object for a in arrays.values())
    assert arrays[f"{HEAD[method]}.weight.int8"].dtype == np.int8 and arrays[f"{HEAD[method]}.weight.int8"].shape == (
        10,
        32,
    )
    x = torch.from_numpy(parent.val_x)
    with torch.no_grad():
        expected = qmodel(x)
    served = build_servable(variant_manifest(parent, method), arrays)(x)
    assert torch.equal(served, expected)  # the served module is the quantized one, value for value
    assert (
        ".quantized"
        in type(int8_model(variant_manifest(parent, method), arrays).get_submodule(HEAD[method])).__module__
    )


def test_int8_static_on_a_cnn_quantizes_convolutions(parent):
    torch.manual_seed(0)
    cnn_cfg = ModelConfig(name=BuiltinModel.cnn, channels=[4, 8], hidden=[16])
    model = fit(
        build_model(cnn_cfg, [1, 8, 8], 10), parent.train_x, load_split(parent.info, "train")[1], steps=120
    ).eval()
    qmodel = quantize(model, "int8_static", "x86", torch.from_numpy(parent.train_x[:256]))
    arrays = int8_arrays(qmodel)
    assert arrays["module.stages.conv0.0.weight.int8"].shape == (4, 1, 3, 3)  # conv fused with its ReLU, in int8
    manifest = {
        **variant_manifest(parent, "int8_static"),
        "config": to_dict(dataclasses.replace(parent.cfg, model=cnn_cfg)),
    }
    with torch.no_grad():
        float_labels = model(torch.from_numpy(parent.val_x)).argmax(1).numpy()
    int8_labels = predict_labels(manifest, arrays, parent.val_x)
    assert (int8_labels == float_labels).mean() >= 0.97


# --- pruning ----------------------------------------------------------------------------------------


def test_unstructured_masks_prune_exactly_the_target_fraction_by_magnitude(parent):
    masks = l1_masks(parent.model, 0.6, structured=False)
    assert set(masks) == {
        "stages.block0.1.weight",
        "stages.block1.0.weight",
        "head.weight",
    }  # block0 starts with Flatten
    arrays = {k: v.detach().numpy() for k, v in parent.model.state_dict().items()}
    pruned = apply_masks(arrays, masks)
    assert sparsity_of(pruned, masks) == pytest.approx(0.6, abs=1e-4)
    # Global L1: every kept weight is at least as large as every pruned one.
    kept = np.concatenate([np.abs(arrays[n][m]) for n, m in masks.items()])
    dropped = np.concatenate([np.abs(arrays[n][~m]) for n, m in masks.items()])
    assert kept.min() >= dropped.max()
    assert np.array_equal(pruned["head.bias"], arrays["head.bias"])


def test_structured_masks_remove_whole_units_but_never_a_class(parent):
    masks = l1_masks(parent.model, 0.5, structured=True)
    assert "head.weight" not in masks
    arrays = apply_masks({k: v.detach().numpy() for k, v in parent.model.state_dict().items()}, masks)
    assert unit_sparsity(arrays, masks) == 0.5
    removed = ~arrays["stages.block0.1.weight"].any(axis=1)
    assert removed.sum() == 32 and not arrays["stages.block0.1.bias"][removed].any()


# --- gate ---------------------------------------------------------------------------------------------


def test_gate_accepts_up_to_the_tolerance_and_says_by_how_much_a_variant_missed():
    gate = AccuracyGate(0.01)
    assert gate.decide(0.95, 0.94).accepted  # exactly one point: accepted despite float rounding
    assert gate.decide(0.95, 0.97).accepted
    missed = gate.decide(0.95, 0.925)
    assert not missed.accepted and missed.drop == pytest.approx(0.025)
    assert "missed the tolerance by 1.50 points, not registered" in missed.message("digits v1 int8_static")


# --- run_optimize (no Ray) ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def int8_run(parent):
    cfg = with_optimize(parent.cfg, methods=["int8_dynamic", "int8_static"], tolerance=0.01, latency_repeats=5)
    return run_optimize(cfg, "production")


def test_dynamic_int8_is_within_one_point_smaller_and_registered_as_a_variant(parent, int8_run):
    outcome = next(o for o in int8_run.outcomes if o.method == "int8_dynamic")
    assert outcome.version is not None, outcome.message
    assert outcome.decision.drop <= 0.01
    rows = {r.name: r for r in int8_run.report}
    assert rows["int8_dynamic"].size_bytes < rows["parent"].size_bytes
    registry = ModelRegistry(parent.cfg.storage.root)
    version, arrays = registry.load(MODEL, "int8_dynamic")  # alias = method; checksums verified
    assert version.version == outcome.version.version and version.version != parent.version.version
    assert (
        version.manifest["variant"]["method"] == "int8_dynamic" and version.manifest["variant"]["parent_version"] == 1
    )
    assert version.manifest["lineage"]["parent_weights_sha256"] == parent.version.manifest["files"][WEIGHTS]
    fs, path = storage.filesystem(storage.join(version.url, WEIGHTS))
    assert fs.size(path) == rows["int8_dynamic"].size_bytes
    parent_labels = predict_labels(parent.version.manifest, registry.load(MODEL, 1)[1], parent.val_x)
    assert (predict_labels(version.manifest, arrays, parent.val_x) == parent_labels).mean() >= 0.99


def test_report_has_every_row_as_markdown_and_csv(parent, int8_run):
    assert [r.name for r in int8_run.report] == ["parent", "int8_dynamic", "int8_static"]
    parent_row = int8_run.report[0]
    assert parent_row.parameters == sum(p.numel() for p in parent.model.parameters()) == parent_row.nonzero
    assert all(r.latency_ms_b1 > 0 and r.latency_ms_b32 > 0 for r in int8_run.report)
    markdown = storage.read_bytes(int8_run.report_urls["markdown"]).decode()
    assert markdown == int8_run.report_text and markdown.count("\n| ") == 4  # header + 3 rows
    rows = list(csv.DictReader(io.StringIO(storage.read_bytes(int8_run.report_urls["csv"]).decode())))
    assert [r["name"] for r in rows] == ["parent", "int8_dynamic", "int8_static"]
    assert int(rows[1]["parameters"]) == parent_row.parameters and float(rows[0]["accuracy_drop"]) == 0.0


def test_a_variant_outside_tolerance_is_rejected_and_not_registered(parent):
    registry = ModelRegistry(parent.cfg.storage.root)
    before = registry.versions(MODEL)
    cfg = with_optimize(parent.cfg, methods=["prune_unstructured"], tolerance=0.01, latency_repeats=2,
                        prune=PruneConfig(sparsity=0.97, finetune_epochs=0))
    result = run_optimize(cfg, "1")
    (outcome,) = result.outcomes
    assert outcome.version is None and not outcome.decision.accepted
    assert outcome.decision.drop > 0.01
    assert (
        f"missed the tolerance by {100 * (outcome.decision.drop - 0.01):.2f} points, not registered" in outcome.message
    )
    assert registry.versions(MODEL) == before and "prune_unstructured" not in registry.aliases(MODEL)
    (row,) = [r for r in result.report if r.name == "prune_unstructured"]
    assert row.status == "rejected" and row.version is None
    assert row.nonzero == pytest.approx(row.parameters - 0.97 * (64 * 64 + 64 * 32 + 32 * 10), abs=1)


def test_an_int8_version_cannot_be_compressed_again(parent, int8_run):
    cfg = with_optimize(parent.cfg, methods=["int8_dynamic"])
    with pytest.raises(ValueError, match="compress its float parent v1"):
        run_optimize(cfg, "int8_static")
