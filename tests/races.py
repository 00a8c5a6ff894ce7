"""Writers released at the same instant, and what they write, for the tests that check concurrent
writers lose nothing (tests/unit/test_concurrent_writers.py on local disk,
tests/integration/test_concurrent_writers_s3.py on the S3 server). Nothing here imports Ray or torch."""

from __future__ import annotations

import multiprocessing
import queue
import threading
import traceback
from typing import Any, Callable, List, Sequence, Tuple

import numpy as np

from orchestrator.registry import ModelRegistry, signature_for

WRITERS = 8
MODEL = "digits"


def race(write: Callable[[int], Any], *, processes: bool, writers: int = WRITERS, timeout_s: float = 120) -> List[Any]:
    """Run write(0) ... write(writers - 1) at once, each in its own process or thread, all released by
    one barrier; returns their results in writer order.

    Processes are forked (so `write` may be a closure) and share no locks, file handles or clients
    with each other: only what the storage itself guarantees keeps them apart. Threads suit stores
    whose guarantee is on a server (S3), and processes that must not fork (a Ray driver).
    Raises AssertionError with every failed writer's traceback.
    """
    context: Any = multiprocessing.get_context("fork") if processes else None
    barrier = context.Barrier(writers) if processes else threading.Barrier(writers)
    results: Any = context.Queue() if processes else queue.Queue()

    def run(i: int) -> None:
        try:
            barrier.wait(timeout_s)
            results.put((i, True, write(i)))
        except BaseException:  # reported to the parent, which fails the test
            results.put((i, False, traceback.format_exc()))

    start = context.Process if processes else threading.Thread
    workers = [start(target=run, args=(i,), daemon=True) for i in range(writers)]
    for worker in workers:
        worker.start()
    try:
        outcomes = sorted(results.get(timeout=timeout_s) for _ in workers)
    finally:
        _stop(workers, processes)
    return _results(outcomes)


def _stop(workers: List[Any], processes: bool) -> None:
    for worker in workers:
        worker.join(timeout=30)
        if processes and worker.is_alive():  # stuck: end exactly the process this race started
            worker.kill()
            worker.join()


def _results(outcomes: List[Tuple[int, bool, Any]]) -> List[Any]:
    failures = [f"writer {i}:\n{value}" for i, ok, value in outcomes if not ok]
    if failures:
        raise AssertionError("\n".join(failures))
    return [value for _, _, value in outcomes]


def register(root: str, writer: int) -> int:
    """Register a version of MODEL whose weights and metrics say which writer wrote it; returns its number."""
    weights = {"w": np.full((4, 3), float(writer), dtype=np.float32)}
    version = ModelRegistry(root).register(
        MODEL, weights, metrics={"writer": writer}, config={}, lineage={}, signature=signature_for([3], 4),
    )
    return version.version


def assert_versions_hold_their_writers(root: str, versions: Sequence[int]) -> None:
    """`versions[i]` is what writer i registered: every writer got its own number, and each version
    loads with that writer's weights."""
    assert sorted(versions) == list(range(1, len(versions) + 1))
    registry = ModelRegistry(root)
    assert registry.versions(MODEL) == sorted(versions)
    for writer, number in enumerate(versions):
        version, arrays = registry.load(MODEL, number)
        assert version.metrics["writer"] == writer
        np.testing.assert_array_equal(arrays["w"], np.full((4, 3), writer, dtype=np.float32))
