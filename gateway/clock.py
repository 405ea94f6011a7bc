"""Time for the handler, injectable so tests and benchmarks run in virtual time.

The handler is the only part of the package that waits; it waits only through a :class:`Clock`. In
production that is :class:`SystemClock`. Tests hand in a :class:`FakeClock` and move time forward
themselves, so no test ever really sleeps and timings are exact.

Two readings, because they answer different questions:

- ``now()`` is monotonic seconds (the event loop's clock in production). Every duration, deadline, backoff
  and gate runs on it, so a wall-clock step (NTP on an edge board that booted in 1970, a DST bug, an
  operator's ``date -s``) neither stretches a 5 s deadline into an hour nor expires all pending work.
- ``wall()`` is seconds since the Unix epoch (UTC). It answers only "when is the next 00:00 UTC" (the
  daily quota reset), "how far away is this HTTP-date ``Retry-After``" and "how long is this token still
  valid"; each answer is turned into a monotonic delay once, at the moment it is needed.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections.abc import Callable
from typing import Protocol, runtime_checkable

__all__ = ["Clock", "FakeClock", "SystemClock", "Timer", "wall_to_monotonic"]


@runtime_checkable
class Clock(Protocol):
    """Where the handler reads the time and waits."""

    def now(self) -> float:
        """Monotonic seconds: for durations and deadlines only (its zero means nothing)."""
        ...

    def wall(self) -> float:
        """Seconds since the Unix epoch (UTC): only to compute a wall-clock target, once."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds`` of monotonic time (<= 0 still yields once). Cancellable."""
        ...


class Timer(Protocol):
    """What :meth:`SystemClock.call_later` and :meth:`FakeClock.call_later` return."""

    def cancel(self) -> object: ...


def wall_to_monotonic(clock: Clock, epoch: float) -> float:
    """The monotonic time at which the wall clock is expected to read ``epoch`` (computed once, now)."""
    return clock.now() + (epoch - clock.wall())


class SystemClock:
    """The real clock: the running loop's monotonic time, ``time.time()`` for the wall, ``asyncio.sleep``."""

    def now(self) -> float:
        try:
            return asyncio.get_running_loop().time()
        except RuntimeError:  # outside a loop (building a handler in sync code): the same clock loops use
            return time.monotonic()

    def wall(self) -> float:
        return time.time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))

    def call_later(self, seconds: float, callback: Callable[[], object]) -> Timer:
        """Run ``callback`` on the loop after ``seconds``: a deadline without a sleeping task (the
        handler arms one per operation)."""
        return asyncio.get_running_loop().call_later(max(0.0, seconds), callback)


class FakeClock:
    """Virtual time for tests: sleepers wake only when the test advances the clock.

    ``advance(dt)`` wakes every sleeper whose time comes within ``dt``, in time order, letting the event
    loop run between wake-ups so the woken code can schedule its next sleep inside the same advance.
    ``run_until(predicate)`` jumps from timer to timer until the predicate holds. ``step_wall(dt)`` moves
    only the wall clock (an NTP step), leaving monotonic time and every sleeper alone.

    Both readings start at ``start``, so a test may compare them until it steps the wall clock.
    """

    #: 2024-01-01T00:00:00Z, a fixed start so tests that care about the UTC date are reproducible.
    DEFAULT_START = 1_704_067_200.0

    def __init__(self, start: float = DEFAULT_START, *, settle_rounds: int = 200) -> None:
        self._now = float(start)
        self._wall_offset = 0.0
        self._timers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()
        self._settle_rounds = settle_rounds

    def now(self) -> float:
        return self._now

    def wall(self) -> float:
        return self._now + self._wall_offset

    def step_wall(self, seconds: float) -> None:
        """Step the wall clock by ``seconds`` (either sign); monotonic time does not move."""
        self._wall_offset += seconds

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._timers, (self._now + seconds, next(self._seq), fut))
        await fut  # a cancelled sleeper leaves a cancelled future, skipped when its time comes

    def call_later(self, seconds: float, callback: Callable[[], object]) -> Timer:
        """Run ``callback`` when virtual time reaches ``now + seconds`` (a timer like a sleeper's)."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        fut.add_done_callback(lambda f: None if f.cancelled() else callback())
        heapq.heappush(self._timers, (self._now + max(0.0, seconds), next(self._seq), fut))
        return fut

    @property
    def sleepers(self) -> int:
        """How many sleeps are pending (cancelled ones excluded)."""
        return sum(1 for _, _, fut in self._timers if not fut.done())

    def next_wakeup(self) -> float | None:
        """The virtual time of the earliest pending sleep, or None."""
        self._drop_done()
        return self._timers[0][0] if self._timers else None

    async def settle(self) -> None:
        """Let every task that can run without time passing run until it waits again."""
        loop = asyncio.get_running_loop()
        idle = 0
        for _ in range(self._settle_rounds):
            await asyncio.sleep(0)
            ready = getattr(loop, "_ready", None)  # CPython's run queue; absent elsewhere: use the fixed rounds
            if ready is not None and len(ready) == 0:
                idle += 1
                if idle >= 3:
                    return
            else:
                idle = 0

    async def advance(self, seconds: float) -> None:
        """Move virtual time forward by ``seconds``, waking sleepers in order."""
        if seconds < 0:
            raise ValueError("time only moves forward")
        target = self._now + seconds
        await self.settle()
        while True:
            self._drop_done()
            if not self._timers or self._timers[0][0] > target:
                break
            when, _, fut = heapq.heappop(self._timers)
            self._now = max(self._now, when)
            fut.set_result(None)
            await self.settle()
        self._now = target
        await self.settle()

    async def run_until(self, predicate: Callable[[], bool], *, limit: float = 86_400.0) -> bool:
        """Jump from wake-up to wake-up until ``predicate()`` holds or ``limit`` seconds have passed.

        Returns whether the predicate held. Time stops at the wake-up where it first held.
        """
        end = self._now + limit
        await self.settle()
        while not predicate():
            nxt = self.next_wakeup()
            if nxt is None or nxt > end:
                self._now = max(self._now, end)
                await self.settle()
                return predicate()
            await self.advance(max(0.0, nxt - self._now))
        return True

    def _drop_done(self) -> None:
        while self._timers and self._timers[0][2].done():
            heapq.heappop(self._timers)
