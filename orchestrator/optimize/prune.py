"""L1 magnitude pruning masks (torch.nn.utils.prune), computed once on the driver.

  unstructured  one global L1 threshold over every Linear/Conv weight: exactly `sparsity` of all
                weight entries become zero, wherever they are smallest.
  structured    in every Linear/Conv but the head, the `sparsity` fraction of output units (rows) or
                channels with the smallest L1 norm are removed: their weights and bias become zero.
                The head keeps all its rows: each one is a class.

Masks are keyed by parameter name and applied again after every fine-tune step, so pruned
entries stay zero however the optimizer moves them.
"""

from __future__ import annotations

import copy
from typing import Dict, List, Tuple

import numpy as np
import torch
from torch import nn
from torch.nn.utils import prune


def weight_layers(model: nn.Module, *, include_head: bool) -> List[Tuple[str, nn.Module]]:
    """(name, module) of every Linear and Conv layer, optionally leaving out `model.head`'s."""
    head = getattr(model, "head", None)
    head_layers = {id(m) for m in head.modules()} if head is not None and not include_head else set()
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)) and id(m) not in head_layers
    ]


def l1_masks(model: nn.Module, sparsity: float, *, structured: bool) -> Dict[str, np.ndarray]:
    """Boolean keep-masks {parameter name: mask} for L1 pruning of `model` (left untouched)."""
    model = copy.deepcopy(model)
    layers = weight_layers(model, include_head=not structured)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no Linear/Conv layer to prune")
    if structured:
        for _, module in layers:
            prune.ln_structured(module, "weight", amount=sparsity, n=1, dim=0)
    else:
        prune.global_unstructured(
            [(m, "weight") for _, m in layers], pruning_method=prune.L1Unstructured, amount=sparsity
        )
    masks = {}
    for name, module in layers:
        weight_mask = module.weight_mask.detach().bool()  # type: ignore[operator]  # torch's prune adds it at runtime
        masks[f"{name}.weight"] = weight_mask.numpy()
        if structured and module.bias is not None:
            # A removed unit must output nothing: without its bias too it would still emit relu(bias).
            masks[f"{name}.bias"] = weight_mask.reshape(weight_mask.shape[0], -1).any(dim=1).numpy()
    return masks


def apply_masks(arrays: Dict[str, np.ndarray], masks: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """Copy of `arrays` with every masked-out entry set to zero."""
    return {
        name: np.where(masks[name], value, 0).astype(value.dtype) if name in masks else value
        for name, value in arrays.items()
    }


def sparsity_of(arrays: Dict[str, np.ndarray], masks: Dict[str, np.ndarray]) -> float:
    """Fraction of zeros among the entries of the masked (pruned) weight tensors."""
    weights = [arrays[name] for name in masks if name.endswith("weight")]
    return float(sum((w == 0).sum() for w in weights) / sum(w.size for w in weights))


def unit_sparsity(arrays: Dict[str, np.ndarray], masks: Dict[str, np.ndarray]) -> float:
    """Fraction of output units/channels whose weights are all zero, over the masked weight tensors."""
    rows = [arrays[name].reshape(arrays[name].shape[0], -1) for name in masks if name.endswith("weight")]
    return float(sum((~r.any(axis=1)).sum() for r in rows) / sum(r.shape[0] for r in rows))


def masked_in_place(params: Dict[str, torch.Tensor], masks: Dict[str, torch.Tensor]) -> None:
    """Zero the pruned entries of `params` again (after an optimizer step)."""
    with torch.no_grad():
        for name, mask in masks.items():
            params[name].mul_(mask)
