"""What a job shows while it runs, printed by the driver on stdout as whole lines: a line per
trial-epoch and per finished trial (their text is made here; orchestrator.training.reports hears of
them), and how far data preparation has got (`Progress`: a bar on a terminal, periodic lines elsewhere).
Nothing here imports Ray, so data preparation and unit tests use it freely.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import sys
import threading
import time
from typing import Any, Callable, Dict, Iterable, Iterator, Optional, TextIO, TypeVar

T = TypeVar("T")

_lock = threading.Lock()


def say(line: str) -> None:
    """Print one whole line on stdout (Tune's callback and the run-event thread print at the same time)."""
    with _lock:
        print(line, flush=True)


def seconds(value: float) -> str:
    """12.3s, 4m05s, 1h02m: elapsed time, short."""
    if value < 60:
        return f"{value:.1f}s"
    minutes, secs = divmod(int(round(value)), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    return f"{minutes // 60}h{minutes % 60:02d}m"


def _number(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def epoch_line(label: str, metrics: Dict[str, Any], planned: int, shown: Iterable[str], elapsed: float) -> str:
    """`[label] epoch 2/3  train_loss 0.6267  val_accuracy 0.8802  12.4s`: one reported epoch."""
    values = "  ".join(f"{key} {_number(metrics[key])}" for key in ("train_loss", *shown) if key in metrics)
    return f"[{label}] epoch {metrics['epoch']}/{planned}  {values}  {seconds(elapsed)}"


def first_error_line(text: str) -> str:
    """The line of a traceback that names the exception (its last `pkg.Name: message` line), else its last line."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    named = [line for line in lines if _EXCEPTION_LINE.match(line)]
    return named[-1] if named else (lines[-1] if lines else text)


_EXCEPTION_LINE = re.compile(r"([a-z_][\w]*\.)*[A-Z]\w*(\([\w.]+\))?: ")
"""`ValueError: boom`, `ray.train.WorkerGroupError: ...`, `RayTaskError(WorkerGroupError): ...`."""


@dataclasses.dataclass
class RunTally:
    """What the driver has seen of one trial or run: epochs, the best value of the ranking metric, time."""

    started: float = dataclasses.field(default_factory=time.monotonic)
    epochs: int = 0
    best: Optional[float] = None
    best_epoch: int = 0
    elapsed: float = 0.0

    def add(self, metrics: Dict[str, Any], metric: str, mode: str) -> None:
        self.epochs = max(self.epochs, int(metrics["epoch"]))
        value = metrics.get(metric)
        if isinstance(value, (int, float)) and not math.isnan(value):
            if self.best is None or (value > self.best if mode == "max" else value < self.best):
                self.best, self.best_epoch = float(value), int(metrics["epoch"])

    def summary(self, metric: str, planned: int) -> str:
        best = f"best {metric} {self.best:.4f} (epoch {self.best_epoch})" if self.best is not None else f"no {metric}"
        return f"{self.epochs}/{planned} epochs, {best}, {seconds(self.elapsed)}"


class Progress:
    """Work counted towards `total`: a bar redrawn in place on a terminal, a line at most every `every_s`
    elsewhere (logs, pipes, `ray job logs`), and a final line from `done()`."""

    def __init__(self, label: str, total: int, unit: str = "", *, stream: Optional[TextIO] = None,
                 every_s: float = 5.0) -> None:
        self.label, self.total, self.unit = label, max(0, total), unit
        self.stream = stream or sys.stdout
        self.live = bool(getattr(self.stream, "isatty", lambda: False)())
        self.every_s = 0.1 if self.live else every_s
        self.count = 0
        self.started = self._shown = time.monotonic()

    def advance(self, n: int = 1) -> None:
        self.count += n
        if time.monotonic() - self._shown >= self.every_s:
            self._show(final=False)

    def set(self, count: int) -> None:
        if count != self.count:
            self.advance(count - self.count)

    def done(self, note: str = "") -> None:
        self.count = max(self.count, self.total) if self.total else self.count
        self._show(final=True, note=note)

    def _text(self, note: str = "") -> str:
        unit = f" {self.unit}" if self.unit else ""
        share = f" ({100 * self.count // self.total}%)" if self.total else ""
        of = f"/{self.total}" if self.total else ""
        bar = ""
        if self.live and self.total:
            filled = 24 * min(self.count, self.total) // self.total
            bar = f"[{'#' * filled}{'.' * (24 - filled)}] "
        text = f"{self.label}: {bar}{self.count}{of}{unit}{share}  {seconds(time.monotonic() - self.started)}"
        return f"{text}  {note}" if note else text

    def _show(self, *, final: bool, note: str = "") -> None:
        self._shown = time.monotonic()
        with _lock:
            if self.live:
                self.stream.write("\r\033[K" + self._text(note) + ("\n" if final else ""))
            else:
                self.stream.write(self._text(note) + "\n")
            self.stream.flush()


def counted(items: Iterable[T], label: str, total: int, unit: str = "") -> Iterator[T]:
    """`items`, unchanged, with a `Progress` of how many have gone by."""
    progress = Progress(label, total, unit)
    for item in items:
        yield item
        progress.advance()
    progress.done()


@contextlib.contextmanager
def polled(label: str, total: int, count: Callable[[], int], unit: str = "", every_s: float = 1.0) -> Iterator[None]:
    """A `Progress` of work the block hands to other processes: `count()` is asked every `every_s` how much
    is done (e.g. files written so far), from a thread, until the block ends."""
    progress = Progress(label, total, unit)
    stop = threading.Event()

    def poll() -> None:
        while not stop.wait(every_s):
            with contextlib.suppress(Exception):  # a listing that fails mid-write only skips an update
                progress.set(count())

    thread = threading.Thread(target=poll, name=f"progress-{label}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(every_s + 5)
    progress.done()
