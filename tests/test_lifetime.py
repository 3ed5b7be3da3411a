"""Pure parts of recycling: lifetimes drawn with jitter, and the connect rate limit."""

from __future__ import annotations

import asyncio
import itertools
import random

import pytest

from asyncpg_iam._clock import ManualClock
from asyncpg_iam._lifetime import TokenBucket, draw_lifetime, spread_deadline


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
    with pytest.raises(ValueError, match="rate must be > 0"):
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
