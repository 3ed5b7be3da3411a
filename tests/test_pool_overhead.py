"""What the pool adds to an acquire + query + release, counted in Python function calls.

Counts, not times: the number of Python-level calls the pools' own code makes (asyncpg's pool
module and asyncpg_iam's) does not move with the machine's load. ``benchmarks/profile_pool.py``
counts every call and the instructions executed; see docs/benchmarks.md.
"""

from __future__ import annotations

import sys
from types import FrameType
from typing import Any

import asyncpg
import pytest

import asyncpg_iam
from asyncpg_iam._asyncpg_pool import AsyncpgPool
from asyncpg_iam.testing import PostgresServer
from tests._support import direct_kwargs, wait_for

pytest.importorskip("opentelemetry.sdk")


def _in_pool_code(filename: str) -> bool:
    # asyncio's tasks module too: asyncpg's release runs its reset through asyncio.shield.
    return filename.endswith(
        ("asyncpg/pool.py", "asyncpg\\pool.py", "asyncio/tasks.py", "asyncio\\tasks.py")
    ) or ("asyncpg_iam" in filename and "testing" not in filename)


async def _pool_calls(pool: Any) -> int:
    """Return the Python calls (coroutine resumptions included) made in pool code during one
    acquire + ``SELECT 1`` + release on an idle, warm pool."""
    async with pool.acquire() as con:  # warm: the statement cache, the codecs
        await con.fetchval("SELECT 1")
    calls = 0

    def profile(frame: FrameType, event: str, _arg: object) -> None:
        nonlocal calls
        if event == "call" and _in_pool_code(frame.f_code.co_filename):
            calls += 1

    sys.setprofile(profile)
    try:
        async with pool.acquire() as con:
            await con.fetchval("SELECT 1")
    finally:
        sys.setprofile(None)
    return calls


async def test_acquire_and_release_cost_no_more_calls_than_asyncpg(
    postgres_server: PostgresServer,
) -> None:
    """An acquire + release makes no more Python calls in pool code than asyncpg.Pool's, with
    a lifetime on every connection, and recording OpenTelemetry's wait and use times adds
    none to ``async with pool.acquire()``."""
    from opentelemetry.sdk.metrics import MeterProvider

    from asyncpg_iam.otel import instrument_pool

    kwargs = direct_kwargs(postgres_server, min_size=1, max_size=1)
    plain_kwargs = {k: v for k, v in kwargs.items() if k != "iam"}
    async with (
        asyncpg.create_pool(**plain_kwargs) as plain,
        asyncpg_iam.create_pool(**kwargs, max_lifetime=900) as ours,
    ):
        assert ours._recycler.deadline(ours._holders[0]._con) is not None
        plain_calls = await _pool_calls(plain)
        our_calls = await _pool_calls(ours)
        assert our_calls <= plain_calls, (our_calls, plain_calls)
        instrumentation = instrument_pool(ours, MeterProvider())
        observed_calls = await _pool_calls(ours)
        assert observed_calls == our_calls, (observed_calls, our_calls)
        instrumentation.uninstrument()
        assert await _pool_calls(ours) == our_calls


async def test_release_records_use_times_only_while_they_are_recorded(
    postgres_server: PostgresServer,
) -> None:
    """Nothing shadows the pool's release, with or without an observer; while one records,
    each acquire's wait and use land in its buffer."""
    from opentelemetry.sdk.metrics import MeterProvider

    from asyncpg_iam.otel import instrument_pool

    async with asyncpg_iam.create_pool(
        **direct_kwargs(postgres_server, min_size=1, max_size=1)
    ) as pool:
        assert pool.release.__func__ is AsyncpgPool.release
        counters_only = instrument_pool(pool, MeterProvider(), histograms=False)
        assert pool.release.__func__ is AsyncpgPool.release
        counters_only.uninstrument()
        instrumentation = instrument_pool(pool, MeterProvider())
        assert pool.release.__func__ is AsyncpgPool.release
        times = instrumentation._recorder.acquire_times
        assert times is not None
        for _ in range(3):
            async with pool.acquire() as con:
                await con.fetchval("SELECT 1")
        assert len(times.waits) == len(times.uses) == 3
        assert not times.acquired  # the context kept each handout's time itself
        # `await pool.acquire()` + `pool.release()`: the handout's time goes by holder.
        con = await pool.acquire()
        assert len(times.waits) == 4
        assert len(times.acquired) == 1
        await pool.release(con)
        assert len(times.uses) == 4
        assert not times.acquired
        # Released inside its own `async with`: one use, and the context's exit does nothing.
        async with pool.acquire() as con:
            await pool.release(con)
        assert len(times.waits) == 5
        assert len(times.uses) == 5
        # Uninstrumented inside a context: the flush takes what was buffered, and the
        # context's exit still releases (its late use goes to the detached buffer).
        async with pool.acquire() as con:
            instrumentation.uninstrument()
            assert not times.waits
            assert not times.uses
        assert len(times.uses) == 1
        assert con._con is None  # released
        assert pool.release.__func__ is AsyncpgPool.release
        assert type(pool.acquire()) is asyncpg.pool.PoolAcquireContext


async def test_writer_pool_reports_query_errors_without_a_query_logger(
    postgres_server: PostgresServer,
) -> None:
    """A pool that wants the writer sees failed queries through its connection class, not
    asyncpg's query logger (a context manager, a record and a callback per query)."""
    kwargs = direct_kwargs(
        postgres_server, min_size=1, max_size=1, target_session_attrs="read-write"
    )
    async with asyncpg_iam.create_pool(**kwargs) as pool:
        assert pool._failover.wants_writer
        async with pool.acquire() as con:
            raw = con._con
            assert raw._asyncpg_iam_on_error is not None
            assert not raw._query_loggers
            with pytest.raises(asyncpg.ReadOnlySQLTransactionError):
                await con.execute("SET TRANSACTION READ ONLY; CREATE TEMP TABLE t (x int)")
        await wait_for(lambda: pool.stats().failover_events == 1)


async def test_a_subclass_release_runs_while_times_are_recorded(
    postgres_server: PostgresServer,
) -> None:
    """While wait and use times are recorded, a subclass's ``release`` still runs on both
    paths: ``async with pool.acquire()`` and ``pool.release()``."""
    from opentelemetry.sdk.metrics import MeterProvider

    from asyncpg_iam.otel import instrument_pool

    released: list[Any] = []

    class Counting(asyncpg_iam.Pool):
        async def release(self, connection: Any, *, timeout: float | None = None) -> None:
            released.append(connection)
            await super().release(connection, timeout=timeout)

    pool = await Counting(**direct_kwargs(postgres_server, min_size=1, max_size=1))
    try:
        instrumentation = instrument_pool(pool, MeterProvider())
        times = instrumentation._recorder.acquire_times
        assert times is not None
        async with pool.acquire() as con:
            await con.fetchval("SELECT 1")
        con = await pool.acquire()
        await pool.release(con)
        assert len(released) == 2
        assert len(times.uses) == 2
    finally:
        await pool.close()


#: What the two checks below read (quickened bytecode, inline attribute storage) is CPython
#: 3.11+'s.
cpython_311 = pytest.mark.skipif(
    sys.implementation.name != "cpython" or sys.version_info < (3, 11),
    reason="the specializing interpreter and inline attribute storage are CPython 3.11+'s",
)


def _method_loads_specialize(pool: Any, name: str, args: str = "None") -> bool:
    """Whether CPython specializes the method load of ``pool.<name>(<args>)``, a coroutine
    function (3.11+): it does
    not when the name can be an instance attribute of the class's pools (placed in their
    inline attribute storage), and every such call then takes the slow path."""
    import dis

    namespace: dict[str, Any] = {}
    exec(f"def call(pool):\n    return pool.{name}({args})\n", namespace)
    call = namespace["call"]
    for _ in range(64):
        call(pool).close()  # a coroutine, never started
    loads = [
        op.opname
        for op in dis.get_instructions(call, adaptive=True)  # type: ignore[call-arg]
        if op.opname.startswith(("LOAD_METHOD", "LOAD_ATTR"))
    ]
    assert loads, "no method load compiled"
    return any("METHOD_" in op and "ADAPTIVE" not in op for op in loads)


@cpython_311
async def test_the_acquire_and_release_methods_stay_specializable(
    postgres_server: PostgresServer,
) -> None:
    """No hook ever shadows a method of the acquire and release path, so CPython keeps its
    fast method loads for them: also after an observer, blue/green's hold on acquires and a
    caller's own attributes came and went."""
    from opentelemetry.sdk.metrics import MeterProvider

    from asyncpg_iam import _asyncpg_pool
    from asyncpg_iam.otel import instrument_pool

    kwargs = direct_kwargs(postgres_server, min_size=1, max_size=1)
    async with asyncpg_iam.create_pool(**kwargs) as pool:

        async def gate() -> None:
            return None

        _asyncpg_pool.hold_acquires(pool, gate)
        async with pool.acquire() as con:
            await con.fetchval("SELECT 1")
        _asyncpg_pool.hold_acquires(pool, None)
        instrument_pool(pool, MeterProvider()).uninstrument()
        for name in ("_acquire", "release"):
            assert _method_loads_specialize(pool, name), name
        # The check sees it: a name placed as an instance attribute, as hooks used to be.
        _asyncpg_pool.shadow(pool, "_get_new_connection", None)
        assert not _method_loads_specialize(pool, "_get_new_connection", args="")


def _attributes_inline(pool: Any) -> bool:
    """Whether `pool`'s instance attributes are still in their inline storage (CPython 3.11+),
    not moved into a dictionary, which makes every attribute read about twice as slow."""
    import gc

    counters = object.__getattribute__(pool, "_counters")
    return any(referent is counters for referent in gc.get_referents(pool))


@cpython_311
async def test_instrumenting_keeps_the_pools_attributes_inline(
    postgres_server: PostgresServer,
) -> None:
    """Installing and removing an observer (its acquire times and new-connection hook) leaves the
    pool's attributes where its acquires and releases read them fastest, also after another
    pool set a hook of its own first (blue/green's hold on acquires) and attributes of a
    caller's own filled the room CPython 3.11 keeps for a class's instance attributes."""
    from opentelemetry.sdk.metrics import MeterProvider

    from asyncpg_iam import _asyncpg_pool
    from asyncpg_iam.otel import instrument_pool

    kwargs = direct_kwargs(postgres_server, min_size=1, max_size=1)
    async with asyncpg_iam.create_pool(**kwargs) as other:

        async def gate() -> None:
            return None

        _asyncpg_pool.hold_acquires(other, gate)
        _asyncpg_pool.hold_acquires(other, None)
        # Attributes of a caller's own (monitoring, tests) take what room is left.
        for index in range(12):
            setattr(other, f"_caller_{index}", index)
    async with asyncpg_iam.create_pool(**kwargs) as pool:
        assert _attributes_inline(pool)
        for histograms in (True, False):
            instrumentation = instrument_pool(pool, MeterProvider(), histograms=histograms)
            async with pool.acquire() as con:
                await con.fetchval("SELECT 1")
            assert _attributes_inline(pool)
            instrumentation.uninstrument()
            assert _attributes_inline(pool)
            assert pool.release.__func__ is AsyncpgPool.release
        pool.__dict__  # noqa: B018  # what the pool must never do itself
        assert not _attributes_inline(pool)  # the check sees it
