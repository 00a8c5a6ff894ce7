"""Helpers every test tier shares: the repository's path, free ports, running a job as a user runs
it and reading its summary line, waiting for a condition, an inference request body, the tiny
full-batch fit that trains test models in-process, and a run folder's newest complete epoch.
Nothing here imports Ray or torch at module level, so tests/conftest.py can import it freely."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Dict

if TYPE_CHECKING:
    import numpy as np
    import torch

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A free TCP port on loopback outside Ray's worker port range (10002-19999), where a worker
    process could take it between this call and the bind that uses it."""
    for _ in range(50):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if not 10002 <= port <= 19999:
            return port
    raise RuntimeError("no free port outside 10002-19999")


def job_env(*, with_repo: bool = True) -> Dict[str, str]:
    """The environment a job subprocess gets: this one without RAY_ADDRESS (so a job starts the
    embedded default), offline tracking, unbuffered output, and the repository importable; with
    `with_repo=False`, no PYTHONPATH at all, so nothing can come from the checkout (an installed wheel)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PYTHONPATH")}
    env.update(WANDB_MODE="offline", RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
    if with_repo:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return env


def run_job(job: str, *overrides: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """`python -m jobs.<job> overrides...` from the repository root, to completion; output captured."""
    return subprocess.run([sys.executable, "-m", f"jobs.{job}", *overrides], cwd=REPO, env=job_env(),
                          capture_output=True, text=True, timeout=timeout)


def last_json_line(text: str) -> dict:
    """The last line of `text` that is a JSON object: the summary every job prints as it ends."""
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise AssertionError(f"no JSON line in output:\n{text[-3000:]}")


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str, poll_s: float = 0.05) -> None:
    """Poll `condition` until it holds; TimeoutError naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout_s} s for {what}")
        time.sleep(poll_s)


def infer_body(rows: np.ndarray, **extra) -> dict:
    """An Open Inference Protocol v2 request body carrying `rows` as the FP32 input."""
    tensor = {"name": "input", "shape": list(rows.shape), "datatype": "FP32", "data": rows.ravel().tolist()}
    return {"inputs": [tensor], **extra}


def fit(model: torch.nn.Module, x: np.ndarray, y: np.ndarray, steps: int = 300) -> torch.nn.Module:
    """Full-batch Adam (lr 0.01) for `steps` steps on one thread: about a second, and about 90-95%
    held-out accuracy for the small digits MLPs the tests use. Returns `model` (still in train mode)."""
    import torch

    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    inputs, targets = torch.from_numpy(x), torch.from_numpy(y)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # more threads only spin on a busy small machine
    try:
        for _ in range(steps):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(inputs), targets).backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    return model


def newest_epochs(root: Path, pattern: str) -> Dict[Path, int]:
    """{run folder: the epoch of its newest complete checkpoint, 0 if none} for the run folders
    under the local storage root `root` that match the glob `pattern`."""
    from orchestrator.training.checkpoints import complete_checkpoints

    url = f"file://{root}"
    return {run: max((c.epoch for c in complete_checkpoints(url, str(run))), default=0) for run in root.glob(pattern)}

