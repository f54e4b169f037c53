"""Admission of reads: a bounded number admitted at once, a bounded number decoding at once.

`ReadAdmission.admit()` takes one of `capacity` places for a read (waiting or working) and raises
`ReadOverloadedError` at once when none is free, so a flood is answered 503 `overloaded` in
microseconds instead of queueing without end. `run()` decodes and preprocesses on one of
`workers` threads; its slot is freed when the thread's work ends, not when the caller stops
waiting, so a read that timed out still counts until its thread is really done, and the bound
holds. A read that gives up while waiting for a slot never starts its work. Heavy work (an image
decoded whole, as large as the pixel budget allows) takes at most `workers - 1` threads (at least
one), so a flood of it leaves a thread for ordinary reads.

Everything here runs on the event loop's thread, so the counters need no lock.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Final, TypeVar

from app.prediction import ReadOverloadedError

T = TypeVar("T")

# What a refused client is told to wait: reads take milliseconds, a burst drains in about a second.
RETRY_AFTER_S: Final = 1


class ReadAdmission:
    def __init__(self, capacity: int, workers: int) -> None:
        self.capacity = capacity
        self.workers = workers
        self.admitted = 0  # reads holding a place: waiting for a worker, decoding, or in the model's batch
        self.working = 0  # reads whose decode/preprocess is on a thread now
        self._slots = asyncio.Semaphore(workers)
        self._heavy = asyncio.Semaphore(max(1, workers - 1))

    def check(self) -> None:
        """ReadOverloadedError when every place is taken (a cheap look before receiving an image)."""
        if self.admitted >= self.capacity:
            raise ReadOverloadedError(RETRY_AFTER_S)

    @contextlib.contextmanager
    def admit(self) -> Iterator[None]:
        """Hold one place for the length of a read; ReadOverloadedError at once when all are taken."""
        self.check()
        self.admitted += 1
        try:
            yield
        finally:
            self.admitted -= 1

    async def run(self, pool: ThreadPoolExecutor, work: Callable[[], T], *, heavy: bool = False) -> T:
        """`work()` on `pool` once one of the `workers` slots is free (cancelling the wait starts nothing);
        `heavy` work first takes a place in the heavy lane. Both are held until the thread is done."""
        held = [self._heavy, self._slots] if heavy else [self._slots]
        taken: list[asyncio.Semaphore] = []
        try:
            for semaphore in held:
                await semaphore.acquire()
                taken.append(semaphore)
            future = pool.submit(work)
        except BaseException:
            for semaphore in taken:
                semaphore.release()
            raise
        self.working += 1
        loop = asyncio.get_running_loop()

        def release() -> None:
            self.working -= 1
            for semaphore in held:
                semaphore.release()

        def done(_: Future[T]) -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile (shutdown): nothing to free
                loop.call_soon_threadsafe(release)

        future.add_done_callback(done)
        return await asyncio.wrap_future(future)
