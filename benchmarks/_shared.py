"""Measuring helpers several cases use: timed connects, timed batches, latency CDF plots."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import asyncpg

from ._harness import new_figure, now, save_figure

__all__ = ["per_await", "per_call", "plot_cdfs", "timed_connect", "timed_pool_connect"]


async def timed_connect(kwargs: Mapping[str, Any]) -> float:
    """Open one connection with ``asyncpg.connect(**kwargs)``; return the seconds it took."""
    start = now()
    con = await asyncpg.connect(**kwargs)
    elapsed = now() - start
    await con.close()
    return elapsed


async def timed_pool_connect(pool: Any) -> float:
    """Acquire a new connection from `pool` (max_size 1, min_size 0); return the seconds.

    Expiring the connection before release makes asyncpg close it, so the next acquire opens
    a new one; the close is not timed.
    """
    start = now()
    proxy = await pool.acquire()
    elapsed = now() - start
    await pool.expire_connections()
    await pool.release(proxy)
    return elapsed


def per_call(fn: Callable[[], object], batch: int) -> Callable[[], Awaitable[float]]:
    """Return a sample function: seconds per call of `fn`, over a batch of `batch` calls."""

    async def measure() -> float:
        start = now()
        for _ in range(batch):
            fn()
        return (now() - start) / batch

    return measure


def per_await(fn: Callable[[], Awaitable[object]], batch: int) -> Callable[[], Awaitable[float]]:
    """Return a sample function: seconds per ``await fn()``, over a batch of `batch`."""

    async def measure() -> float:
        start = now()
        for _ in range(batch):
            await fn()
        return (now() - start) / batch

    return measure


def plot_cdfs(
    samples: Mapping[str, Sequence[float]], labels: Mapping[str, str], *, title: str, path: Path
) -> str:
    """Plot the empirical CDF of each variant's connect latencies (ms); return the file name."""
    figure, axes = new_figure(9, 5)
    for name, values in samples.items():
        ordered = sorted(values)
        count = len(ordered)
        axes.plot(ordered, [(i + 1) / count for i in range(count)], label=labels[name])
    axes.set_xscale("log")
    axes.set_xlabel("connect latency (ms, log scale)")
    axes.set_ylabel("fraction of connects")
    axes.set_title(title)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=7, loc="lower right")
    return save_figure(figure, path)
