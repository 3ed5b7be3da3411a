"""Pool overhead: acquire + ``SELECT 1`` + release throughput, asyncpg-iam vs plain asyncpg.

Both pools have min_size = max_size = 10 and 20 workers looping acquire, ``SELECT 1``,
release; both are created and filled before timing, so the figure is the steady state (the
per-acquire and per-release work each pool adds). Two paths, each with its own pair of pools:

- ``emulator``: the plain ``asyncpg.Pool`` with a static password through the accept-any
  emulator; the ``asyncpg_iam.Pool`` through the verifying emulator (same relay code).
- ``direct``: both pools straight to PostgreSQL over TLS (trust authentication; the IAM pool
  still signs a token per connect, which PostgreSQL ignores). No relay in between, so the
  pools' own overhead is a larger share of each query.

Each round runs the pools once each, in the orders of a balanced design (`interleave`):
``asyncpg_iam.Pool``, ``asyncpg.Pool`` and, as an A/A control, a second ``asyncpg.Pool`` (the
same code against itself, interleaved the same way, so every run shows its own noise). Two
estimators are quoted for each ratio, each with a 95 % interval: the median of per-round ratios
(each round's runs are adjacent in time, so drift cancels; a distribution-free interval) and the
ratio of the medians (drift does not cancel, so it moves about twice as much; a bootstrap
interval over rounds). The target holds both to >= 0.98. How far from 1.0 noise alone reaches is
the A/A control's interval over blocks (`block_median_interval`): rounds of one block share its
pools, so the rounds are not independent draws.

The rounds are many and short: one run's throughput (and its client CPU per query) moves by
about 12 % (standard deviation) from the next, whatever its length, so the resolution comes from
the number of rounds. The client and PostgreSQL run on CPUs of their own (`Environment.pinned`),
so the client's CPU bounds the throughput and what a pool adds per operation shows in full.
They run in blocks, each with a fresh set of pools: a pool's particular connections can make
it a little faster or slower than another's for its whole life, and so can the order the pools
were made in (the second of two ``asyncpg.Pool`` made one after the other ran 0.2 to 1.2 %
faster in 10 of 12 figures). Each block makes its pools in an order turned by one from the last
block's, so each pool is made first, second and third equally often over the run's 9 blocks.

A third measurement isolates the pools' own code: one connection, a no-op ``reset`` (so a
release sends nothing to the server), one task looping acquire + release, timed in CPU seconds
of this process (``time.process_time``, which other processes on a loaded machine disturb far
less than wall time): microseconds of Python per acquire + release, and the difference.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg

import asyncpg_iam

from ._harness import (
    CaseResult,
    Environment,
    block_median_interval,
    interleave,
    median_interval,
    paired_ratio_interval,
    percentile,
    ratio,
)

NAME = "pool_overhead"
TITLE = "6. Pool overhead (acquire + SELECT 1 + release)"
NEEDS_ENVIRONMENT = True
# This process and PostgreSQL on their own CPUs (`Environment.pinned`).
PIN_CPUS = True
POOL_SIZE = 10
WORKERS = 20
BLOCKS = 9  # fresh sets of pools: a multiple of 3, each pool made at each place alike
ROUNDS_PER_BLOCK = 20
ROUND_SECONDS = 0.25


async def _throughput(pool: Any, duration: float) -> float:
    count = 0
    stop = time.perf_counter() + duration

    async def worker() -> None:
        nonlocal count
        while time.perf_counter() < stop:
            async with pool.acquire() as con:
                await con.fetchval("SELECT 1")
            count += 1

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(WORKERS)))
    return count / (time.perf_counter() - start)


#: Makes a pool, created and filled (min_size = max_size = `POOL_SIZE`).
PoolFactory = Callable[[], Awaitable[Any]]
#: Measures one round of a pool: ``measure(pool, seconds)`` returns its operations per second.
Measure = Callable[[Any, float], Awaitable[float]]
#: Sets up one block: yields the makers of its pools by name and the measure of a round.
BlockSetup = Callable[
    [], contextlib.AbstractAsyncContextManager[tuple[dict[str, PoolFactory], Measure]]
]


def pool_factories(
    plain_kwargs: dict[str, Any], iam_kwargs: dict[str, Any], iam: Any
) -> tuple[PoolFactory, PoolFactory]:
    """Return the makers of the plain and the IAM pool of one path."""
    sizes = {"min_size": POOL_SIZE, "max_size": POOL_SIZE}
    plain = functools.partial(asyncpg.create_pool, **plain_kwargs, **sizes)
    ours = functools.partial(asyncpg_iam.create_pool, **iam_kwargs, iam=iam, **sizes)
    return plain, ours


async def _block(
    factories: dict[str, PoolFactory],
    measure: Measure,
    rounds: int,
    seconds: float,
    block: int,
) -> dict[str, list[float]]:
    """Run block number `block` (from 0): `rounds` rounds on a fresh set of pools, created,
    filled and warmed first, in the orders of the balanced design from its round
    ``block * rounds`` on.

    The pools are made (and warmed) in the order of `factories` turned by `block`."""
    names = list(factories)
    turn = block % len(names)
    pools: dict[str, Any] = {}
    try:
        for name in names[turn:] + names[:turn]:
            pools[name] = await factories[name]()
        for pool in pools.values():
            await _throughput(pool, seconds)  # warm, untimed
        return await interleave(
            {name: functools.partial(measure, pools[name], seconds) for name in names},
            rounds,
            block * rounds,
        )
    finally:
        for pool in pools.values():
            await pool.close()


async def run_blocks(
    setup: BlockSetup, blocks: int, rounds: int, seconds: float
) -> dict[str, list[float]]:
    """Each pool's per-round throughputs over `blocks` blocks of `rounds` interleaved rounds,
    each block on a fresh set of pools from `setup`. The blocks continue one balanced order
    design (`interleave`), so each pool runs at each position of a round equally often over
    the whole run, not only within a block; each block makes its pools in an order turned by
    one from the last's (`_block`)."""
    samples: dict[str, list[float]] = {}
    for index in range(blocks):
        async with setup() as (factories, measure):
            block = await _block(factories, measure, rounds, seconds, index)
        for name, values in block.items():
            samples.setdefault(name, []).extend(values)
    return samples


def estimators(
    numerators: list[float], denominators: list[float], blocks: int = 1
) -> dict[str, Any]:
    """Both estimators of a throughput ratio, each with its 95 % interval, and the first's
    interval over the `blocks` blocks the rounds ran in (`block_median_interval`)."""
    paired = [ratio(a, b) for a, b in zip(numerators, denominators, strict=True)]
    return {
        "per_round_ratio": paired,
        "ratio": percentile(paired, 50),
        "ratio_interval_95": median_interval(paired),
        "ratio_block_interval_95": block_median_interval(paired, blocks),
        "ratio_of_medians": ratio(percentile(numerators, 50), percentile(denominators, 50)),
        "ratio_of_medians_interval_95": paired_ratio_interval(numerators, denominators),
    }


async def compare(
    make_plain: PoolFactory, make_iam: PoolFactory, blocks: int, rounds: int, seconds: float
) -> dict[str, Any]:
    """Both estimators of asyncpg_iam's pool against asyncpg's, and of the A/A control, over
    `blocks` fresh sets of pools of `rounds` interleaved rounds each."""
    factories = {"plain": make_plain, "plain_control": make_plain, "asyncpg_iam": make_iam}

    @contextlib.asynccontextmanager
    async def setup() -> AsyncIterator[tuple[dict[str, PoolFactory], Measure]]:
        yield factories, _throughput

    samples = await run_blocks(setup, blocks, rounds, seconds)
    median = {name: percentile(values, 50) for name, values in samples.items()}
    return {
        "per_round_ops_per_second": samples,
        "median_ops_per_second": median,
        **estimators(samples["asyncpg_iam"], samples["plain"], blocks),
        "control": estimators(samples["plain_control"], samples["plain"], blocks),
    }


def add_rows(result: CaseResult, name: str, figures: dict[str, Any]) -> None:
    """The target row (>= 0.98 by both estimators) and the A/A control's row of one path."""
    median = figures["median_ops_per_second"]
    add_target_row(
        result,
        f"{name}: asyncpg_iam.Pool vs asyncpg.Pool",
        f"{median['asyncpg_iam']:.0f} vs {median['plain']:.0f}",
        figures,
    )
    add_control_row(
        result,
        f"{name}: A/A control, asyncpg.Pool vs asyncpg.Pool",
        f"{median['plain_control']:.0f} vs {median['plain']:.0f}",
        figures["control"],
        [figures["ratio"]],
        "the real ratio within the control's interval over blocks",
    )


def add_target_row(result: CaseResult, label: str, medians: str, figures: dict[str, Any]) -> None:
    """A row held to >= 0.98 by both estimators; `medians` gives the two medians compared."""
    result.add(
        f"{label} (median ops/s); both estimators",
        f"{medians}; {_estimates(figures)}",
        ">= 0.98x by both",
        figures["ratio"] >= 0.98 and figures["ratio_of_medians"] >= 0.98,
    )


def add_control_row(
    result: CaseResult,
    label: str,
    medians: str,
    control: dict[str, Any],
    ratios: list[float],
    target: str,
) -> None:
    """The A/A control's row: met when each real ratio (median of per-round ratios) is within
    the control's 95 % interval over blocks, or at or above 1."""
    low, high = control["ratio_block_interval_95"]
    result.add(
        f"{label} (median ops/s); both estimators",
        f"{medians}; {_estimates(control)}; over blocks 95 % {low:.3f}-{high:.3f}",
        target,
        all(low <= value <= high or value >= 1.0 for value in ratios),
    )


def _estimates(figures: dict[str, Any]) -> str:
    low, high = figures["ratio_interval_95"]
    m_low, m_high = figures["ratio_of_medians_interval_95"]
    return (
        f"median of {len(figures['per_round_ratio'])} per-round ratios {figures['ratio']:.3f}x "
        f"(95 % {low:.3f}-{high:.3f}), ratio of medians {figures['ratio_of_medians']:.3f}x "
        f"(95 % {m_low:.3f}-{m_high:.3f})"
    )


async def _no_reset(_con: Any) -> None:
    """A pool ``reset`` that does nothing: releases then send nothing to the server."""


def _cpu_per_op(pool: Any, count: int) -> Callable[[], Awaitable[float]]:
    async def measure() -> float:
        start = time.process_time()
        for _ in range(count):
            async with pool.acquire():
                pass
        return (time.process_time() - start) / count

    return measure


async def _pool_path(env: Environment, iam: Any, rounds: int, count: int) -> dict[str, Any]:
    """CPU microseconds per acquire + release, no query and no reset: the pools' own code."""
    settings = {"min_size": 1, "max_size": 1, "reset": _no_reset}
    plain = await asyncpg.create_pool(**env.direct_kwargs(), **settings)
    ours = await asyncpg_iam.create_pool(**env.direct_kwargs(), iam=iam, **settings)
    try:
        variants = {"plain": _cpu_per_op(plain, count), "asyncpg_iam": _cpu_per_op(ours, count)}
        for measure in variants.values():
            await measure()
        samples = await interleave(variants, rounds)
    finally:
        await plain.close()
        await ours.close()
    micros = {name: [s * 1e6 for s in values] for name, values in samples.items()}
    paired = [b - a for a, b in zip(micros["plain"], micros["asyncpg_iam"], strict=True)]
    return {
        "per_round_us": micros,
        "median_us": {name: percentile(values, 50) for name, values in micros.items()},
        "median_paired_difference_us": percentile(paired, 50),
    }


async def run(env: Environment, quick: bool) -> CaseResult:
    """Compare throughput on both paths, then the pools' own code alone."""
    blocks, rounds = (1, 2) if quick else (BLOCKS, ROUNDS_PER_BLOCK)
    seconds = ROUND_SECONDS
    result = CaseResult(NAME, TITLE)
    through_emulator = await compare(
        *pool_factories(
            {**env.any_kwargs(), "password": "static-password"}, env.iam_kwargs(), env.iam_auth()
        ),
        blocks,
        rounds,
        seconds,
    )
    direct = await compare(
        *pool_factories(env.direct_kwargs(), env.direct_kwargs(), env.iam_auth()),
        blocks,
        rounds,
        seconds,
    )
    pool_path = await _pool_path(env, env.iam_auth(), 5 if quick else 31, 500 if quick else 3000)
    result.figures = {
        "pool_path": pool_path,
        "blocks": blocks,
        "rounds": blocks * rounds,
        "round_seconds": seconds,
        "pool_size": POOL_SIZE,
        "workers": WORKERS,
        "emulator": through_emulator,
        "direct": direct,
    }
    for name, figures in (("through the emulator", through_emulator), ("direct", direct)):
        add_rows(result, name, figures)
    median = pool_path["median_us"]
    result.add(
        "pool code alone (no query, no reset): CPU us per acquire + release, asyncpg_iam vs "
        "asyncpg (median); median paired difference",
        f"{median['asyncpg_iam']:.1f} vs {median['plain']:.1f} us; "
        f"{pool_path['median_paired_difference_us']:+.1f} us",
    )
    return result
