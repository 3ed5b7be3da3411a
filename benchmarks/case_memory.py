"""Memory: retained bytes per pool, per idle connection and per closed connection.

Python heap measured with ``tracemalloc`` (what Python and the C extensions allocate through
Python's allocator; OpenSSL's own buffers are not traced, alike for both pools), after a
``gc.collect()``, for ``asyncpg_iam.Pool`` (IAM on, default ``max_lifetime``) beside plain
``asyncpg.Pool``, both straight to PostgreSQL over TLS:

- **per pool**: `POOLS` started pools with ``min_size=0`` (no connection yet), divided by
  their number;
- **per idle connection**: one pool opened to `IDLE` connections, all released (idle), minus
  the same pool with one, divided by ``IDLE - 1``; after a warm-up (a process's first
  connections allocate more), the mean of `IDLE_RUNS` runs alternating between the pools (a
  connection's buffers move by a few hundred bytes from run to run);
- **per closed connection**: one pool of one connection, reconnected `RECONNECTS` times
  (``expire_connections()`` then an acquire: asyncpg closes the old connection and opens a
  new one), after a warm-up; the heap after minus before, divided by `RECONNECTS`. What a
  closed connection leaves behind (a table entry, a heap entry, a counter) shows here; the
  target is at most 16 B per closed connection on average.

These are counts of bytes, not timings: the machine's load does not move them.
"""

from __future__ import annotations

import asyncio
import gc
import tracemalloc
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg

import asyncpg_iam

from ._harness import CaseResult, Environment

NAME = "memory"
TITLE = "13. Memory (retained Python heap: per pool, per idle connection, per closed connection)"
NEEDS_ENVIRONMENT = True
POOLS = 20
IDLE = 50
IDLE_RUNS = 3  # alternating between the pools; the mean is quoted
RECONNECTS = 10_000
WARM_RECONNECTS = 200


def _heap() -> int:
    gc.collect()
    return tracemalloc.get_traced_memory()[0]


async def _settle(tasks_before: int) -> None:
    """Let asyncpg's background closes (of expired connections) finish: wait until no more
    tasks run than before (at most 2 s)."""
    for _ in range(200):
        await asyncio.sleep(0.01)
        if len(asyncio.all_tasks()) <= tasks_before:
            return


async def _per_pool(make: Callable[..., Awaitable[Any]]) -> float:
    await (await make(min_size=0, max_size=10)).close()  # imports and caches of the first one
    before = _heap()
    pools = [await make(min_size=0, max_size=10) for _ in range(POOLS)]
    after = _heap()
    for pool in pools:
        await pool.close()
    return (after - before) / POOLS


async def _per_idle_connection(make: Callable[..., Awaitable[Any]]) -> float:
    tasks_before = len(asyncio.all_tasks())
    pool = await make(min_size=0, max_size=IDLE)
    try:
        async with pool.acquire() as con:  # one connection first: caches, codecs, the token
            await con.fetchval("SELECT 1")
        await pool.expire_connections()
        async with pool.acquire():
            pass
        await _settle(tasks_before)
        before = _heap()
        all_open = asyncio.Event()
        opened = 0

        async def holder() -> None:
            nonlocal opened
            async with pool.acquire() as con:
                await con.fetchval("SELECT 1")
                opened += 1
                if opened == IDLE:
                    all_open.set()
                await all_open.wait()  # released only once all IDLE are open

        await asyncio.gather(*(holder() for _ in range(IDLE)))
        after = _heap()
        # The connection open before is one of the IDLE after.
        return (after - before) / (IDLE - 1)
    finally:
        await pool.close()


async def _reconnect(pool: Any) -> None:
    await pool.expire_connections()
    async with pool.acquire() as con:
        await con.fetchval("SELECT 1")


async def _per_closed_connection(make: Callable[..., Awaitable[Any]], count: int) -> float:
    tasks_before = len(asyncio.all_tasks())
    pool = await make(min_size=1, max_size=1)
    try:
        for _ in range(WARM_RECONNECTS):
            await _reconnect(pool)
        await _settle(tasks_before)
        before = _heap()
        for _ in range(count):
            await _reconnect(pool)
        await _settle(tasks_before)
        after = _heap()
        return (after - before) / count
    finally:
        await pool.close()


async def run(env: Environment, quick: bool) -> CaseResult:
    """Measure both pools' retained heap."""
    reconnects = 500 if quick else RECONNECTS

    async def plain(**sizes: int) -> Any:
        return await asyncpg.create_pool(**env.direct_kwargs(), **sizes)

    async def ours(**sizes: int) -> Any:
        return await asyncpg_iam.create_pool(**env.direct_kwargs(), iam=env.iam_auth(), **sizes)

    makers = {"asyncpg_iam": ours, "plain": plain}
    tracemalloc.start()
    try:
        for make in makers.values():  # warm: a process's first connections cost more
            await _per_idle_connection(make)
        figures: dict[str, dict[str, Any]] = {name: {"per_idle_runs": []} for name in makers}
        for _ in range(IDLE_RUNS):
            for name, make in makers.items():
                figures[name]["per_idle_runs"].append(await _per_idle_connection(make))
        for name, make in makers.items():
            runs = figures[name]["per_idle_runs"]
            figures[name].update(
                per_pool=await _per_pool(make),
                per_idle_connection=sum(runs) / len(runs),
                per_closed_connection=await _per_closed_connection(make, reconnects),
            )
    finally:
        tracemalloc.stop()
    result = CaseResult(NAME, TITLE)
    result.figures = {
        "pools": POOLS,
        "idle_connections": IDLE,
        "reconnects": reconnects,
        "bytes": figures,
    }
    ours_b, plain_b = figures["asyncpg_iam"], figures["plain"]
    result.add(
        f"retained per pool (min_size 0; mean of {POOLS}), asyncpg_iam vs asyncpg",
        f"{ours_b['per_pool']:,.0f} B vs {plain_b['per_pool']:,.0f} B",
    )
    extra = ours_b["per_idle_connection"] - plain_b["per_idle_connection"]
    result.add(
        f"retained per idle connection ({IDLE} open), asyncpg_iam vs asyncpg",
        f"{ours_b['per_idle_connection']:,.0f} B vs {plain_b['per_idle_connection']:,.0f} B "
        f"({extra:+,.0f} B)",
        "<= +1,024 B",
        extra <= 1024,
    )
    result.add(
        f"retained per closed connection after {reconnects:,} reconnects, asyncpg_iam vs asyncpg",
        f"{ours_b['per_closed_connection']:.1f} B vs {plain_b['per_closed_connection']:.1f} B",
        "<= 16 B",
        ours_b["per_closed_connection"] <= 16,
    )
    if quick:
        result.notes.append(
            f"Quick run: {reconnects} reconnects, so a bounded slack (the recycler compacts its "
            "deadline heap past 64 stale entries) weighs more per connection than in a full run."
        )
    return result
