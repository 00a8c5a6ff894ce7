"""How a registry version becomes a callable model inside a serving replica.

One place decides this for every serving path, so that variants (a quantized model, say) plug in
without the deployments knowing: `build_servable(manifest, arrays)` returns a function from a
float32 batch to logits.

The default path builds the recorded architecture on the meta device and runs it with
`torch.func.functional_call` on the arrays as they are: read-only, zero-copy views of the one
object-store copy that every replica on a node shares. bf16 weights arrive as uint16 carriers and
are viewed back as bf16 (`orchestrator.registry.tensors`); such a model computes in bf16 and still
takes and returns float32.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Mapping

import numpy as np
import torch

from orchestrator.config import to_config
from orchestrator.registry.store import weights_dtypes
from orchestrator.registry.tensors import torch_tensors
from orchestrator.training.models import build_model

Servable = Callable[[torch.Tensor], torch.Tensor]
"""A batch [n, *input_shape] or [n, features] of float32 -> logits [n, classes]."""


def build_servable(manifest: Dict[str, Any], arrays: Dict[str, np.ndarray]) -> Servable:
    """The model of a registry `manifest` running on `arrays` (its weights).

    Raises ValueError when the arrays do not fit the recorded architecture, or when the manifest
    names a variant this build cannot serve.
    """
    variant = manifest.get("variant") or {}
    method = variant.get("method")
    if method is None or method in FLOAT_WEIGHT_VARIANTS:
        return _shared_weights_model(manifest, arrays)
    if method in INT8_VARIANTS:
        return _int8_model(manifest, arrays)
    raise ValueError(
        f"registry version {manifest.get('version')} is a {method!r} variant, which this build cannot serve"
    )


FLOAT_WEIGHT_VARIANTS: tuple = ("prune_unstructured", "prune_structured", "distill")
"""Variant methods whose weights are plain float tensors of the recorded architecture
(pruned weights hold zeros; a distilled student's manifest records the student's architecture)."""

INT8_VARIANTS: tuple = ("int8_dynamic", "int8_static")
"""Variant methods stored as int8 arrays with scales and zero points (orchestrator.optimize.quantize)."""


def _int8_model(manifest: Dict[str, Any], arrays: Dict[str, np.ndarray]) -> Servable:
    # Imported here: only replicas of an int8 variant need torch.ao quantization. The quantized
    # module repacks the int8 arrays into its own kernels' layout (a private int8 copy per replica).
    from orchestrator.optimize.quantize import int8_model

    return int8_model(manifest, arrays)


def meta_model(manifest: Dict[str, Any]) -> torch.nn.Module:
    """The recorded architecture, on the meta device (allocates no weights), in eval mode."""
    signature = manifest["signature"]
    with torch.device("meta"):
        model = build_model(to_config(manifest["config"]).model, signature["input_shape"], signature["num_classes"])
    return model.eval()


def _shared_weights_model(manifest: Dict[str, Any], arrays: Dict[str, np.ndarray]) -> Servable:
    model = meta_model(manifest)
    params = shared_tensors(arrays, model, weights_dtypes(manifest))
    compute = next((params[name].dtype for name, _ in model.named_parameters()), torch.float32)

    def forward(x: torch.Tensor) -> torch.Tensor:
        if compute == torch.float32:
            return torch.func.functional_call(model, params, (x,), tie_weights=False)
        inputs = x.to(compute) if x.is_floating_point() else x  # token ids stay integers
        return torch.func.functional_call(model, params, (inputs,), tie_weights=False).float()

    return forward


def shared_tensors(
    arrays: Dict[str, np.ndarray], model: torch.nn.Module, dtypes: Mapping[str, str]
) -> Dict[str, torch.Tensor]:
    """Tensors viewing `arrays` (no copy) as their real `dtypes` (a manifest's `weights_dtypes`),
    checked against `model`'s state dict names."""
    expected = set(model.state_dict())
    if set(arrays) != expected:
        raise ValueError(
            f"registry weights do not fit the model: missing {sorted(expected - set(arrays))}, "
            f"unexpected {sorted(set(arrays) - expected)}"
        )
    return torch_tensors(arrays, dtypes)
