"""Time as an object: the real clock, and a manual one that tests advance by hand.

Every decision about expiry, refresh and lifetime is a function of what a `Clock` says, so that
tests can drive hours of simulated time in milliseconds instead of sleeping.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import heapq
import itertools
import time
from typing import Protocol

__all__ = ["Clock", "ManualClock", "SystemClock"]


class Clock(Protocol):
    """The source of time for the library."""

    def now(self) -> dt.datetime:
        """Return the current wall-clock time, timezone-aware, in UTC."""
        ...

    def monotonic(self) -> float:
        """Return seconds on a clock that never goes back, for intervals and deadlines."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Wait for `seconds` of this clock's time."""
        ...


class SystemClock:
    """The real clock: `datetime.now(UTC)`, `time.monotonic()` and `asyncio.sleep()`."""

    __slots__ = ()

    def now(self) -> dt.datetime:
        return dt.datetime.now(dt.timezone.utc)

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))

    def __repr__(self) -> str:
        return "SystemClock()"


SYSTEM_CLOCK = SystemClock()


class ManualClock:
    """A clock that moves only when `advance()` is called; sleepers wake as it passes them.

    Wall time and monotonic time move together. `sleep()` returns once the clock has been
    advanced past the sleeper's deadline; `advance()` yields to the event loop so that woken
    tasks run before it returns.
    """

    def __init__(self, start: dt.datetime | None = None) -> None:
        if start is None:
            start = dt.datetime(2026, 1, 1, 12, 0, 0, tzinfo=dt.timezone.utc)
        if start.tzinfo is None:
            raise ValueError("ManualClock needs a timezone-aware start time (use tzinfo=UTC)")
        self._wall = start.astimezone(dt.timezone.utc)
        self._mono = 1000.0
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    def now(self) -> dt.datetime:
        return self._wall

    def monotonic(self) -> float:
        return self._mono

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self._mono + seconds, next(self._seq), future))
        await future

    async def advance(self, seconds: float, *, step: float | None = None) -> None:
        """Move time forward by `seconds`, waking sleepers in deadline order on the way.

        With `step`, time moves in increments of at most `step` seconds, letting woken tasks
        schedule new sleeps in between (as they would in real time).
        """
        if seconds < 0:
            raise ValueError("a clock cannot go back: advance() takes seconds >= 0")
        target = self._mono + seconds
        while True:
            next_stop = target if step is None else min(target, self._mono + step)
            if self._sleepers and self._sleepers[0][0] <= next_stop:
                next_stop = self._sleepers[0][0]
            self._move_to(next_stop)
            while self._sleepers and self._sleepers[0][0] <= self._mono:
                _, _, future = heapq.heappop(self._sleepers)
                if not future.done():
                    future.set_result(None)
            for _ in range(5):
                await asyncio.sleep(0)
            if self._mono >= target:
                return

    def set_wall(self, when: dt.datetime) -> None:
        """Jump the wall clock (not the monotonic one), as NTP or a skewed host would."""
        self._wall = when.astimezone(dt.timezone.utc)

    def _move_to(self, mono: float) -> None:
        delta = mono - self._mono
        if delta > 0:
            self._mono = mono
            self._wall += dt.timedelta(seconds=delta)

    def __repr__(self) -> str:
        return f"ManualClock(now={self._wall.isoformat()})"
