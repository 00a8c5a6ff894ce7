"""Batching that never makes a request wait for company.

A request that finds the model idle starts at once (no timer). Requests that arrive while a
forward pass runs queue up, and all of them (up to `max_batch_size`) go together in the next pass.
Load decides the batch size: one at low load, larger as concurrency grows.

Passes run in a worker thread, so the event loop keeps reading requests (and queueing them) while
one runs: that is what lets a batch form. A model whose passes take less than `inline_below_s`
runs on the loop itself instead: the thread hop would cost more than the pass, and such a model
is never the bottleneck of an HTTP replica.

Unlike `@serve.batch`, which opens a batch at the first request and waits `batch_wait_timeout_s`
for more, nothing here waits on a clock: at concurrency 1 the batcher costs one list append.
"""

import asyncio
import time
from typing import Any, Callable, Generic, List, Optional, Tuple, TypeVar

In = TypeVar("In")
Out = TypeVar("Out")


class AdaptiveBatcher(Generic[In, Out]):
    """Runs `run(items) -> results` (one result per item, in order) on batches of submitted items.

    `run` is synchronous (a forward pass). One batch runs at a time per batcher: a model's weights
    are shared, and on a CPU replica two concurrent passes would only split the same cores.
    """

    def __init__(self, run: Callable[[List[In]], List[Out]], *, max_batch_size: int, inline_below_s: float = 0.0005,
                 on_batch: Optional[Callable[[int], None]] = None):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self._run = run
        self._max = max_batch_size
        self._inline_below_s = inline_below_s
        self._on_batch = on_batch
        self._queue: List[Tuple[In, asyncio.Future]] = []
        self._busy = False
        self._pass_s: Optional[float] = None
        """Moving average of a pass's duration; None until the first pass, which runs in the thread:
        a slow model must never block the loop, not even once (timeouts and health checks run there)."""

    async def submit(self, item: In) -> Out:
        """The result for `item`, from the next batch that has room. Raises what `run` raised."""
        if not self._busy and self._pass_s is not None and self._pass_s < self._inline_below_s:
            return self._timed([item])[0]
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        self._queue.append((item, future))
        if not self._busy:
            self._busy = True
            asyncio.get_running_loop().create_task(self._drain())
        return await future

    def _timed(self, items: List[In]) -> List[Out]:
        started = time.perf_counter()
        results = self._run(items)
        elapsed = time.perf_counter() - started
        self._pass_s = elapsed if self._pass_s is None else 0.8 * self._pass_s + 0.2 * elapsed
        self._count(len(items))
        return results

    async def _drain(self) -> None:
        try:
            while self._queue:
                batch, self._queue = self._queue[:self._max], self._queue[self._max:]
                await self._run_batch(batch)
        finally:
            self._busy = False

    async def _run_batch(self, batch: List[Tuple[In, asyncio.Future]]) -> None:
        live = [(item, future) for item, future in batch if not future.done()]  # a timed-out caller is gone
        if not live:
            return
        try:
            results = await asyncio.to_thread(self._timed, [item for item, _ in live])
        except Exception as err:  # every caller in the batch gets the failure; the batcher lives on
            for _, future in live:
                if not future.done():
                    future.set_exception(err)
            return
        for (_, future), result in zip(live, results):
            if not future.done():
                future.set_result(result)

    def _count(self, size: int) -> None:
        if self._on_batch is not None:
            self._on_batch(size)



def split_rows(results: Any, sizes: List[int]) -> List[Any]:
    """Split a dict of arrays whose first dimension is sum(sizes) into one dict per request."""
    out: List[Any] = []
    start = 0
    for size in sizes:
        out.append({name: value[start:start + size] for name, value in results.items()})
        start += size
    return out
