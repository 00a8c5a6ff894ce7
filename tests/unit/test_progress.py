"""The driver's progress lines and bars (orchestrator.progress): their text, when they print, and how
a terminal differs from a log. No Ray."""

import io

import pytest

from orchestrator.progress import Progress, RunTally, counted, epoch_line, first_error_line, seconds


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_an_epoch_line_names_the_run_the_epoch_its_losses_and_the_time():
    metrics = {"epoch": 2, "train_loss": 0.62668, "val_accuracy": 0.88022, "val_loss": 0.4, "steps": 40}
    line = epoch_line("trial 1_00001", metrics, 3, ["val_accuracy"], 12.34)
    assert line == "[trial 1_00001] epoch 2/3  train_loss 0.6267  val_accuracy 0.8802  12.3s"


@pytest.mark.parametrize("value, text", [(4.26, "4.3s"), (245, "4m05s"), (3725, "1h02m")])
def test_elapsed_time_is_short(value, text):
    assert seconds(value) == text


def test_a_tally_keeps_the_best_value_by_mode():
    high, low = RunTally(), RunTally()
    for epoch, value in enumerate([0.5, 0.9, 0.7], start=1):
        high.add({"epoch": epoch, "val_accuracy": value}, "val_accuracy", "max")
        low.add({"epoch": epoch, "val_loss": value}, "val_loss", "min")
    assert (high.best, high.best_epoch, high.epochs) == (0.9, 2, 3)
    assert (low.best, low.best_epoch) == (0.5, 1)
    assert high.summary("val_accuracy", 4).startswith("3/4 epochs, best val_accuracy 0.9000 (epoch 2)")


def test_the_exception_line_of_a_chained_traceback_is_the_root_cause():
    text = """Traceback (most recent call last):
  File "x.py", line 1, in f
ray.exceptions.RayTaskError(WorkerGroupError): ray::ImplicitFunc.train() (pid=1)
ray.train.WorkerGroupError: Training failed due to worker errors:
[Rank 1 Error Snippet]:
  File "loop.py", line 12, in loop
    inner()
ValueError: boom from the worker loop
"""
    assert first_error_line(text) == "ValueError: boom from the worker loop"
    assert first_error_line("no exception here\nlast words") == "last words"


def test_off_a_terminal_progress_prints_plain_lines_at_most_every_interval_and_a_last_one():
    log = io.StringIO()
    progress = Progress("data: tokenizing train", 12, "files", stream=log, every_s=3600)
    for _ in range(12):
        progress.advance()
    progress.done("in file:///x")
    lines = log.getvalue().splitlines()
    assert len(lines) == 1 and "\r" not in log.getvalue()
    assert lines[0].startswith("data: tokenizing train: 12/12 files (100%)") and lines[0].endswith("in file:///x")

    log = io.StringIO()
    progress = Progress("hashing", 4, stream=log, every_s=0)
    for _ in range(4):
        progress.advance()
    progress.done()
    assert [line.split("  ")[0] for line in log.getvalue().splitlines()] == [
        "hashing: 1/4 (25%)", "hashing: 2/4 (50%)", "hashing: 3/4 (75%)", "hashing: 4/4 (100%)", "hashing: 4/4 (100%)",
    ]


def test_on_a_terminal_progress_redraws_one_line_with_a_bar():
    screen = Terminal()
    progress = Progress("data: reading documents", 8, "documents", stream=screen)
    progress.every_s = 0
    for _ in range(4):
        progress.advance()
    progress.done()
    text = screen.getvalue()
    assert text.count("\n") == 1 and text.endswith("\n")  # one line, redrawn in place, ended once
    assert text.count("\r\033[K") == 5
    assert "[############............] 4/8 documents (50%)" in text
    assert "[########################] 8/8 documents (100%)" in text


def test_counted_passes_items_through_and_reports_their_number(capsys):
    assert list(counted(iter("abc"), "data: letters", 3, "letters")) == ["a", "b", "c"]
    assert capsys.readouterr().out.startswith("data: letters: 3/3 letters (100%)")


def test_a_closed_run_prints_what_it_sent_before_and_nothing_after(capsys):
    from orchestrator.training.reports import RunEvents, RunFollower

    queued = [{"run": "trial a", "errors": {0: "RuntimeError: injected failure"}}]
    follower = RunFollower(events=RunEvents(None), metric="val_accuracy", mode="max", shown=["val_accuracy"])

    def drain() -> None:
        while queued:
            follower.show(queued.pop())

    follower.drain = drain
    follower.close("trial a")  # as its end line is about to print: the failure it sent first shows above it
    # Its workers' health checks failing as the group shuts down do not show after its end; another run's do.
    follower.show({"run": "trial a", "errors": {0: "WorkerHealthCheckFailedError: A worker health check failed."}})
    follower.show({"run": "trial b", "errors": {1: "RuntimeError: boom"}})
    assert capsys.readouterr().out.splitlines() == [
        "[trial a] worker rank 0 failed: RuntimeError: injected failure",
        "[trial b] worker rank 1 failed: RuntimeError: boom",
    ]


class _SlotQueue:
    """ray.util.queue.Queue's get/put over a local one-slot queue (this test has no Ray)."""

    def __init__(self):
        import queue

        self._queue: queue.Queue = queue.Queue(maxsize=1)

    def put(self, item):
        self._queue.put(item)

    def get(self, block=True, timeout=None):
        import queue

        from ray.util.queue import Empty

        try:
            return self._queue.get(block=block, timeout=timeout)
        except queue.Empty:
            raise Empty from None


def test_a_trials_reports_reach_tune_in_order_up_to_the_one_just_before_its_end():
    import time

    from orchestrator.training.sweep import _forward_reports

    reports = _SlotQueue()

    def fit():
        for epoch in range(1, 4):
            time.sleep(0.6 if epoch == 2 else 0)  # one report after a wait longer than a poll
            reports.put({"epoch": epoch})
        return "result"  # right after the last put: the case Ray's TuneReportCallback can deadlock on

    seen: list = []
    assert _forward_reports(fit, reports, seen.append) == "result"
    assert seen == [{"epoch": 1}, {"epoch": 2}, {"epoch": 3}]

    def failing():
        reports.put({"epoch": 1})
        raise RuntimeError("worker died")

    seen.clear()
    with pytest.raises(RuntimeError, match="worker died"):
        _forward_reports(failing, reports, seen.append)
    assert seen == [{"epoch": 1}]
