"""The adaptive batcher: alone means at once, concurrent means together; no Ray, no HTTP."""

import asyncio
import threading
import time

import pytest

from serve.batching import AdaptiveBatcher, split_rows


def _recording(delay_s: float = 0.0):
    batches = []

    def run(items):
        batches.append(list(items))
        if delay_s:
            time.sleep(delay_s)
        return [item * 10 for item in items]

    return run, batches


def test_a_request_alone_runs_at_once_without_waiting():
    run, batches = _recording()
    batcher = AdaptiveBatcher(run, max_batch_size=8)

    async def main():
        await batcher.submit(2)  # the first pass is timed in the worker thread
        started = time.perf_counter()
        result = await batcher.submit(3)
        return result, time.perf_counter() - started

    result, elapsed = asyncio.run(main())
    assert result == 30 and batches == [[2], [3]]
    assert elapsed < 0.002  # no timer: @serve.batch would have waited batch_wait_timeout_s here


def test_requests_arriving_during_a_pass_go_together_in_the_next():
    run, batches = _recording(delay_s=0.05)  # slow passes run in a thread, so others can queue
    batcher = AdaptiveBatcher(run, max_batch_size=8, inline_below_s=0.001)

    async def main():
        first = await batcher.submit(0)  # learns that a pass takes ~50 ms
        results = await asyncio.gather(*(batcher.submit(i) for i in range(1, 21)))
        return first, results

    first, results = asyncio.run(main())
    assert first == 0 and results == [i * 10 for i in range(1, 21)]
    assert batches[0] == [0]
    assert [len(b) for b in batches[1:]] == [8, 8, 4]  # capped at max_batch_size, nothing lost or reordered
    assert sorted(x for b in batches[1:] for x in b) == list(range(1, 21))


def test_a_slow_model_runs_off_the_event_loop():
    loop_threads = []

    def run(items):
        loop_threads.append(threading.get_ident())
        time.sleep(0.01)
        return items

    batcher = AdaptiveBatcher(run, max_batch_size=4, inline_below_s=0.001)

    async def main():
        main_thread = threading.get_ident()
        await batcher.submit(1)  # the first pass, untimed yet, runs in a worker thread
        await batcher.submit(2)  # known to be slow: a worker thread again
        return main_thread

    main_thread = asyncio.run(main())
    assert main_thread not in loop_threads and len(loop_threads) == 2


def test_a_fast_model_runs_on_the_loop_once_timed():
    threads = []

    def run(items):
        threads.append(threading.get_ident())
        return items

    batcher = AdaptiveBatcher(run, max_batch_size=4)

    async def main():
        for i in range(3):
            await batcher.submit(i)
        return threading.get_ident()

    main_thread = asyncio.run(main())
    assert threads[0] != main_thread and threads[1:] == [main_thread, main_thread]


def test_a_failing_batch_fails_its_callers_and_the_next_batch_still_runs():
    calls = []

    def run(items):
        calls.append(list(items))
        time.sleep(0.01)
        if 13 in items:
            raise RuntimeError("bad row")
        return items

    batcher = AdaptiveBatcher(run, max_batch_size=2, inline_below_s=0.001)

    async def main():
        await batcher.submit(0)
        return await asyncio.gather(*(batcher.submit(i) for i in (12, 13, 14, 15)), return_exceptions=True)

    results = asyncio.run(main())
    assert isinstance(results[0], RuntimeError) and isinstance(results[1], RuntimeError)
    assert results[2:] == [14, 15]


def test_max_batch_size_is_validated_and_rows_split_back():
    with pytest.raises(ValueError, match="max_batch_size"):
        AdaptiveBatcher(lambda items: items, max_batch_size=0)
    import numpy as np

    parts = split_rows({"p": np.arange(6).reshape(6, 1), "label": np.arange(6)}, [1, 3, 2])
    assert [p["label"].tolist() for p in parts] == [[0], [1, 2, 3], [4, 5]]
