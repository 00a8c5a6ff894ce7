"""Driver and worker peak memory while training one epoch on 1x and 10x the corpus (the corpus repeated).

Each size runs the production path in its own child process, so no peak carries over from one size to the
other: `orchestrator.flows.connected` (a fresh embedded Ray), `prepare_dataset` (tokenized in Ray Data into
Parquet token blocks; `data.repeat=10` writes the training documents ten times) and `run_train` for one
epoch (`train.steps_per_epoch=0`: one full pass over the training blocks, streamed to 2 DDP workers).

  driver   the child's peak resident memory over its whole life (`ru_maxrss`: imports, Ray start,
           tokenization, training), and the peak of each phase from a 50 ms sampler of /proc/self/status.
  workers  `peak_rss_mb` of the run's last epoch: the largest `ru_maxrss` of any training worker process.

The goal is that the 10x run needs at most 1.2x the memory of the 1x run, for the driver and the workers.
The recipe is `experiment=code_lm` on the first `--max-files` standard-library files with a tiny GPT, so the
10x epoch takes a few minutes here.

    PYTHONPATH=. .venv/bin/python bench/data_scaling.py [--max-files 150] [--scale 10]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_throughput import REPO, compose_recipe  # noqa: E402

GOAL = 1.2
"""Largest allowed ratio of the 10x run's peak memory to the 1x run's."""


def tiny_recipe(root: str, repeat: int, max_files: int) -> List[str]:
    """Overrides of `experiment=code_lm` for one epoch of a tiny GPT on `max_files` files repeated `repeat` times."""
    return [
        "experiment=code_lm", f"storage.root=file://{root}", f"run_name=data-scaling-{repeat}x",
        f"data.max_files={max_files}", f"data.repeat={repeat}", "data.vocab_size=1024", "data.context=64",
        "model.width=64", "model.layers=2", "model.heads=2", "model.context=64",
        "train.epochs=1", "train.steps_per_epoch=0", "train.warmup_steps=10", "train.val_batches=8",
        "train.max_failures=0", "tracking.enabled=false",
    ]


class RssSampler:
    """Samples this process's resident memory (VmRSS) in a thread; `peak_since_mark()` is the largest since
    the last call."""

    def __init__(self, every_s: float = 0.05) -> None:
        self.every_s, self._peak, self._stop = every_s, 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def rss_mb() -> float:
        with open("/proc/self/status") as f:
            line = next(line for line in f if line.startswith("VmRSS:"))
        return int(line.split()[1]) / 1024.0  # kB

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self._peak = max(self._peak, self.rss_mb())

    def peak_since_mark(self) -> float:
        peak, self._peak = max(self._peak, self.rss_mb()), 0.0
        return round(peak, 1)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def one_size(args: argparse.Namespace) -> Dict[str, Any]:
    """Prepare and train one epoch at `args.repeat` times the corpus, in this process; what it measured."""
    cfg = compose_recipe(tiny_recipe(args.root, args.repeat, args.max_files))
    from orchestrator.flows import connected
    from orchestrator.training.data import prepare_dataset
    from orchestrator.training.loop import run_train

    sampler = RssSampler()
    marks: Dict[str, float] = {}
    with connected(cfg):
        marks["imports + ray.init"] = sampler.peak_since_mark()
        started = time.perf_counter()
        info = prepare_dataset(cfg.data, cfg.storage.root)
        prepare_s = time.perf_counter() - started
        marks["prepare_dataset"] = sampler.peak_since_mark()
        started = time.perf_counter()
        result = run_train(cfg, info)
        train_s = time.perf_counter() - started
        marks["run_train"] = sampler.peak_since_mark()
    sampler.stop()
    last = result.run_history[-1]
    return {
        "repeat": args.repeat, "train_blocks": info.num_train, "train_tokens": last["train_tokens"],
        "train_bytes": info.split_bytes["train"], "steps": last["steps"], "epoch_s": round(last["epoch_time_s"], 1),
        "tokens_per_s": round(last["tokens_per_s"]), "prepare_s": round(prepare_s, 1), "train_s": round(train_s, 1),
        "driver_peak_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1),
        "driver_phase_peak_mb": marks, "worker_peak_mb": round(last["peak_rss_mb"], 1),
        "val_bits_per_byte": round(last["val_bits_per_byte"], 4), "precision": str(cfg.train.precision),
        "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_", ""),
    }


def launch(repeat: int, args: argparse.Namespace) -> Dict[str, Any]:
    """`one_size` at `repeat` in a fresh Python process."""
    out = os.path.join(args.root, f"scaling-{repeat}x.json")
    command = [sys.executable, str(Path(__file__).resolve()), "--role", "run", "--repeat", str(repeat),
               "--max-files", str(args.max_files), "--root", args.root, "--out", out]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    subprocess.run(command, check=True, env=env)
    with open(out) as f:
        return json.load(f)


def _phase_peak(phase: str) -> Callable[[Dict[str, Any]], float]:
    return lambda run: run["driver_phase_peak_mb"][phase]


def print_report(small: Dict[str, Any], large: Dict[str, Any], scale: int) -> Dict[str, Any]:
    """The two runs side by side (markdown) and the memory ratios; returns the ratios."""
    rows: List[Tuple[str, Callable[[Dict[str, Any]], float]]] = [
        ("train text (MB)", lambda r: r["train_bytes"] / 1e6), ("train blocks", lambda r: r["train_blocks"]),
        ("optimizer steps", lambda r: r["steps"]), ("tokenization (s)", lambda r: r["prepare_s"]),
        ("epoch (s)", lambda r: r["epoch_s"]), ("tokens/s", lambda r: r["tokens_per_s"]),
        ("driver peak RSS (MiB)", lambda r: r["driver_peak_mb"]),
    ]
    rows += [(f"driver peak, {phase} (MiB)", _phase_peak(phase)) for phase in small["driver_phase_peak_mb"]]
    rows.append(("worker peak RSS (MiB)", lambda r: r["worker_peak_mb"]))
    print(f"\n| | 1x | {scale}x | {scale}x / 1x |\n|---|---|---|---|")
    for name, value in rows:
        a, b = value(small), value(large)
        print(f"| {name} | {a:,.1f} | {b:,.1f} | {b / a if a else float('nan'):.2f} |")
    ratios = {"driver_ratio": round(large["driver_peak_mb"] / small["driver_peak_mb"], 3),
              "worker_ratio": round(large["worker_peak_mb"] / small["worker_peak_mb"], 3)}
    verdict = {k: "ok" if v <= GOAL else f"over {GOAL}" for k, v in ratios.items()}
    print(f"\ndriver {ratios['driver_ratio']:.3f} ({verdict['driver_ratio']}), "
          f"workers {ratios['worker_ratio']:.3f} ({verdict['worker_ratio']}); goal <= {GOAL}")
    return ratios


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-files", type=int, default=150, help="standard-library files of the 1x corpus")
    parser.add_argument("--scale", type=int, default=10, help="the larger corpus is this many repeats")
    parser.add_argument("--root", default=None, help="storage root (default: a temporary folder, removed after)")
    parser.add_argument("--role", choices=["run"], default=None, help=argparse.SUPPRESS)
    parser.add_argument("--repeat", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.role:
        with open(args.out, "w") as f:
            json.dump(one_size(args), f)
        return
    temporary = args.root is None
    args.root = args.root or tempfile.mkdtemp(prefix="data-scaling-")
    load_at_start = round(os.getloadavg()[0], 2)
    try:
        small, large = launch(1, args), launch(args.scale, args)
    finally:
        if temporary:
            shutil.rmtree(args.root, ignore_errors=True)
    ratios = print_report(small, large, args.scale)
    print(json.dumps({**ratios, "scale": args.scale, "max_files": args.max_files, "small": small, "large": large,
                      "load_avg_1m_start": load_at_start, "load_avg_1m_end": round(os.getloadavg()[0], 2)}))


if __name__ == "__main__":
    main()
