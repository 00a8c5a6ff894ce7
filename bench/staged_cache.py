"""Layer-wise training with and without frozen-prefix caching, and against end-to-end at equal accuracy.

Three real Ray Train runs on digits, same model, data split, seed, plan and epoch budget:

    layerwise, cache on      the frozen prefix computed once per phase
    layerwise, cache off     the frozen prefix recomputed every step (same loss curve, more compute)
    end_to_end               every stage trained every epoch

Prints each run's training compute (estimated GFLOPs, stage-sample passes), seconds in epochs and
the fit's wall time, then the ratios cache-off/cache-on and, at equal accuracy, end-to-end/layer-wise:
the compute end-to-end spent until its val accuracy first reached the layer-wise run's best.

    .venv/bin/python bench/staged_cache.py [--epochs 12] [--hidden 256 256 128] [--workers 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orchestrator.config import (  # noqa: E402
    ModelConfig,
    PipelineConfig,
    ScalingConfig,
    ScheduleConfig,
    ScheduleKind,
    StorageConfig,
    TrackingConfig,
    TrainConfig,
)
from orchestrator.flows import connected  # noqa: E402
from orchestrator.training.data import prepare_dataset, ray_datasets  # noqa: E402
from orchestrator.training.loop import run_train  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--hidden", type=int, nargs="+", default=[256, 256, 128])
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    root = f"file://{tempfile.mkdtemp(prefix='staged-cache-')}"

    def cfg(kind: ScheduleKind, cache: bool) -> PipelineConfig:
        return PipelineConfig(
            model=ModelConfig(hidden=args.hidden), train=TrainConfig(epochs=args.epochs),
            schedule=ScheduleConfig(kind=kind, cache_frozen=cache), scaling=ScalingConfig(num_workers=args.workers),
            storage=StorageConfig(root=root), tracking=TrackingConfig(enabled=False),
        )

    runs = {}
    with connected(cfg(ScheduleKind.end_to_end, True)):
        info = prepare_dataset(cfg(ScheduleKind.end_to_end, True).data, root)
        datasets = ray_datasets(info)
        for name, kind, cache in (
            ("layerwise+cache", ScheduleKind.layerwise, True),
            ("layerwise", ScheduleKind.layerwise, False),
            ("end_to_end", ScheduleKind.end_to_end, False),
        ):
            started = time.perf_counter()
            result = run_train(dataclasses.replace(cfg(kind, cache), run_name=name.replace('+', '-')), info, datasets)
            runs[name] = (result, time.perf_counter() - started)

    print(f"digits, MLP {args.hidden}, {args.epochs} epochs, {args.workers} DDP workers (gloo, CPU)")
    print(
        f"{'run':>16} {'best acc':>8} {'GFLOPs':>8} {'fwd passes':>11} {'bwd passes':>11} {'epochs s':>9} {'wall s':>7}"
    )
    for name, (result, wall) in runs.items():
        last = result.run_history[-1]
        epoch_s = sum(h["epoch_time_s"] for h in result.run_history)
        print(
            f"{name:>16} {result.metrics['val_accuracy']:8.4f} {last['train_gflops']:8.3f} "
            f"{last['forward_passes']:11d} {last['backward_passes']:11d} {epoch_s:9.2f} {wall:7.1f}"
        )

    cached, plain, e2e = (runs[k][0] for k in ("layerwise+cache", "layerwise", "end_to_end"))
    cost = lambda r, key: r.run_history[-1][key]  # noqa: E731
    epochs_s = lambda r, upto=None: sum(h["epoch_time_s"] for h in r.run_history[:upto])  # noqa: E731
    loss_diff = max(abs(a["train_loss"] - b["train_loss"]) for a, b in zip(cached.run_history, plain.run_history))
    print(
        f"\ncache off / cache on: GFLOPs {cost(plain, 'train_gflops') / cost(cached, 'train_gflops'):.2f}x, "
        f"forward passes {cost(plain, 'forward_passes') / cost(cached, 'forward_passes'):.2f}x, "
        f"seconds in epochs {epochs_s(plain) / epochs_s(cached):.2f}x "
        f"(loss curves equal: max |diff| {loss_diff:.1e})"
    )
    target = cached.metrics["val_accuracy"]
    reached = next((i for i, h in enumerate(e2e.run_history) if h["val_accuracy"] >= target), None)
    if reached is None:
        print(
            f"end_to_end never reached layer-wise's best val accuracy {target:.4f} "
            f"(its best: {e2e.metrics['val_accuracy']:.4f})"
        )
        return
    hit = e2e.run_history[reached]
    print(f"at equal accuracy ({target:.4f}, end_to_end epoch {hit['epoch']}): end_to_end / layerwise+cache "
          f"GFLOPs {hit['train_gflops'] / cost(cached, 'train_gflops'):.2f}x, "
          f"seconds in epochs {epochs_s(e2e, reached + 1) / epochs_s(cached):.2f}x")


if __name__ == "__main__":
    main()
