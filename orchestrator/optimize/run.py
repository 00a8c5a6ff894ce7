"""run_optimize: make each configured variant of a registry version, gate it, register it, report."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from orchestrator.config import OptimizeConfig, PipelineConfig, to_config
from orchestrator.optimize.gate import AccuracyGate, GateDecision, accuracy
from orchestrator.optimize.methods import Candidate, CompressionMethod, Parent, make_methods
from orchestrator.optimize.report import VariantReport, measure, write_report
from orchestrator.registry.servable import INT8_VARIANTS
from orchestrator.registry.store import ModelRegistry, ModelVersion, registry_for
from orchestrator.training.data import load_split, prepare_dataset

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class VariantOutcome:
    """What became of one method's variant."""

    method: str
    decision: GateDecision
    message: str
    """The gate's verdict in words (how much it kept or missed the tolerance by)."""
    version: Optional[ModelVersion] = None
    """The registered variant; None when the gate rejected it."""


@dataclass(kw_only=True)
class OptimizeResult:
    parent: ModelVersion
    outcomes: List[VariantOutcome] = field(default_factory=list)
    report: List[VariantReport] = field(default_factory=list)
    """Rows: the parent first, then each variant in method order."""
    report_urls: Dict[str, str] = field(default_factory=dict)
    """'markdown' and 'csv' files under the storage root."""
    report_text: str = ""
    """The Markdown table, as printed."""

    @property
    def registered(self) -> List[ModelVersion]:
        return [o.version for o in self.outcomes if o.version is not None]

    def summary(self) -> Dict[str, Any]:
        """The job's final JSON line."""
        return {
            "model": self.parent.model,
            "parent_version": self.parent.version,
            "variants": {
                o.method: {
                    "registered": o.version is not None,
                    "version": o.version.version if o.version else None,
                    "test_accuracy": round(o.decision.accuracy, 4),
                    "drop": round(o.decision.drop, 4),
                }
                for o in self.outcomes
            },
            "report": self.report_urls.get("markdown"),
        }


def needs_ray(opt: OptimizeConfig) -> bool:
    """Whether `opt.methods` need a connected Ray (Ray Train fine-tunes, Ray Data teacher outputs)."""
    return any(method.needs_ray for method in make_methods(opt))


def run_optimize(cfg: PipelineConfig, ref: Optional[str] = None) -> OptimizeResult:
    """Compress version `ref` (default `cfg.optimize.source`) of `cfg.registry.model_name` with every
    method in `cfg.optimize.methods`; register each variant within `cfg.optimize.tolerance`.

    The gate compares parent and variant on the parent's test split. Connect Ray first when
    `needs_ray(cfg.optimize)`. Raises RegistryError for an unknown ref,
    ValueError when the parent is itself an int8 variant (there is no float model to compress) or holds
    bf16 weights (the methods compress float32 models).
    """
    registry = registry_for(cfg)  # variants are encrypted like any version when registry.encryption is on
    parent = load_parent(cfg, registry, ref or cfg.optimize.source)
    features, labels = load_split(parent.info, "test")
    parent_accuracy = accuracy(parent.version.manifest, parent.arrays, features, labels)
    gate = AccuracyGate(cfg.optimize.tolerance)
    repeats = cfg.optimize.latency_repeats
    result = OptimizeResult(parent=parent.version)
    result.report.append(
        measure(
            parent.version.manifest,
            parent.arrays,
            features,
            name="parent",
            status="parent",
            version=parent.version.version,
            test_accuracy=parent_accuracy,
            parent_accuracy=parent_accuracy,
            repeats=repeats,
        )
    )
    for method in make_methods(cfg.optimize):
        outcome, row = _one_variant(cfg, registry, parent, method, gate, parent_accuracy, features, labels)
        result.outcomes.append(outcome)
        result.report.append(row)
    run_id = f"{parent.version.model}-v{parent.version.version}-{time.strftime('%Y%m%d-%H%M%S')}"
    tolerance = f"tolerance {100 * cfg.optimize.tolerance:.2f} points"
    title = f"optimize {parent.version.model} v{parent.version.version} ({tolerance})"
    written = write_report(cfg.storage.root, run_id, result.report, title)
    result.report_text = written.pop("text")
    result.report_urls = written
    return result


def load_parent(cfg: PipelineConfig, registry: ModelRegistry, ref: str) -> Parent:
    """The float version `ref`, its recorded config and its dataset (prepared under this storage root)."""
    version, arrays = registry.load(cfg.registry.model_name, ref)
    method = (version.manifest.get("variant") or {}).get("method")
    if method in INT8_VARIANTS:
        raise ValueError(f"{version.model} v{version.version} is an {method} variant: compress its float parent "
                         f"v{version.manifest['variant']['parent_version']} instead")
    if version.weights_dtypes:
        raise ValueError(f"{version.model} v{version.version} holds {sorted(set(version.weights_dtypes.values()))} "
                         "weights: compression methods take float32 parents")
    parent_cfg = to_config(version.manifest["config"])
    info = prepare_dataset(parent_cfg.data, cfg.storage.root)
    recorded = version.manifest.get("lineage", {}).get("data_digest")
    if recorded and recorded != info.digest:
        raise ValueError(
            f"{version.model} v{version.version} was trained on data {recorded[:12]} but its data config now "
            f"gives {info.digest[:12]}: the gate would compare on different rows"
        )
    return Parent(version=version, arrays=arrays, cfg=parent_cfg, info=info)


def _one_variant(
    cfg,
    registry,
    parent: Parent,
    method: CompressionMethod,
    gate: AccuracyGate,
    parent_accuracy: float,
    features,
    labels,
):
    """Make, gate, (register) and measure one variant; (outcome, report row)."""
    started = time.perf_counter()
    candidate = method.make(parent, cfg)
    manifest = candidate.manifest(parent)
    decision = gate.decide(parent_accuracy, accuracy(manifest, candidate.arrays, features, labels))
    message = decision.message(f"{parent.version.model} v{parent.version.version} {method.name}")
    version = _register(cfg, registry, parent, candidate, manifest, decision) if decision.accepted else None
    (log.info if decision.accepted else log.warning)("%s (%.1f s)", message, time.perf_counter() - started)
    if version is not None:
        manifest = version.manifest
    row = measure(
        manifest,
        candidate.arrays,
        features,
        name=method.name,
        status="registered" if version else "rejected",
        version=version.version if version else None,
        test_accuracy=decision.accuracy,
        parent_accuracy=parent_accuracy,
        repeats=cfg.optimize.latency_repeats,
    )
    return VariantOutcome(method=method.name, decision=decision, message=message, version=version), row


def _register(
    cfg, registry: ModelRegistry, parent: Parent, candidate: Candidate, manifest: Dict[str, Any],
    decision: GateDecision,
) -> ModelVersion:
    model = parent.version.model
    version = registry.register(
        model,
        candidate.arrays,
        metrics={
            "val_accuracy": accuracy(manifest, candidate.arrays, *load_split(parent.info, "val")),
            "test_accuracy": decision.accuracy,
            "parent_test_accuracy": decision.parent_accuracy,
            "accuracy_drop": decision.drop,
        },
        config=candidate.config,
        lineage={
            "kind": "optimize",
            "method": candidate.method,
            "parent_version": parent.version.version,
            "parent_weights_sha256": parent.version.weights_sha256,
            "data_digest": parent.info.digest,
            "data_url": parent.info.url,
            **candidate.lineage,
        },
        signature=parent.version.signature,
        variant={**candidate.variant(parent), "tolerance": decision.tolerance},
    )
    if cfg.optimize.set_aliases:
        registry.set_alias(model, candidate.method, version.version)
    return version


def print_report(result: OptimizeResult) -> None:
    """The gate's verdicts and the report table, on stdout."""
    for outcome in result.outcomes:
        print(outcome.message)
    print()
    print(result.report_text)
    print(f"report: {result.report_urls.get('markdown')} and {result.report_urls.get('csv')}", flush=True)

