"""GPT training throughput on this CPU in fp32 against bf16 autocast, one thread, no Ray.

For each size (width/layers/heads) and precision: a training step loop (forward, cross-entropy on next
tokens, backward, AdamW step) on random token ids, timed after warm-up steps. Prints one row per run:
tokens/s (the best of several timed windows, fp32 and bf16 alternating so that other load on the
machine hits both alike), achieved model GFLOP/s (6N + 12·L·H·Q·T per token) and the bf16/fp32 speed
ratio per size. The code_lm recipe takes its precision and size from this table.

    .venv/bin/python bench/gpt_cpu_precision.py [--steps 5] [--repeats 3] [--warmup 2] [--threads 1]
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orchestrator.config import BuiltinModel, ModelConfig  # noqa: E402
from orchestrator.training.flops import gpt_flops_per_token  # noqa: E402
from orchestrator.training.gpt import GPT, parameter_count  # noqa: E402
from orchestrator.training.models import build_model  # noqa: E402

SIZES = [(128, 4, 4), (192, 6, 6)]
"""(width, layers, heads) of each GPT measured; head size 32 in both."""
PRECISIONS = ("fp32", "bf16")


def trainer(width: int, layers: int, heads: int, precision: str, args: argparse.Namespace) -> Tuple[GPT, Callable]:
    """A GPT and its training step (forward, next-token cross-entropy, backward, AdamW) in `precision`."""
    torch.manual_seed(0)
    cfg = ModelConfig(name=BuiltinModel.gpt, width=width, layers=layers, heads=heads, context=args.context)
    model = build_model(cfg, [args.context], args.vocab)
    assert isinstance(model, GPT)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, args.vocab, (args.batch, args.context + 1), generator=torch.Generator().manual_seed(0))
    inputs, targets = ids[:, :-1], ids[:, 1:]

    def step() -> None:
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
        with autocast:
            logits = model(inputs)
        loss = nn.functional.cross_entropy(logits.reshape(-1, args.vocab).float(), targets.reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return model, step


def timed(step: Callable, steps: int) -> float:
    started = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - started) / steps


def measure(width: int, layers: int, heads: int, args: argparse.Namespace) -> Dict[str, Dict[str, float]]:
    """Per precision: the best of `args.repeats` windows of `args.steps` steps, the precisions alternating so
    that load from other processes on the machine hits both alike."""
    runs = {p: trainer(width, layers, heads, p, args) for p in PRECISIONS}
    for _, step in runs.values():
        timed(step, args.warmup)
    best = {p: math.inf for p in PRECISIONS}
    for _ in range(args.repeats):
        for p in PRECISIONS:
            best[p] = min(best[p], timed(runs[p][1], args.steps))
    tokens = args.batch * args.context
    return {
        p: {
            "params_m": parameter_count(model) / 1e6,
            "tokens_per_s": tokens / best[p],
            "gflops_per_s": tokens / best[p] * gpt_flops_per_token(model) / 1e9,
            "step_s": best[p],
        }
        for p, (model, _) in runs.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=4096)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    print(f"batch {args.batch} x context {args.context}, vocab {args.vocab}, {args.threads} thread(s), "
          f"best of {args.repeats} windows of {args.steps} steps after {args.warmup} warm-up steps")
    print(f"{'width':>5} {'layers':>6} {'heads':>5} {'params':>8} {'precision':>9} {'tokens/s':>9} "
          f"{'GFLOP/s':>8} {'step s':>7}")
    rows: List[tuple] = []
    for width, layers, heads in SIZES:
        results = measure(width, layers, heads, args)
        for precision, r in results.items():
            print(f"{width:>5} {layers:>6} {heads:>5} {r['params_m']:>7.2f}M {precision:>9} "
                  f"{r['tokens_per_s']:>9.0f} {r['gflops_per_s']:>8.1f} {r['step_s']:>7.3f}")
        rows.append((width, layers, results["bf16"]["tokens_per_s"] / results["fp32"]["tokens_per_s"]))
    for width, layers, ratio in rows:
        print(f"width {width}, {layers} layers: bf16/fp32 tokens/s = {ratio:.2f}")


if __name__ == "__main__":
    main()
