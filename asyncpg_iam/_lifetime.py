"""Max-lifetime recycling and the new-connection rate limit.

RDS checks an IAM token only when a connection opens, so a connection opened with a role that
has since been revoked keeps working for as long as it lives. The recycler bounds that: every
connection gets a deadline no later than ``max_lifetime`` after its login, and

* a connection in use is never interrupted: at its deadline its holder is marked stale, and
  asyncpg closes it when it is released;
* an idle connection is taken out of the pool's queue at its deadline (so no acquirer can get it
  meanwhile), closed gracefully, and its holder put back empty;
* a connection that is due is never handed out (the pool checks on acquire and retries);
* the pool is refilled to ``min_size`` in the background.

Deadlines are spread so that reconnects do not arrive together. A connection that replaces
one retired at its lifetime lives ``[max_lifetime * (1 - jitter), max_lifetime]``. Any other
connection (the pool filling up, growing, or reconnecting after its connections were dropped)
starts a *first lifetime* drawn from the much wider ``[max_lifetime * (1 - FIRST_LIFETIME_SPREAD),
max_lifetime]``: connections opened in a burst, across a whole fleet of pools, then come due
spread over most of a lifetime instead of inside the jitter window, and so do the generations
that replace them. With ``jitter=0`` every connection lives exactly ``max_lifetime``.

All timing goes through the pool's `Clock` (its ``monotonic()`` and ``call_at()``), so a
`ManualClock` drives hours of recycling in a test or a simulation.

asyncpg's pool internals (holders, their queue and generation) are reached through
`_asyncpg_pool`, the one module that names them.
"""

from __future__ import annotations

import asyncio
import collections
import heapq
import itertools
import logging
import math
import random
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from . import _asyncpg_pool
from ._clock import SYSTEM_CLOCK, Clock, Timer
from ._errors import ConfigurationError

if TYPE_CHECKING:
    from asyncpg import Connection

__all__ = [
    "FIRST_LIFETIME_SPREAD",
    "Recycler",
    "TokenBucket",
    "draw_lifetime",
    "lifetime_window",
    "spread_deadline",
]

logger = logging.getLogger("asyncpg_iam.pool")

# How long a graceful close of a retired idle connection may take before it is terminated.
_CLOSE_TIMEOUT = 5.0
# How often a connection in use past its deadline is looked at again, until it is released.
_RECHECK_IN_USE = 0.5
#: The fraction of `max_lifetime` over which a first lifetime is spread (see the module doc).
FIRST_LIFETIME_SPREAD = 0.75
# A connection opened within this many seconds of one retired at its lifetime replaces it.
_REPLACEMENT_WINDOW = 60.0
# Stale deadline-heap entries tolerated before a compaction (which also waits until they are
# at least half the heap): memory per closed connection stays bounded, and amortised O(1).
_COMPACT_SLACK = 64


def lifetime_window(max_lifetime: float, jitter: float, *, first: bool) -> tuple[float, float]:
    """Return the ``(shortest, longest)`` lifetime of a new connection.

    A replacement lives ``[max_lifetime * (1 - jitter), max_lifetime]``; a `first` lifetime
    is spread over at least `FIRST_LIFETIME_SPREAD` of `max_lifetime`. No jitter, no spread.
    """
    if jitter == 0:
        return max_lifetime, max_lifetime
    spread = max(jitter, FIRST_LIFETIME_SPREAD) if first else jitter
    return max_lifetime * (1.0 - spread), max_lifetime


def draw_lifetime(max_lifetime: float, jitter: float, rng: random.Random) -> float:
    """Return a lifetime in ``[max_lifetime * (1 - jitter), max_lifetime]``."""
    return max_lifetime * (1.0 - jitter * rng.random())


def spread_deadline(
    earliest: float,
    latest: float,
    others: Iterable[float],
    rng: random.Random,
    candidates: int = 8,
) -> float:
    """Return a deadline in ``[earliest, latest]`` far from the `others` deadlines.

    Best-candidate sampling: of a few uniform draws, keep the one farthest from its nearest
    neighbour. Connections opened together (a pool filling up, a reconnect wave) then come due
    evenly spread over the jitter window instead of in random clumps, so their reconnects
    overlap less; each deadline still lies in the window.
    """
    if latest <= earliest:
        return latest
    width = latest - earliest
    nearby = [other for other in others if earliest - width <= other <= latest + width]
    if not nearby:
        return rng.uniform(earliest, latest)
    best, best_gap = earliest, -1.0
    for _ in range(candidates):
        candidate = rng.uniform(earliest, latest)
        gap = min(abs(candidate - other) for other in nearby)
        if gap > best_gap:
            best, best_gap = candidate, gap
    return best


class TokenBucket:
    """Allow at most `rate` events a second, in bursts of at most `burst`.

    Spacing is measured between the times events are actually granted, not booked, so an event
    loop that stalls and wakes several waiters late still lets them through one interval apart.
    Waiters are served in arrival order; one that is cancelled while it waits takes no slot.

    With `stagger`, the first event after a quiet interval waits a random part of one interval
    instead of going at once: many buckets woken together (every replica of a fleet losing its
    connections in a database restart) then grant out of step, at `rate` times the number of
    buckets a second overall, rather than all at once and again all at once one interval later.
    """

    def __init__(
        self,
        rate: float,
        *,
        burst: int = 1,
        clock: Clock = SYSTEM_CLOCK,
        stagger: bool = False,
        rng: random.Random | None = None,
    ) -> None:
        if not rate > 0:
            raise ConfigurationError(f"rate must be events per second > 0, not {rate!r}")
        self._interval = 1.0 / rate
        self._burst = max(1, burst)
        self._clock = clock
        self._stagger = stagger
        self._rng = rng if rng is not None else random.Random()
        self._granted: collections.deque[float] = collections.deque(maxlen=self._burst)
        self._lock = asyncio.Lock()

    @property
    def rate(self) -> float:
        """Events allowed per second."""
        return 1.0 / self._interval

    async def acquire(self) -> float:
        """Wait for a slot; return the seconds waited (0.0 when one was free)."""
        clock = self._clock
        started = clock.monotonic()
        waited = self._lock.locked()  # others are ahead: this one waits its turn
        async with self._lock:
            if self._stagger and (
                not self._granted or clock.monotonic() - self._granted[-1] >= self._interval
            ):
                waited = True
                await clock.sleep(self._rng.uniform(0.0, self._interval))
            while len(self._granted) == self._burst:
                wait = self._granted[0] + self._burst * self._interval - clock.monotonic()
                if wait <= 0:
                    break
                waited = True
                await clock.sleep(wait)
            now = clock.monotonic()
            self._granted.append(now)
        return now - started if waited else 0.0


class _Tracked:
    """The lifetime state of one connection; its termination listener holds it strongly."""

    __slots__ = ("also", "con_ref", "deadline", "due_at", "key", "opened", "reason", "recycler")

    def __init__(
        self, recycler: Recycler, key: int, con: Any, also: Callable[[Any], None] | None
    ) -> None:
        self.recycler = recycler
        self.also = also
        self.opened = 0.0
        self.deadline: float | None = None
        # id() of the open connection (None once it closed), the recycler's key for it.
        self.key: int | None = key
        self.con_ref: weakref.ref[Any] = weakref.ref(con)
        # When the recycler looks at it next (None: not scheduled, or closed).
        self.due_at: float | None = None
        self.reason: str | None = None

    def terminated(self, _con: Any) -> None:
        """The connection's termination listener (a bound method: asyncpg inspects listeners,
        and a method is the cheap case); then `also`, if given, with the connection itself
        (asyncpg passes its pool proxy while it is in use), or None if it is gone."""
        self.recycler._closed(self)
        # Dropped once called: a closed connection's state may wait in the deadline heap
        # until a compaction, and should not keep what the failover guard attached.
        also, self.also = self.also, None
        if also is not None:
            also(self.con_ref())


class Recycler:
    """Keep every connection of one asyncpg pool within its lifetime.

    Holds its pool weakly, so scheduled deadlines never keep an abandoned pool alive.
    `closed` counts the connections closed by reason: ``"max_lifetime"``, the reason given to
    `retire_on_release()`, or ``"other"``; `on_closed`, if given, is called with each reason
    too. Deadlines are times of `clock`'s ``monotonic()``, and its ``call_at()`` schedules
    them.
    """

    def __init__(
        self,
        pool: Any,
        *,
        max_lifetime: float | None,
        jitter: float,
        on_closed: weakref.WeakMethod[Callable[[str], None]] | None = None,
        clock: Clock = SYSTEM_CLOCK,
        rng: random.Random | None = None,
    ) -> None:
        self._pool_ref: weakref.ref[Any] = weakref.ref(pool)
        self._max_lifetime = max_lifetime
        self._jitter = jitter
        # (shortest, longest) lifetime of a replacement [False] and of a first [True].
        self._windows = {
            first: lifetime_window(max_lifetime, jitter, first=first)
            for first in (False, True)
            if max_lifetime is not None
        }
        self._clock = clock
        self._now: Callable[[], float] = clock.monotonic
        self._rng = rng if rng is not None else random.Random()
        self._on_closed = on_closed
        self.closed: collections.Counter[str] = collections.Counter()
        """Connections closed, by reason."""
        # State by id() of each open connection, removed when it closes (its termination
        # listener): an int key costs less than a weak one, on every connect.
        self._tracked: dict[int, _Tracked] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        # Deadlines by id() of the open connection, removed when it closes: the acquire check
        # reads them, and a dict lookup by int costs less than a weak one.
        self._deadlines: dict[int, float] = {}
        # When connections were retired at their lifetime and not yet replaced (oldest first).
        self._retired: collections.deque[float] = collections.deque()
        # One timer for the whole pool, at the earliest time in `_due` (a heap of (time, seq,
        # state)): a loop timer per connection costs more on every connect. Entries of closed
        # or rescheduled connections stay until they come up, or until a compaction.
        self._due: list[tuple[float, int, _Tracked]] = []
        self._seq = itertools.count()
        self._stale = 0
        self._timer: Timer | None = None
        self._timer_at = math.inf

    def track(
        self,
        con: Connection,
        started: float | None = None,
        *,
        also: Callable[[Any], None] | None = None,
    ) -> None:
        """Start the lifetime of a newly opened connection, counted from `started` (clock time).

        `also` is called with the connection (None if it is gone) when it terminates, from
        the same termination listener.
        """
        key = id(con)  # one int object for both tables and the state
        state = _Tracked(self, key, con, also)
        self._tracked[key] = state
        _asyncpg_pool.add_termination_listener(con, state.terminated)
        if started is None:
            started = self._now()
        state.opened = started
        if self._max_lifetime is None:
            return
        # Runs on every connect: the two windows are worked out once, and with no deadline
        # to keep away from (nothing else open) the draw is `spread_deadline`'s own.
        first = not (self._retired and self._takes_a_retired_place(self._now()))
        shortest, longest = self._windows[first]
        earliest, latest = started + shortest, started + longest
        deadlines = self._deadlines
        if deadlines:
            when = spread_deadline(earliest, latest, deadlines.values(), self._rng)
        elif earliest < latest:  # what rng.uniform(earliest, latest) computes
            when = earliest + (latest - earliest) * self._rng.random()
        else:
            when = latest
        state.deadline = deadlines[key] = when
        # `_schedule` of a state not scheduled yet, inline.
        state.due_at = when
        heapq.heappush(self._due, (when, next(self._seq), state))
        if when < self._timer_at:
            self._arm(when)

    def _schedule(self, state: _Tracked, when: float) -> None:
        """Look at `state`'s connection at clock time `when` (replacing an earlier schedule)."""
        if state.due_at is not None:
            self._stale += 1
        state.due_at = when
        heapq.heappush(self._due, (when, next(self._seq), state))
        if when < self._timer_at:
            self._arm(when)

    def _arm(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._clock.call_at(when, self._fire)
        self._timer_at = when

    def _fire(self) -> None:
        """The timer: handle every connection whose time has come, then re-arm."""
        self._timer, self._timer_at = None, math.inf
        due, now = self._due, self._now()
        while due and due[0][0] <= now:
            when, _, state = heapq.heappop(due)
            if state.due_at != when:
                self._stale -= 1
                continue  # closed or rescheduled since
            state.due_at = None
            self._on_deadline(state)
        self._compact()
        due = self._due
        # A connection found in use was rescheduled (and the timer armed) for later than the
        # next deadline in the heap: arm for the earliest.
        if due and due[0][0] < self._timer_at:
            self._arm(due[0][0])

    def _compact(self) -> None:
        """Drop the heap's entries of closed or rescheduled connections once they are most of it.

        Runs when a connection closes too, not only when the timer fires: otherwise every
        connection closed within one lifetime (reconnect rate x `max_lifetime` of them) would
        stay referenced until its old deadline came up.
        """
        if self._stale > _COMPACT_SLACK and self._stale > len(self._due) // 2:
            self._due = [entry for entry in self._due if entry[2].due_at == entry[0]]
            heapq.heapify(self._due)
            self._stale = 0

    def opened_at(self, con: Connection) -> float | None:
        """Return the clock time at which `con`'s login began, or None if it is not tracked."""
        state = self._tracked.get(id(con))
        return state.opened if state is not None else None

    def deadline(self, con: Connection) -> float | None:
        """Return the clock time at which `con` is due, or None if it has no lifetime."""
        return self._deadlines.get(id(con))

    @property
    def deadlines(self) -> Mapping[int, float]:
        """Deadlines (clock times) by ``id()`` of each open connection that has one.

        The same mapping for the recycler's life, updated in place: the pool binds its ``get``
        once for the check on every acquire.
        """
        return self._deadlines

    def is_due(self, con: Connection | None) -> bool:
        """Tell whether `con` has reached its deadline (checked on every acquire: kept cheap)."""
        deadline = self._deadlines.get(id(con))
        return deadline is not None and self._now() >= deadline

    def retire_on_release(self, holder: Any, reason: str = "max_lifetime") -> None:
        """Make asyncpg close the holder's connection when it is released."""
        con = _asyncpg_pool.retire_on_release(holder)
        state = self._tracked.get(id(con)) if con is not None else None
        if state is not None and state.reason is None:
            state.reason = reason

    def cancel(self) -> None:
        """Cancel every scheduled deadline and pending retirement (the pool is closing)."""
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._timer_at = None, math.inf
        for state in list(self._tracked.values()):
            state.due_at = None
        self._due.clear()
        # A connection tracked from now on (its login ended as the pool closed) gets no
        # deadline: nothing arms the timer again.
        self._max_lifetime = None
        self._stale = 0
        for task in list(self._tasks):
            task.cancel()

    def _takes_a_retired_place(self, now: float) -> bool:
        """Tell whether a connection opened `now` replaces one retired at its lifetime."""
        retired = self._retired
        while retired and retired[0] < now - _REPLACEMENT_WINDOW:
            retired.popleft()
        if retired:
            retired.popleft()
            return True
        return False

    def _closed(self, state: _Tracked) -> None:
        if state.reason in ("max_lifetime", "discarded_on_acquire"):
            self._retired.append(self._now())
        if state.key is not None:
            if self._tracked.get(state.key) is state:  # not a newer connection of that id()
                del self._tracked[state.key]
                self._deadlines.pop(state.key, None)
            state.key = None
        if state.due_at is not None:
            state.due_at = None
            self._stale += 1
            if self._stale > _COMPACT_SLACK:  # `_compact`'s first test, one call less
                self._compact()
        reason = state.reason or "other"
        self.closed[reason] += 1
        if self._on_closed is not None:
            on_closed = self._on_closed()
            if on_closed is not None:
                on_closed(reason)

    def _on_deadline(self, state: _Tracked) -> None:
        con = state.con_ref()
        pool = self._pool_ref()
        if con is None or pool is None or pool.is_closing() or con.is_closed():
            return
        holder = _asyncpg_pool.find_holder(pool, con)
        if holder is None:
            return
        if not _asyncpg_pool.take_idle(pool, holder):
            # In use, or being handed out or reset right now: asyncpg closes it on release, and
            # the pool's acquire check discards it if it got through. Look again later in case
            # it went back idle after asyncpg's release check (a reset in progress).
            self.retire_on_release(holder)
            self._schedule(state, self._now() + _RECHECK_IN_USE)
            return
        task = asyncio.get_running_loop().create_task(self._close_idle(pool, holder, con))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _close_idle(self, pool: Any, holder: Any, con: Connection) -> None:
        state = self._tracked.get(id(con))
        if state is not None:
            state.reason = "max_lifetime"
        logger.debug("retiring an idle connection at its max lifetime")
        try:
            await con.close(timeout=_CLOSE_TIMEOUT)
        except Exception:
            con.terminate()
        except asyncio.CancelledError:
            con.terminate()
            raise
        finally:
            _asyncpg_pool.put_back(pool, holder, con)
