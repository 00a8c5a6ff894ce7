"""The driver (and the embedded Ray head it started) lost mid-sweep: `resume=true` picks the sweep
up from the storage root, and each trial's training run continues from its newest complete
checkpoint. The loss is real: SIGKILL to the job's whole session, at a random moment after a random
number of complete epochs, twice in a row (the first resume is killed too).
`jobs.train resume=true` takes the same path for a single run (run naming: tests/unit/test_checkpoints.py;
resuming from storage: tests/integration/test_faults.py)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestrator.training.checkpoints import complete_checkpoints
from orchestrator.training.loop import read_history
from orchestrator.training.resume import DONE_FILE
from tests.support import REPO, job_env, last_json_line, newest_epochs, run_job

pytestmark = [pytest.mark.slow, pytest.mark.faults]

EPOCHS = 8
KILLS = 2
# Two trials side by side, batch 16 over 2 workers each: ~90 steps per worker per epoch.
SWEEP = ["tracking=off", "model.hidden=[256,128]", f"train.epochs={EPOCHS}", "train.batch_size=16", "train.lr=0.003",
         "tune=fifo", "tune.num_samples=1", "tune.search_space.train.lr=[grid,0.002,0.004]",
         "~tune.search_space.train.batch_size", "~tune.search_space.model.hidden"]


def _session_pids(sid: int) -> list:
    """Every process in session `sid` (the job and the Ray processes it started)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()  # after the command: state, ppid, pgrp, session, ...
            if int(fields[3]) == sid and fields[0] != "Z":
                pids.append(int(entry))
    return pids


def _kill_session(sid: int) -> None:
    """SIGKILL exactly what the job started (its session), until nothing of it is left."""
    for _ in range(50):
        pids = _session_pids(sid)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)
    raise AssertionError(f"processes of the killed job survived: {_session_pids(sid)}")


def _kill_job_after(args: list, root: Path, pattern: str, epochs: int) -> dict:
    """Start `python -m jobs.<args>` in its own session; once its runs have `epochs` complete epochs
    in all, wait a random part of an epoch and SIGKILL the whole session. The newest epochs at the kill."""
    proc = subprocess.Popen([sys.executable, "-m", *args], cwd=REPO, env=job_env(), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while sum(newest_epochs(root, pattern).values()) < epochs:
            assert proc.poll() is None, f"the job ended (rc {proc.returncode}) before the kill"
            assert time.monotonic() < deadline, "no progress within 300 s"
            time.sleep(0.05)
        time.sleep(random.uniform(0.0, 0.4))
        at_kill = newest_epochs(root, pattern)
    finally:
        _kill_session(proc.pid)
        proc.wait(30)
    assert not list(root.glob(f"ray_results/*/{DONE_FILE}")), "the job finished before the kill landed: make it longer"
    return at_kill


def _kill_repeatedly(job: list, root: Path, pattern: str) -> list:
    """Run `job`, SIGKILL it, run it again with resume=true and kill it again: KILLS times, each after
    1-2 more complete epochs than the last kill left. The newest epochs at each kill."""
    kills, done = [], 0
    for attempt in range(KILLS):
        at_kill = _kill_job_after(
            [*job, *(["resume=true"] if attempt else [])], root, pattern, epochs=done + random.randint(1, 2)
        )
        done = sum(at_kill.values())
        kills.append(at_kill)
    return kills


def test_sweep_resumes_after_driver_and_head_loss(tmp_path):
    root_url = f"file://{tmp_path}"
    pattern = "ray_results/default-sweep-*/trials/*"
    kills = _kill_repeatedly(["jobs.sweep", *SWEEP, f"storage.root={root_url}"], tmp_path, pattern)
    names = {run.parent.parent.name for at_kill in kills for run in at_kill}
    assert len(names) == 1, f"a resume started a new sweep instead of continuing the lost one: {names}"

    proc = run_job("sweep", *SWEEP, f"storage.root={root_url}", "resume=true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = last_json_line(proc.stdout)
    assert summary["sweep"] == names.pop()
    assert len(summary["trials"]) == 2
    assert all(t["status"] == "completed" and t["epochs"] == EPOCHS for t in summary["trials"]), summary["trials"]
    for run, newest in kills[-1].items():  # trials that had checkpoints continued from them
        history = read_history(root_url, max(complete_checkpoints(root_url, str(run)), key=lambda c: c.epoch).path)
        assert [h["epoch"] for h in history] == list(range(1, EPOCHS + 1))
        steps = [h["steps"] for h in history]
        assert steps == [steps[0] * e for e in range(1, EPOCHS + 1)], f"steps lost or repeated: {steps}"
        if 0 < newest < EPOCHS:
            assert history[-1]["restored_epoch"] >= newest, (run.name, newest, history[-1]["restored_epoch"])
    print(
        f"\nsweep driver loss x{KILLS}: newest complete epoch per trial at each kill "
        f"{[sorted(k.values()) for k in kills]}"
    )
