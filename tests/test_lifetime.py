"""Recycling and the connect rate limit, on a ManualClock: lifetime windows, spread deadlines,
staggered buckets, and a real pool whose lifetimes the manual clock drives."""

from __future__ import annotations

import asyncio
import gc
import itertools
import random
from typing import Any

import pytest

import asyncpg_iam
from asyncpg_iam import ConfigurationError
from asyncpg_iam._clock import ManualClock, SystemClock
from asyncpg_iam._lifetime import (
    _COMPACT_SLACK,
    FIRST_LIFETIME_SPREAD,
    TokenBucket,
    _Tracked,
    draw_lifetime,
    lifetime_window,
    spread_deadline,
)
from asyncpg_iam.testing import PostgresServer

from ._support import direct_kwargs, wait_for


def test_lifetimes_stay_within_the_jitter_window() -> None:
    """Every drawn lifetime lies in [max * (1 - jitter), max], and they spread across it."""
    rng = random.Random(7)
    lifetimes = [draw_lifetime(100.0, 0.2, rng) for _ in range(10_000)]
    assert min(lifetimes) >= 80.0
    assert max(lifetimes) <= 100.0
    assert min(lifetimes) < 81.0
    assert max(lifetimes) > 99.0


def test_no_jitter_means_exactly_max_lifetime() -> None:
    """With jitter 0 every connection lives exactly max_lifetime."""
    assert draw_lifetime(5.0, 0.0, random.Random()) == 5.0


async def test_bucket_spaces_grants_one_interval_apart() -> None:
    """At 4 a second, 12 concurrent waiters are granted 0.25 s apart, in arrival order."""
    clock = ManualClock()
    bucket = TokenBucket(4, clock=clock)
    granted: list[tuple[int, float]] = []

    async def take(n: int) -> None:
        await bucket.acquire()
        granted.append((n, clock.monotonic()))

    tasks = [asyncio.create_task(take(n)) for n in range(12)]
    await asyncio.sleep(0)
    await clock.advance(3.0, step=0.05)
    await asyncio.gather(*tasks)
    assert [n for n, _ in granted] == list(range(12))
    times = [t for _, t in granted]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert min(gaps) == pytest.approx(0.25)
    # In any window of one second, at most 4 grants.
    assert max(sum(1 for t in times if start <= t < start + 1) for start in times) == 4


async def test_bucket_counts_from_actual_grants_after_a_stall() -> None:
    """Waiters woken late by a stalled loop are still granted one interval apart."""
    clock = ManualClock()
    bucket = TokenBucket(2, clock=clock)
    times: list[float] = []

    async def take() -> None:
        await bucket.acquire()
        times.append(clock.monotonic())

    tasks = [asyncio.create_task(take()) for _ in range(4)]
    await asyncio.sleep(0)
    await clock.advance(5.0)  # one big jump, as a stalled event loop would see it
    await clock.advance(2.0, step=0.1)
    await asyncio.gather(*tasks)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert min(gaps) >= 0.5 - 1e-9


async def test_bucket_reports_whether_a_caller_waited() -> None:
    """The first caller gets a free slot (0.0); the next one waits about an interval."""
    clock = ManualClock()
    bucket = TokenBucket(10, clock=clock)
    assert await bucket.acquire() == 0.0
    second = asyncio.create_task(bucket.acquire())
    await asyncio.sleep(0)
    await clock.advance(0.2, step=0.01)
    assert await second == pytest.approx(0.1, abs=0.011)


def test_bucket_rejects_a_non_positive_rate() -> None:
    """A rate of zero or less is refused."""
    with pytest.raises(ConfigurationError, match="rate must be events per second > 0"):
        TokenBucket(0)


def test_deadlines_opened_together_spread_over_the_window() -> None:
    """Twenty connections opened at once come due spread evenly across the jitter window."""
    rng = random.Random(3)
    spread: list[float] = []
    for _ in range(20):
        spread.append(spread_deadline(95.0, 100.0, spread, rng))
    plain = sorted(95.0 + 5.0 * rng.random() for _ in range(20))
    assert all(95.0 <= deadline <= 100.0 for deadline in spread)
    gaps = [b - a for a, b in itertools.pairwise(sorted(spread))]
    plain_gaps = [b - a for a, b in itertools.pairwise(plain)]
    # Evenly spread, no two within a fifth of the even spacing; uniform draws clump.
    assert min(gaps) > 0.2 * 5.0 / 20
    assert min(gaps) > 3 * min(plain_gaps)


def test_a_lone_deadline_is_uniform_in_the_window() -> None:
    """With nothing else due nearby, the deadline is a plain draw from the window."""
    rng = random.Random(5)
    deadlines = [spread_deadline(10.0, 12.0, [], rng) for _ in range(1000)]
    assert min(deadlines) >= 10.0
    assert max(deadlines) <= 12.0
    assert min(deadlines) < 10.1
    assert max(deadlines) > 11.9
    assert spread_deadline(7.0, 7.0, [7.0], rng) == 7.0


async def test_manual_clock_runs_timers_in_order_and_skips_cancelled_ones() -> None:
    """call_at callbacks run when the clock reaches them, in time order; cancelled ones never."""
    clock = ManualClock()
    ran: list[str] = []
    start = clock.monotonic()
    clock.call_at(start + 2, ran.append, "b")
    clock.call_at(start + 1, ran.append, "a")
    clock.call_at(start + 1.5, ran.append, "never").cancel()
    clock.call_at(start + 3, ran.append, "later")
    await clock.advance(2.5)
    assert ran == ["a", "b"]
    await clock.advance(1)
    assert ran == ["a", "b", "later"]


def test_first_lifetimes_use_a_wider_window_than_replacements() -> None:
    """A replacement lives within the jitter window; a first lifetime within the wide spread."""
    assert lifetime_window(900.0, 0.1, first=False) == pytest.approx((810.0, 900.0))
    assert lifetime_window(900.0, 0.1, first=True) == pytest.approx(
        (900.0 * (1 - FIRST_LIFETIME_SPREAD), 900.0)
    )
    assert lifetime_window(900.0, 0.9, first=True) == pytest.approx((90.0, 900.0))
    assert lifetime_window(900.0, 0.0, first=True) == (900.0, 900.0)


async def test_staggered_buckets_woken_together_grant_out_of_step() -> None:
    """100 buckets at 1/s woken at once grant about 10 per 0.1 s, not 100 at once, then 1/s each."""
    clock = ManualClock()
    rng = random.Random(11)
    start = clock.monotonic()
    granted: list[list[float]] = [[] for _ in range(100)]

    async def replica(index: int, bucket: TokenBucket) -> None:
        for _ in range(5):
            await bucket.acquire()
            granted[index].append(clock.monotonic() - start)

    buckets = [TokenBucket(1.0, clock=clock, stagger=True, rng=rng) for _ in range(100)]
    tasks = [asyncio.create_task(replica(i, b)) for i, b in enumerate(buckets)]
    await asyncio.sleep(0)
    await clock.advance(6.0)
    await asyncio.gather(*tasks)
    times = sorted(t for mine in granted for t in mine)
    assert len(times) == 500
    # No more than 30 grants in any tenth of a second (100 in lockstep without stagger).
    assert max(sum(1 for t in times if s <= t < s + 0.1) for s in times) <= 30
    for mine in granted:
        gaps = [b - a for a, b in itertools.pairwise(mine)]
        assert min(gaps) >= 1.0 - 1e-9
        assert mine[0] < 1.0


async def test_unstaggered_buckets_grant_in_lockstep() -> None:
    """Without stagger, buckets woken together all grant at once: the burst stagger prevents."""
    clock = ManualClock()
    buckets = [TokenBucket(1.0, clock=clock) for _ in range(100)]
    waited = await asyncio.gather(*(bucket.acquire() for bucket in buckets))
    assert waited == [0.0] * 100


async def _pool_on(
    clock: ManualClock, server: PostgresServer, **overrides: Any
) -> asyncpg_iam.Pool:
    """A static-password pool on `server` whose lifetimes `clock` drives."""
    pool = asyncpg_iam.create_pool(**direct_kwargs(server, **overrides), clock=clock)
    await pool  # opens min_size connections
    return pool


def _retired(pool: asyncpg_iam.Pool) -> int:
    """Return how many of the pool's connections were retired at their max lifetime."""
    return pool.stats().connections_closed.get("max_lifetime", 0)


def _deadlines(pool: asyncpg_iam.Pool) -> list[float]:
    """Return the deadlines of the pool's open connections."""
    cons = [holder._con for holder in pool._holders if holder._con is not None]
    found = [pool._recycler.deadline(con) for con in cons]
    return sorted(d for d in found if d is not None)


async def test_pool_spreads_first_lifetimes_then_replaces_within_jitter(
    postgres_server: PostgresServer,
) -> None:
    """A pool filled at once comes due over most of max_lifetime; a replacement within jitter."""
    clock = ManualClock()
    started = clock.monotonic()
    pool = await _pool_on(
        clock, postgres_server, min_size=20, max_size=20, max_lifetime=900, max_lifetime_jitter=0.1
    )
    async with pool:
        deadlines = _deadlines(pool)
        assert len(deadlines) == 20
        lifetimes = [d - started for d in deadlines]
        assert min(lifetimes) >= 900 * (1 - FIRST_LIFETIME_SPREAD)
        assert max(lifetimes) <= 900
        # Spread over 675 s: at most 5 in any 90 s (the old jitter window held all 20).
        assert max(sum(1 for d in deadlines if s <= d < s + 90) for s in deadlines) <= 5

        first = deadlines[0]
        await clock.advance(first - clock.monotonic() + 0.001)
        await wait_for(
            lambda: (
                _retired(pool) == 1
                and pool.stats().connections_opened == 21
                and len(_deadlines(pool)) == 20
            )
        )
        replacement = sorted(set(_deadlines(pool)) - set(deadlines))
        assert len(replacement) == 1
        assert 810 <= replacement[0] - clock.monotonic() <= 900
        assert _retired(pool) == 1


async def test_pool_retires_every_connection_within_max_lifetime_on_the_clock(
    postgres_server: PostgresServer,
) -> None:
    """Advancing the manual clock by max_lifetime retires each of the pool's first connections."""
    clock = ManualClock()
    pool = await _pool_on(clock, postgres_server, min_size=5, max_size=5, max_lifetime=60)
    async with pool:
        originals = {holder._con for holder in pool._holders}
        await clock.advance(14.0)  # shorter than any first lifetime (60 * 0.25)
        assert _retired(pool) == 0
        await clock.advance(46.0)
        await wait_for(lambda: _retired(pool) == 5)
        await wait_for(lambda: pool.get_size() == 5)
        assert originals.isdisjoint(holder._con for holder in pool._holders)
        async with pool.acquire() as con:
            assert await con.fetchval("SELECT 1") == 1


async def test_connections_dropped_together_get_first_lifetimes(
    postgres_server: PostgresServer,
) -> None:
    """Connections that replace dropped ones (not retired ones) spread over the wide window."""
    clock = ManualClock()
    pool = await _pool_on(clock, postgres_server, min_size=10, max_size=10, max_lifetime=900)
    async with pool:
        for holder in pool._holders:
            holder._con.terminate()
        await wait_for(
            lambda: pool.stats().connections_opened == 20 and len(_deadlines(pool)) == 10
        )
        lifetimes = [d - clock.monotonic() for d in _deadlines(pool)]
        assert min(lifetimes) >= 900 * (1 - FIRST_LIFETIME_SPREAD)
        assert max(lifetimes) - min(lifetimes) > 300  # wider than the 90 s jitter window
        assert pool.stats().connections_closed.get("other", 0) == 10


async def test_system_clock_timers_follow_the_running_loop() -> None:
    """SystemClock.call_at fires at a time.monotonic() deadline on any loop (uvloop's clock too)."""
    clock = SystemClock()
    loop = asyncio.get_running_loop()
    fired = loop.create_future()
    when = clock.monotonic() + 0.05
    clock.call_at(when, lambda: fired.set_result(clock.monotonic()))
    assert await asyncio.wait_for(fired, 5) >= when - 0.002  # uvloop's clock has 1 ms steps


async def test_an_idle_connection_is_retired_on_time_while_an_earlier_one_is_busy(
    postgres_server: PostgresServer,
) -> None:
    """A busy connection's later recheck does not delay an idle one due before it."""
    clock = ManualClock()
    # First lifetimes fall in [0.1, 0.4] s: the two deadlines are closer together than the
    # recheck of a connection found in use (0.5 s).
    pool = await _pool_on(clock, postgres_server, min_size=2, max_size=2, max_lifetime=0.4)
    async with pool:
        held = [await pool.acquire(), await pool.acquire()]
        try:
            held.sort(key=lambda proxy: pool._recycler.deadline(proxy._con) or 0.0)
            busy, idle = held
            idle_due = pool._recycler.deadline(idle._con)
            assert idle_due is not None
            await pool.release(held.pop())
            await clock.advance(idle_due - clock.monotonic() + 0.001)  # past both deadlines
            await wait_for(lambda: _retired(pool) == 1, timeout=3.0)
            assert await busy.fetchval("SELECT 1") == 1  # the busy one was not interrupted
        finally:
            for proxy in held:
                await pool.release(proxy)
        await wait_for(lambda: _retired(pool) == 2)


async def test_closed_connections_leave_no_lifetime_state_behind(
    postgres_server: PostgresServer,
) -> None:
    """200 reconnects within one lifetime keep only a bounded slack of closed connections' state."""
    clock = ManualClock()  # no deadline comes up: only closing can free the heap's entries
    pool = await _pool_on(clock, postgres_server, min_size=1, max_size=1, max_lifetime=900)
    async with pool:
        for _ in range(200):
            await pool.expire_connections()
            async with pool.acquire() as con:
                assert await con.fetchval("SELECT 1") == 1
        assert pool.stats().connections_opened == 201
        gc.collect()
        states = [o for o in gc.get_objects() if isinstance(o, _Tracked)]
        mine = [state for state in states if state.recycler is pool._recycler]
        # One open connection, and at most the compaction's slack of closed ones, none of
        # which still holds what the failover guard attached.
        assert len(mine) <= 1 + _COMPACT_SLACK
        assert sum(state.also is not None for state in mine) <= 1
