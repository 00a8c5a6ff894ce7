"""CPU latency of compressed variants against their parent, at batch 1 and 32.

Trains a digits parent in this process (full-batch Adam), registers it in a temporary registry, runs
`orchestrator.optimize.run_optimize` with the chosen methods (pruning fine-tunes and distillation on
an embedded local Ray), and prints each variant's latency ratio variant/parent. Latency is the
median of `--repeats` forward passes through `build_servable` (the serving code path) with one
intra-op thread, as a serving replica runs; the parent is measured in the same process.

    PYTHONPATH=. .venv/bin/python bench/optimize_latency.py                         # every method
    PYTHONPATH=. .venv/bin/python bench/optimize_latency.py --methods int8_dynamic int8_static --hidden 512 256

The tolerance is set to 1.0 so every variant is registered and measured, whatever its accuracy;
the accuracy drop is printed beside the ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile

import torch

from orchestrator.config import (
    OPTIMIZE_METHODS,
    DistillConfig,
    ModelConfig,
    OptimizeConfig,
    PipelineConfig,
    PruneConfig,
    ScalingConfig,
    StorageConfig,
    TrackingConfig,
    to_dict,
)
from orchestrator.flows import connected
from orchestrator.optimize.run import needs_ray, run_optimize
from orchestrator.registry import ModelRegistry, signature_for
from orchestrator.training.data import load_split, prepare_dataset
from orchestrator.training.models import build_model


def train_parent(cfg: PipelineConfig, steps: int) -> None:
    """Register v1: cfg.model trained on the digits train split in this process."""
    info = prepare_dataset(cfg.data, cfg.storage.root)
    x, y = load_split(info, "train")
    torch.manual_seed(0)
    model = build_model(cfg.model, info.input_shape, info.num_classes)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.005)
    inputs, targets = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(inputs), targets).backward()
        optimizer.step()
    ModelRegistry(cfg.storage.root).register(
        cfg.registry.model_name,
        {k: v.detach().numpy() for k, v in model.state_dict().items()},
        metrics={},
        config=to_dict(cfg),
        lineage={"data_digest": info.digest},
        signature=signature_for(info.input_shape, info.num_classes),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=list(OPTIMIZE_METHODS), choices=OPTIMIZE_METHODS)
    parser.add_argument("--model", default="mlp", choices=("mlp", "cnn"))
    parser.add_argument("--hidden", nargs="+", type=int, default=[128, 64], help="parent MLP widths (cnn: dense width)")
    parser.add_argument("--student", nargs="+", type=int, default=[32], help="distilled student's widths")
    parser.add_argument("--repeats", type=int, default=300, help="timed forward passes per batch size")
    parser.add_argument("--steps", type=int, default=300, help="full-batch training steps of the parent")
    args = parser.parse_args()

    torch.set_num_threads(1)
    root = tempfile.mkdtemp(prefix="optimize-latency-")
    cfg = PipelineConfig(
        model=ModelConfig(name=args.model, hidden=args.hidden),
        storage=StorageConfig(root=root),
        tracking=TrackingConfig(enabled=False),
        scaling=ScalingConfig(num_workers=2, cpus_per_worker=0.5),
        optimize=OptimizeConfig(
            methods=args.methods,
            tolerance=1.0,
            latency_repeats=args.repeats,
            prune=PruneConfig(sparsity=0.5, finetune_epochs=2),
            distill=DistillConfig(student={"hidden": args.student}, epochs=15),
        ),
    )
    train_parent(cfg, args.steps)
    with connected(cfg) if needs_ray(cfg.optimize) else contextlib.nullcontext():
        result = run_optimize(cfg, "1")
    print(result.report_text)
    parent = result.report[0]
    ratios = {
        row.name: {
            "b1": round(row.latency_ms_b1 / parent.latency_ms_b1, 3),
            "b32": round(row.latency_ms_b32 / parent.latency_ms_b32, 3),
            "size": round(row.size_bytes / parent.size_bytes, 3),
            "drop_points": round(100 * row.accuracy_drop, 2),
        }
        for row in result.report[1:]
    }
    print(json.dumps({
        "model": args.model, "hidden": args.hidden, "repeats": args.repeats,
        "parent_ms": {"b1": round(parent.latency_ms_b1, 4), "b32": round(parent.latency_ms_b32, 4)},
        "ratios_variant_over_parent": ratios, "loadavg": os.getloadavg()[0],
    }))


if __name__ == "__main__":
    main()
