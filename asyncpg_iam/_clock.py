"""Time as an object: the real clock, and a manual one that tests advance by hand.

Every decision about expiry, refresh and lifetime is a function of what a `Clock` says, and
every timer (a connection's deadline, a retry) is scheduled through it, so that tests and the
fleet simulation can drive hours of simulated time in milliseconds instead of sleeping.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import heapq
import itertools
import time
from collections.abc import Callable
from typing import Any, Protocol

__all__ = ["Clock", "ManualClock", "SystemClock", "Timer"]


class Timer(Protocol):
    """A scheduled call that can still be called off (`asyncio.TimerHandle` is one)."""

    def cancel(self) -> None:
        """Call it off; does nothing once it has run."""
        ...


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

    def call_at(self, when: float, callback: Callable[..., object], *args: Any) -> Timer:
        """Run ``callback(*args)`` on the running event loop once `monotonic()` reaches `when`."""
        ...


class SystemClock:
    """The real clock: `datetime.now(UTC)`, `time.monotonic()` and the event loop's timers.

    Subclass it to shift one aspect (a skewed wall clock, say) and keep the rest real.
    """

    __slots__ = ()

    # dt.datetime.now(dt.timezone.utc), no Python frame around it: read on every connect.
    now = staticmethod(functools.partial(dt.datetime.now, dt.timezone.utc))

    # time.monotonic itself, no Python frame around it: read on every connect and acquire.
    monotonic = staticmethod(time.monotonic)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))

    def call_at(
        self, when: float, callback: Callable[..., object], *args: Any
    ) -> asyncio.TimerHandle:
        loop = asyncio.get_running_loop()
        # The loop's own clock may differ from time.monotonic() (uvloop's does): convert.
        return loop.call_at(loop.time() + (when - time.monotonic()), callback, *args)

    def __repr__(self) -> str:
        return "SystemClock()"


SYSTEM_CLOCK = SystemClock()


class OffsetClock(SystemClock):
    """The system clock with its wall time shifted by `offset` seconds (to see what skew does)."""

    __slots__ = ("_offset",)

    def __init__(self, offset: float) -> None:
        self._offset = dt.timedelta(seconds=offset)

    def now(self) -> dt.datetime:
        return SYSTEM_CLOCK.now() + self._offset

    def __repr__(self) -> str:
        return f"OffsetClock({self._offset.total_seconds():+g} s)"


class _ManualTimer:
    """A call scheduled on a `ManualClock`."""

    __slots__ = ("args", "callback", "cancelled")

    def __init__(self, callback: Callable[..., object], args: tuple[Any, ...]) -> None:
        self.callback = callback
        self.args = args
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class ManualClock:
    """A clock that moves only when `advance()` is called; sleepers and timers fire as it passes.

    Wall time and monotonic time move together. `sleep()` returns once the clock has been
    advanced past the sleeper's deadline, and a `call_at()` callback runs (on the event loop,
    as ``loop.call_soon`` would run it) once the clock reaches its time; `advance()` yields to
    the event loop so that woken tasks run before it returns.
    """

    def __init__(self, start: dt.datetime | None = None) -> None:
        if start is None:
            start = dt.datetime(2026, 1, 1, 12, 0, 0, tzinfo=dt.timezone.utc)
        if start.tzinfo is None:
            raise ValueError("ManualClock needs a timezone-aware start time (use tzinfo=UTC)")
        self._wall = start.astimezone(dt.timezone.utc)
        self._mono = 1000.0
        self._sleepers: list[tuple[float, int, asyncio.Future[None] | _ManualTimer]] = []
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

    def call_at(self, when: float, callback: Callable[..., object], *args: Any) -> _ManualTimer:
        timer = _ManualTimer(callback, args)
        heapq.heappush(self._sleepers, (when, next(self._seq), timer))
        return timer

    def next_due(self) -> float | None:
        """Return the monotonic time at which the next sleeper or timer is due, if any."""
        self._drop_cancelled()
        return self._sleepers[0][0] if self._sleepers else None

    async def advance(self, seconds: float, *, step: float | None = None) -> None:
        """Move time forward by `seconds`, waking sleepers in deadline order on the way.

        With `step`, time moves in increments of at most `step` seconds, letting woken tasks
        schedule new sleeps in between (as they would in real time).
        """
        if seconds < 0:
            raise ValueError("a clock cannot go back: advance() takes seconds >= 0")
        target = self._mono + seconds
        while True:
            self._drop_cancelled()
            next_stop = target if step is None else min(target, self._mono + step)
            if self._sleepers and self._sleepers[0][0] <= next_stop:
                next_stop = self._sleepers[0][0]
            self._move_to(next_stop)
            self._fire_due()
            for _ in range(5):
                await asyncio.sleep(0)
            if self._mono >= target:
                return

    async def jump(self, seconds: float) -> None:
        """Move time forward at once, as a thawed process sees it (AWS Lambda's freeze):
        every sleeper and timer due in between fires late, together, at the new time."""
        if seconds < 0:
            raise ValueError("a clock cannot go back: jump() takes seconds >= 0")
        self._move_to(self._mono + seconds)
        self._fire_due()
        for _ in range(5):
            await asyncio.sleep(0)

    def _drop_cancelled(self) -> None:
        sleepers = self._sleepers
        while sleepers:
            waiter = sleepers[0][2]
            if isinstance(waiter, _ManualTimer) and waiter.cancelled:
                heapq.heappop(sleepers)
            elif not isinstance(waiter, _ManualTimer) and waiter.done():
                heapq.heappop(sleepers)  # its sleeper was cancelled
            else:
                return

    def _fire_due(self) -> None:
        loop: asyncio.AbstractEventLoop | None = None
        while self._sleepers and self._sleepers[0][0] <= self._mono:
            _, _, waiter = heapq.heappop(self._sleepers)
            if isinstance(waiter, _ManualTimer):
                if not waiter.cancelled:
                    waiter.cancelled = True  # ran: a later cancel() does nothing
                    loop = loop or asyncio.get_running_loop()
                    loop.call_soon(waiter.callback, *waiter.args)
            elif not waiter.done():
                waiter.set_result(None)

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
