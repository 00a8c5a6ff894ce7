"""The teacher's outputs for distillation, computed once with Ray Data and shared by every worker.

The training split gains a "teacher" column (the parent's logits) in one Ray Data pass that is
materialized into the object store; Ray Train workers then read rows and teacher logits together,
and no worker ever runs the teacher. The teacher's weights reach the Ray Data tasks as one
object-store copy, and it runs through `build_servable`: the same model that serves the parent.
"""

from __future__ import annotations

from typing import Any, Dict

import numpy as np

from orchestrator.training.data import DatasetInfo, ray_datasets

_TEACHERS: Dict[str, Any] = {}
"""Teacher models built in this worker process, by weights ref: a task process builds it once."""


def _teacher(manifest: Dict[str, Any], weights: Dict[str, Any]):
    import ray

    from orchestrator.registry.servable import build_servable

    key = weights["ref"].hex()
    if key not in _TEACHERS:
        _TEACHERS[key] = build_servable(manifest, ray.get(weights["ref"]))
    return _TEACHERS[key]


def _add_teacher_logits(
    batch: Dict[str, np.ndarray], manifest: Dict[str, Any], weights: Dict[str, Any]
) -> Dict[str, np.ndarray]:
    import torch

    forward = _teacher(manifest, weights)
    with torch.inference_mode():
        logits = forward(torch.from_numpy(np.ascontiguousarray(batch["x"])))
    return {**batch, "teacher": logits.numpy().astype(np.float32)}


def teacher_datasets(info: DatasetInfo, manifest: Dict[str, Any], arrays: Dict[str, np.ndarray]) -> Dict[str, Any]:
    """Ray datasets {'train': x, y, teacher logits; 'val': x, y} of `info`, the teacher being the
    model of registry `manifest` on `arrays`. Materialized: the teacher ran exactly once per row."""
    import ray

    datasets = ray_datasets(info)
    weights = {"ref": ray.put(arrays)}  # in a dict so each task gets the ref, not a copy of the arrays
    train = datasets["train"].map_batches(
        _add_teacher_logits,
        fn_kwargs={"manifest": manifest, "weights": weights},
        batch_format="numpy",
        batch_size=1024,
    )
    return {"train": train.materialize(), "val": datasets["val"]}
