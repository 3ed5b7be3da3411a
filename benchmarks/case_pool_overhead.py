"""Pool overhead: acquire + ``SELECT 1`` + release throughput, asyncpg-iam vs plain asyncpg.

Both pools have min_size = max_size = 10 and 20 workers looping acquire, ``SELECT 1``,
release; both are created and filled before timing, so the figure is the steady state (the
per-acquire and per-release work each pool adds). Two paths, each with its own pair of pools:

- ``emulator``: the plain ``asyncpg.Pool`` with a static password through the accept-any
  emulator; the ``asyncpg_iam.Pool`` through the verifying emulator (same relay code).
- ``direct``: both pools straight to PostgreSQL over TLS (trust authentication; the IAM pool
  still signs a token per connect, which PostgreSQL ignores). No relay in between, so the
  pools' own overhead is a larger share of each query.

Rounds alternate plain / IAM (A B, B A, ...); the ratio quoted against the target is the median
of per-round ratios (each round's two runs are adjacent in time, so drift cancels).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import asyncpg

import asyncpg_iam

from ._harness import CaseResult, Environment, interleave, percentile, ratio

NAME = "pool_overhead"
TITLE = "6. Pool overhead (acquire + SELECT 1 + release)"
NEEDS_ENVIRONMENT = True
POOL_SIZE = 10
WORKERS = 20


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


async def _compare(
    plain_kwargs: dict[str, Any], iam_kwargs: dict[str, Any], iam: Any, rounds: int, seconds: float
) -> dict[str, Any]:
    sizes = {"min_size": POOL_SIZE, "max_size": POOL_SIZE}
    plain = await asyncpg.create_pool(**plain_kwargs, **sizes)
    ours = await asyncpg_iam.create_pool(**iam_kwargs, iam=iam, **sizes)
    try:
        await _throughput(plain, seconds / 4)  # warm, untimed
        await _throughput(ours, seconds / 4)
        samples = await interleave(
            {
                "plain": lambda: _throughput(plain, seconds),
                "asyncpg_iam": lambda: _throughput(ours, seconds),
            },
            rounds,
        )
    finally:
        await plain.close()
        await ours.close()
    median = {name: percentile(values, 50) for name, values in samples.items()}
    paired = [ratio(a, b) for a, b in zip(samples["asyncpg_iam"], samples["plain"], strict=True)]
    return {
        "per_round_ops_per_second": samples,
        "median_ops_per_second": median,
        "per_round_ratio": paired,
        "ratio": percentile(paired, 50),
        "ratio_of_medians": ratio(median["asyncpg_iam"], median["plain"]),
    }


async def run(env: Environment, quick: bool) -> CaseResult:
    """Compare throughput on both paths."""
    rounds = 2 if quick else 16
    seconds = 0.5 if quick else 0.75
    result = CaseResult(NAME, TITLE)
    through_emulator = await _compare(
        {**env.any_kwargs(), "password": "static-password"},
        env.iam_kwargs(),
        env.iam_auth(),
        rounds,
        seconds,
    )
    direct = await _compare(
        env.direct_kwargs(), env.direct_kwargs(), env.iam_auth(), rounds, seconds
    )
    result.figures = {
        "rounds": rounds,
        "round_seconds": seconds,
        "pool_size": POOL_SIZE,
        "workers": WORKERS,
        "emulator": through_emulator,
        "direct": direct,
    }
    for name, figures in (("through the emulator", through_emulator), ("direct", direct)):
        median = figures["median_ops_per_second"]
        result.add(
            f"{name}: asyncpg_iam.Pool vs asyncpg.Pool (median ops/s)",
            f"{median['asyncpg_iam']:.0f} vs {median['plain']:.0f} (median of per-round "
            f"ratios {figures['ratio']:.3f}x, ratio of medians {figures['ratio_of_medians']:.3f}x)",
            ">= 0.97x",
            figures["ratio"] >= 0.97,
        )
    return result
