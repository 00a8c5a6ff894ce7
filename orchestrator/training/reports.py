"""How training reports reach the driver's progress lines (orchestrator.progress prints them).

A sweep's trials report to Tune, which runs in the driver: `TrialProgress`, a Tune callback, prints a
line when a trial starts, one per reported epoch and one when it ends. A Ray Train run's own callbacks
run in its Train controller, a process whose output the driver does not see while Ray's logs stay off
(`verbose=false`): there `RunEvents` puts the run's reports and its workers' exceptions on a queue actor
that `follow_runs`, a driver thread, prints from (the way Tune itself hears from Ray Train). A sweep
uses it too, for the worker failures a trial's Train run retries on its own.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import threading
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Set

from ray import tune
from ray.train import UserCallback

from orchestrator.progress import RunTally, epoch_line, first_error_line, say
from orchestrator.training.sweep import CHECKPOINT_PATH_KEY
from orchestrator.training.tasks import Task

log = logging.getLogger(__name__)


def shown_metrics(task: Task) -> List[str]:
    """The val metrics a progress line shows beside train_loss: the task's headline ones."""
    return [f"val_{name}" for name in task.headline]


class TrialProgress(tune.Callback):
    """Prints a sweep as it runs: a trial's start (its sampled values), each reported epoch, and its end
    (completed, stopped early by the scheduler, or failed with its exception; the traceback itself is in
    Tune's error log and the trial's error.txt).

    Epoch lines carry train_loss and `task`'s headline val metrics; metric/mode: what trials are ranked by
    (tune.metric, tune.mode); planned: a trial's epoch budget from its config; sampled: that config as
    dotted overrides.
    """

    def __init__(self, task: Task, *, metric: str, mode: str, planned: Callable[[Dict[str, Any]], int],
                 sampled: Callable[[Dict[str, Any]], Dict[str, Any]], runs: Optional[RunFollower] = None) -> None:
        self.metric, self.mode, self.shown = metric, mode, shown_metrics(task)
        self.planned, self.sampled, self.runs = planned, sampled, runs
        self._tallies: Dict[str, RunTally] = {}
        self._planned: Dict[str, int] = {}

    def __getstate__(self) -> Dict[str, Any]:
        # Tune pickles its callbacks into the experiment's state, and a restored sweep (resume=true) unpickles
        # them after the queue actor of `runs` is gone with its driver: leave `runs` out.
        return {**self.__dict__, "runs": None}

    def _epochs(self, trial: Any) -> int:
        if trial.trial_id not in self._planned:  # building a trial's config for every report would cost more
            self._planned[trial.trial_id] = self.planned(trial.config)
        return self._planned[trial.trial_id]

    def _tally(self, trial: Any) -> RunTally:
        return self._tallies.setdefault(trial.trial_id, RunTally())

    def on_trial_start(self, iteration: int, trials: List[Any], trial: Any, **info: Any) -> None:
        self._tally(trial)
        values = "  ".join(f"{k}={v}" for k, v in self.sampled(trial.config).items())
        say(f"[trial {trial.trial_id}] started  {values}".rstrip())

    def on_trial_result(self, iteration: int, trials: List[Any], trial: Any, result: Dict[str, Any],
                        **info: Any) -> None:
        if "epoch" not in result:
            return
        tally = self._tally(trial)
        tally.add(result, self.metric, self.mode)
        tally.elapsed = float(result.get("time_total_s", time.monotonic() - tally.started))
        say(epoch_line(f"trial {trial.trial_id}", result, self._epochs(trial), self.shown, tally.elapsed))

    def _close(self, trial: Any) -> None:
        if self.runs is not None:  # the failures its Train run sent first; none after its end line
            self.runs.close(f"trial {trial.trial_id}")

    def on_trial_complete(self, iteration: int, trials: List[Any], trial: Any, **info: Any) -> None:
        self._close(trial)
        tally, planned = self._tally(trial), self._epochs(trial)
        how = "completed" if tally.epochs >= planned else "stopped early"
        say(f"[trial {trial.trial_id}] {how}: {tally.summary(self.metric, planned)}")

    def on_trial_recover(self, iteration: int, trials: List[Any], trial: Any, **info: Any) -> None:
        say(f"[trial {trial.trial_id}] failed, retrying from its newest checkpoint: {_trial_error(trial)}")

    def on_trial_error(self, iteration: int, trials: List[Any], trial: Any, **info: Any) -> None:
        self._close(trial)
        tally, planned = self._tally(trial), self._epochs(trial)
        where = f" (traceback: {trial.error_file})" if trial.error_file else ""
        say(f"[trial {trial.trial_id}] failed after {tally.summary(self.metric, planned)}: "
            f"{_trial_error(trial)}{where}")


def _trial_error(trial: Any) -> str:
    """The exception line of the trial's latest failure, from the error.txt Tune writes in the driver."""
    try:
        with open(trial.error_file, encoding="utf-8", errors="replace") as f:
            return first_error_line(f.read().rsplit("Failure #", 1)[-1])
    except (OSError, TypeError):
        return "see Tune's error log above"


class TrialReports(UserCallback):
    """In the trial's Train controller: each report of rank 0 (with the path of its checkpoint, already on
    storage, under CHECKPOINT_PATH_KEY) onto the trial's queue."""

    def __init__(self, queue: Any) -> None:
        self.queue = queue

    def after_report(self, run_context: Any, metrics: List[Dict[str, Any]], checkpoint: Any) -> None:
        report = dict(metrics[0])
        if checkpoint is not None:
            report[CHECKPOINT_PATH_KEY] = checkpoint.path
        self.queue.put(report)


class RunEvents(UserCallback):
    """Runs in a Train controller: puts the run's reports (rank 0's) and its workers' exceptions on the
    driver's queue. `reports=False` sends the exceptions only (a Tune trial: its reports reach the driver
    through Tune). Never raises into training: an event that cannot be sent only goes unprinted."""

    def __init__(self, queue: Any, label: str = "", *, reports: bool = True) -> None:
        self.queue, self.label, self.reports = queue, label, reports

    def named(self, label: str, *, reports: bool) -> RunEvents:
        """Events of the run called `label`, to the same queue."""
        return RunEvents(self.queue, label, reports=reports)

    def after_report(self, run_context: Any, metrics: List[Dict[str, Any]], checkpoint: Any) -> None:
        if self.reports and metrics:
            plain = {k: v for k, v in metrics[0].items() if isinstance(v, (int, float, str))}
            self._put({"run": self.label, "report": plain})

    def after_exception(self, run_context: Any, worker_exceptions: Dict[int, Exception]) -> None:
        errors = {rank: first_error_line(f"{type(e).__name__}: {e}") for rank, e in worker_exceptions.items()}
        self._put({"run": self.label, "errors": errors})

    def _put(self, event: Dict[str, Any]) -> None:
        try:
            self.queue.put(event, timeout=5)
        except Exception:  # noqa: BLE001 - progress must never fail a training run
            pass


@dataclasses.dataclass(kw_only=True)
class RunFollower:
    """The driver's end of `RunEvents`: prints each event as it arrives."""

    events: RunEvents
    """Give `events.named(...)` to each Train run's RunConfig(callbacks=...)."""
    metric: str
    """The metric a run's summary names its best value of (the task's selection metric)."""
    mode: str
    shown: List[str]
    """The val metrics an epoch line carries."""
    planned: int = 0
    """Epochs of a single run, for its `epoch n/planned` lines."""
    started: float = dataclasses.field(default_factory=time.monotonic)
    """When the block began: a run's elapsed time counts from here (its workers' start included)."""
    tallies: Dict[str, RunTally] = dataclasses.field(default_factory=dict)
    drain: Callable[[], None] = lambda: None
    """Prints the events already queued (set by `follow_runs`)."""
    closed: Set[str] = dataclasses.field(default_factory=set)
    """Runs whose end has been printed: what their worker groups send while shutting down is not shown."""

    def _tally(self, label: str) -> RunTally:
        return self.tallies.setdefault(label, RunTally(started=self.started))

    def close(self, label: str) -> None:
        """Print what run `label` has already sent, then ignore it: call just before printing its end, so a
        failure it sent before ending shows above that line and a worker's health check failing as its
        group shuts down (Ray Train reports those too) does not show as a failure after it."""
        with contextlib.suppress(Exception):  # the queue actor gone: nothing more to print
            self.drain()
        self.closed.add(label)

    def show(self, event: Dict[str, Any]) -> None:
        label = event["run"]
        if label in self.closed:
            log.debug("after the end of %s: %s", label, event)
            return
        tally = self._tally(label)
        report = event.get("report", {})
        if "epoch" in report:
            tally.add(report, self.metric, self.mode)
            tally.elapsed = time.monotonic() - tally.started
            say(epoch_line(label, report, self.planned, self.shown, tally.elapsed))
        for rank, error in sorted(event.get("errors", {}).items()):
            say(f"[{label}] worker rank {rank} failed: {error}")

    def finished(self, label: str) -> None:
        """The one-line summary of the single run `label`, once its fit() has returned."""
        tally = self._tally(label)
        tally.elapsed = time.monotonic() - tally.started
        say(f"[{label}] done: {tally.summary(self.metric, self.planned)}")


@contextlib.contextmanager
def follow_runs(task: Task, *, metric: str = "", mode: str = "", planned: int = 0) -> Iterator[RunFollower]:
    """A queue actor (no CPU) that the Train runs started inside the block report to, and a driver thread
    printing what they send (train_loss and `task`'s headline val metrics; a run's summary names its best
    `metric`, by default the task's selection metric); both end with the block, after the last event is
    printed. Ray must be connected."""
    from ray.util.queue import Empty, Queue

    queue = Queue(actor_options={"num_cpus": 0})
    follower = RunFollower(events=RunEvents(queue), metric=metric or task.selection_metric,
                           mode=mode or task.selection_mode, shown=shown_metrics(task), planned=planned)
    stop = threading.Event()

    taking = threading.Lock()  # an event taken off the queue is shown before `close` can mark its run closed

    def drain(block: bool) -> None:
        while True:
            with taking:
                try:
                    follower.show(queue.get(block=block, timeout=0.5 if block else None))
                except Empty:
                    return

    follower.drain = functools.partial(drain, False)

    def loop() -> None:
        with contextlib.suppress(Exception):  # the queue actor gone (Ray stopping): nothing more to print
            while not stop.is_set():
                drain(block=True)

    thread = threading.Thread(target=loop, name="run-events", daemon=True)
    thread.start()
    try:
        yield follower
    finally:
        stop.set()
        thread.join(5)
        with contextlib.suppress(Exception):  # the last events, then the actor; neither may hide the block's error
            drain(block=False)
            queue.shutdown()
