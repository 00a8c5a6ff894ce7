"""One small class per compression method; `make_method(name, cfg.optimize)` picks it by name.

A method turns the parent (a float registry version) into a `Candidate`: the arrays and manifest
parts a registry version needs. Gating and registering are the caller's job (orchestrator.optimize.run).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List

import numpy as np
import torch
from torch import nn

from orchestrator.config import OptimizeConfig, PipelineConfig, to_config, to_dict
from orchestrator.registry.store import ModelVersion
from orchestrator.training.data import DatasetInfo, load_split
from orchestrator.training.models import build_model


@dataclass(frozen=True, kw_only=True)
class Parent:
    """The version being compressed and what the methods need of it."""

    version: ModelVersion
    arrays: Dict[str, np.ndarray]
    cfg: PipelineConfig
    """The configuration it was trained with (from its manifest)."""
    info: DatasetInfo
    """Its dataset, prepared again under this run's storage root."""

    def float_model(self) -> nn.Module:
        """The parent as a float module on the CPU, in eval mode."""
        signature = self.version.signature
        model = build_model(self.cfg.model, signature["input_shape"], signature["num_classes"])
        model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in self.arrays.items()})
        return model.eval()


@dataclass(frozen=True, kw_only=True)
class Candidate:
    """A variant before the gate: what `ModelRegistry.register` will store."""

    method: str
    arrays: Dict[str, np.ndarray]
    config: Dict[str, Any]
    """Config recorded in the manifest: its `model` is the variant's architecture."""
    params: Dict[str, Any] = field(default_factory=dict)
    """Method settings, recorded in the manifest's "variant" (servable reads e.g. the int8 backend)."""
    lineage: Dict[str, Any] = field(default_factory=dict)
    """Extra lineage (e.g. the fine-tune run)."""

    def variant(self, parent: Parent) -> Dict[str, Any]:
        return {"method": self.method, "parent_version": parent.version.version, **self.params}

    def manifest(self, parent: Parent) -> Dict[str, Any]:
        """The manifest fields `build_servable` reads, so the gate evaluates exactly what will be served."""
        return {
            "version": None,
            "config": self.config,
            "signature": parent.version.signature,
            "variant": self.variant(parent),
        }


class CompressionMethod:
    """Makes one kind of variant. `needs_ray`: whether `make` runs Ray Train or Ray Data."""

    name: str = ""
    needs_ray: bool = False

    def make(self, parent: Parent, cfg: PipelineConfig) -> Candidate:
        raise NotImplementedError


class Int8Quantization(CompressionMethod):
    """int8_dynamic or int8_static (orchestrator.optimize.quantize)."""

    def __init__(self, name: str, opt: OptimizeConfig):
        self.name, self.cfg = name, opt.quantize

    def make(self, parent: Parent, cfg: PipelineConfig) -> Candidate:
        from orchestrator.optimize.quantize import int8_arrays, quantize

        calibration = None
        params: Dict[str, Any] = {"backend": self.cfg.backend}
        if self.name == "int8_static":
            calibration = torch.from_numpy(
                calibration_rows(parent.info, self.cfg.calibration_rows, seed=cfg.train.seed)
            )
            params["calibration_rows"] = len(calibration)
        qmodel = quantize(parent.float_model(), self.name, self.cfg.backend, calibration)
        return Candidate(
            method=self.name, arrays=int8_arrays(qmodel), config=parent.version.manifest["config"], params=params
        )


def calibration_rows(info: DatasetInfo, count: int, seed: int) -> np.ndarray:
    """Up to `count` training rows, drawn without replacement (never val or test rows: selection and the gate
    measure on those)."""
    features, _ = load_split(info, "train")
    pick = np.random.default_rng(seed).permutation(len(features))[:count]
    return features[np.sort(pick)]


class L1Pruning(CompressionMethod):
    """prune_unstructured or prune_structured, then a fine-tune on Ray Train with the masks held."""

    def __init__(self, name: str, opt: OptimizeConfig):
        self.name, self.cfg = name, opt.prune
        self.needs_ray = self.cfg.finetune_epochs > 0

    def make(self, parent: Parent, cfg: PipelineConfig) -> Candidate:
        from orchestrator.optimize.prune import apply_masks, l1_masks, sparsity_of, unit_sparsity

        structured = self.name == "prune_structured"
        masks = l1_masks(parent.float_model(), self.cfg.sparsity, structured=structured)
        arrays = apply_masks(parent.arrays, masks)
        config, lineage = parent.version.manifest["config"], {}
        if self.cfg.finetune_epochs > 0:
            run_cfg = finetune_config(cfg, parent, parent.cfg.model, epochs=self.cfg.finetune_epochs, lr=self.cfg.lr)
            arrays, lineage = _fit(run_cfg, parent, self.name, weights=arrays, masks=masks)
            config = to_dict(run_cfg)
        measured = unit_sparsity(arrays, masks) if structured else sparsity_of(arrays, masks)
        params = {"sparsity": self.cfg.sparsity, "measured_sparsity": measured, "structured": structured,
                  "finetune_epochs": self.cfg.finetune_epochs}
        return Candidate(method=self.name, arrays=arrays, config=config, params=params, lineage=lineage)


class Distillation(CompressionMethod):
    """A smaller student (parent's model + `optimize.distill.student`) trained on Ray Train against the
    parent's logits, computed once with Ray Data (orchestrator.optimize.distill)."""

    needs_ray = True

    def __init__(self, name: str, opt: OptimizeConfig):
        self.name, self.cfg = name, opt.distill

    def make(self, parent: Parent, cfg: PipelineConfig) -> Candidate:
        from orchestrator.optimize.distill import teacher_datasets
        from orchestrator.optimize.finetune import DistillationLoss

        student = to_config(parent.cfg, {f"model.{key}": value for key, value in self.cfg.student.items()}).model
        run_cfg = finetune_config(cfg, parent, student, epochs=self.cfg.epochs, lr=self.cfg.lr)
        datasets = teacher_datasets(parent.info, parent.version.manifest, parent.arrays)
        loss = DistillationLoss(temperature=self.cfg.temperature, alpha=self.cfg.alpha)
        arrays, lineage = _fit(run_cfg, parent, self.name, loss=loss, datasets=datasets)
        params = {
            "temperature": self.cfg.temperature,
            "alpha": self.cfg.alpha,
            "epochs": self.cfg.epochs,
            "student": dict(self.cfg.student),
        }
        return Candidate(method=self.name, arrays=arrays, config=to_dict(run_cfg), params=params, lineage=lineage)


def finetune_config(cfg: PipelineConfig, parent: Parent, model, *, epochs: int, lr: float) -> PipelineConfig:
    """This run's config (workers, storage) training `model` on the parent's data with the parent's
    batch size and optimizer, for `epochs` at `lr`."""
    train = dataclasses.replace(parent.cfg.train, epochs=epochs, lr=lr)
    return dataclasses.replace(cfg, model=model, data=parent.cfg.data, train=train)


def _fit(run_cfg: PipelineConfig, parent: Parent, method: str, *, weights=None, masks=None, loss=None, datasets=None):
    """Run the compression loop on Ray Train; (weights of its best epoch, lineage of the run)."""
    import ray

    from orchestrator.optimize.finetune import FinetuneSpec, HardLabelLoss, run_finetune
    from orchestrator.training.loop import checkpoint_weights

    shared = {"ref": ray.put({"weights": weights, "masks": masks or {}})}
    spec = FinetuneSpec(loss=loss or HardLabelLoss(), shared=shared)
    result = run_finetune(run_cfg, parent.info, spec, method=method, datasets=datasets)
    arrays = checkpoint_weights(run_cfg.storage.root, result.checkpoint_path)
    return arrays, {
        "run": result.run_path,
        "checkpoint": result.checkpoint_path,
        "finetune_val_accuracy": result.metrics["val_accuracy"],
    }


_METHODS: Dict[str, Callable[[str, OptimizeConfig], CompressionMethod]] = {
    "int8_dynamic": Int8Quantization,
    "int8_static": Int8Quantization,
    "prune_unstructured": L1Pruning,
    "prune_structured": L1Pruning,
    "distill": Distillation,
}


def make_methods(opt: OptimizeConfig) -> List[CompressionMethod]:
    """The methods named in `opt.methods`, in order."""
    return [_METHODS[name](name, opt) for name in opt.methods]
