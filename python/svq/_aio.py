"""asyncio plumbing for the awaitable calls: an eventfd svq signals (a queue's call, an
injected batch's completions) is watched on the running loop with ``add_reader``, so a
waiter costs neither a thread nor a polling loop."""

from __future__ import annotations

import asyncio
import math
import weakref
from collections.abc import Callable, Sequence
from typing import Protocol

from . import _native


class _Source(Protocol):
    def fileno(self) -> int: ...
    def drain(self) -> int: ...
    def close(self) -> None: ...


def deadline(loop: asyncio.AbstractEventLoop, timeout: float) -> float:
    """The loop's time ``timeout`` seconds from now (checked like the blocking calls do)."""
    if not (math.isfinite(timeout) and timeout >= 0):
        raise ValueError(f"timeout must be a finite number of seconds >= 0, got {timeout}")
    return loop.time() + min(timeout, 1e9)


def _settle(fut: asyncio.Future[bool], value: bool) -> None:
    if not fut.done():
        fut.set_result(value)


class _Watch:
    """``source``'s eventfd registered on ``loop`` until :meth:`close`, which also closes
    the source (svq keeps the eventfd open until then, so a signal from a session closing
    meanwhile is seen)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, source: _Source) -> None:
        self._loop = loop
        self._source = source
        self._woken: asyncio.Future[bool] | None = None
        self._fd = source.fileno()
        try:
            loop.add_reader(self._fd, self._ready)
        except BaseException:
            source.close()
            raise

    def _ready(self) -> None:
        # Drained here, as the blocking path drains after its poll: the eventfd is level
        # triggered, and the state it hints at (a ring, a slot) is read by the next step.
        self._source.drain()
        if self._woken is not None:
            _settle(self._woken, True)

    async def wait(self, until: float) -> bool:
        """Sleeps until the eventfd is signalled (True) or the loop's clock reaches
        ``until`` (False)."""
        if self._loop.time() >= until:
            return False
        woken: asyncio.Future[bool] = self._loop.create_future()
        self._woken = woken
        timer = self._loop.call_at(until, _settle, woken, False)
        try:
            return await woken
        finally:
            timer.cancel()
            self._woken = None

    def close(self) -> None:
        self._loop.remove_reader(self._fd)
        self._source.close()


class Turns:
    """One asynchronous waiter per queue at a time on each event loop, in arrival order: a
    second reader of the same eventfd would replace the first on the loop, and two
    waiters taking from one queue could leave one asleep over completions the other left
    behind."""

    def __init__(self) -> None:
        self._locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[int, asyncio.Lock]] = (
            weakref.WeakKeyDictionary()
        )

    def of(self, loop: asyncio.AbstractEventLoop, queue: int) -> asyncio.Lock:
        return self._locks.setdefault(loop, {}).setdefault(queue, asyncio.Lock())


Completion = tuple[int, int, bytes]


async def wait_completions(
    native: _native.Driver, turns: Turns, queue: int, count: int, timeout: float, whole: bool
) -> list[Completion]:
    """``Driver.wait`` on the running loop (see :meth:`svq.Driver.wait_async`)."""
    if queue < 0 or count < 0:
        raise ValueError(f"queue {queue} or count {count} out of range (both are >= 0)")
    loop = asyncio.get_running_loop()
    until = deadline(loop, timeout)
    # Every wait yields to the loop once, even when its completions are already there: a
    # task that sends and waits in a loop would otherwise starve the other waiters.
    await asyncio.sleep(0)
    turn = turns.of(loop, queue)
    try:
        async with asyncio.timeout_at(until):
            await turn.acquire()
    except TimeoutError:
        e = TimeoutError(f"queue {queue}: another waiter had the queue for all of the {timeout}s")
        e.completions = []  # type: ignore[attr-defined]
        raise e from None
    watch: _Watch | None = None
    try:
        while True:
            step = native.wait_ready(queue, count, whole)
            if isinstance(step, list):
                return step
            if watch is None:
                watch = _Watch(loop, step)
            else:
                # The watch holds the queue's eventfd already: let this reference go now,
                # not when a traceback that keeps this frame is collected.
                step.close()
            if not await watch.wait(until):
                # Raises TimeoutError with what completed, unless everything just did.
                done = native.wait_ready(queue, count, whole, timeout)
                assert isinstance(done, list)
                return done
    finally:
        if watch is not None:
            watch.close()
        turn.release()


async def inject(
    native: _native.Session, queue: int, elements: Sequence[tuple[bytes, int]], timeout: float
) -> list[tuple[int, bytes]]:
    """``Session.inject_many`` on the running loop (see :meth:`svq.Session.inject_many_async`)."""
    loop = asyncio.get_running_loop()
    until = deadline(loop, timeout)
    batch = native.inject_batch(queue, list(elements))
    watch = _Watch(loop, batch)
    try:
        while (results := batch.poll()) is None:
            if not await watch.wait(until):
                # Raises TimeoutError naming what is still pending, unless all just ended.
                results = batch.poll(timeout)
                assert results is not None
                return results
        return results
    finally:
        watch.close()


async def run_blocking(fn: Callable[[], None]) -> None:
    """Runs ``fn`` in the loop's default executor. A caller cancelled meanwhile still
    waits for it to finish, so it never leaves an object half closed behind."""
    loop = asyncio.get_running_loop()
    fut = loop.run_in_executor(None, fn)
    try:
        await asyncio.shield(fut)
    except asyncio.CancelledError:
        # Cancelled again while waiting: still wait, the work is not abandoned half done.
        while not fut.done():
            try:
                await asyncio.wait([fut])
            except asyncio.CancelledError:
                continue
        if not fut.cancelled():
            fut.exception()  # retrieved: the cancellation is what the caller sees
        raise
