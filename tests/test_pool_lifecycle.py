"""Pool lifecycle: garbage collection, failed start-up, terminate, and due connections."""

from __future__ import annotations

import asyncio
import datetime as dt
import gc
import weakref

import asyncpg
import pytest

import asyncpg_iam
from asyncpg_iam.testing import ManualClock, PostgresServer, RDSIAMEmulator, _leak_guard
from tests._support import direct_kwargs, pool_kwargs, wait_for


async def test_abandoned_pool_is_garbage_collected(postgres_server: PostgresServer) -> None:
    """Deadline timers and close listeners hold the pool weakly: a dropped pool is collected."""
    pool = await asyncpg_iam.create_pool(
        **direct_kwargs(postgres_server),
        min_size=2,
        max_size=2,
        max_lifetime=60,
        # asyncpg's own idle timers hold the pool strongly; this test is about ours.
        max_inactive_connection_lifetime=0,
    )
    assert await pool.fetchval("SELECT 1") == 1
    connections = [h._con for h in pool._holders if h._con is not None]
    assert len(connections) == 2
    ref = weakref.ref(pool)
    if _leak_guard._current is not None:
        _leak_guard._current.forget(pool)
    del pool
    gc.collect()
    try:
        assert ref() is None
    finally:
        for con in connections:
            await con.close()


async def test_failed_start_closes_the_credential_cache(
    iam_emulator: RDSIAMEmulator, postgres_server: PostgresServer
) -> None:
    """A pool whose first connect is refused releases its credential cache before raising."""
    iam_emulator.disable_iam_user(postgres_server.user)
    pool = asyncpg_iam.create_pool(**iam_emulator.pool_kwargs(user=postgres_server.user))
    with pytest.raises(asyncpg_iam.IAMAuthenticationError):
        await pool
    assert pool._connector.provider is not None
    assert pool._connector.provider._closed


async def test_terminate_closes_the_credential_cache_once(
    iam_emulator: RDSIAMEmulator, postgres_server: PostgresServer
) -> None:
    """terminate() drops connections at once and releases the cache, which then fetches no more."""
    pool = await asyncpg_iam.create_pool(**iam_emulator.pool_kwargs(user=postgres_server.user))
    assert await pool.fetchval("SELECT 1") == 1
    pool.terminate()
    assert pool._shutdown_task is not None
    await pool._shutdown_task
    assert pool._connector.provider is not None
    assert pool._connector.provider._closed
    assert pool.get_size() == 0
    cache = pool._connector.provider.credentials
    fetches = cache.fetches
    cache._refresh_due = 0.0  # a refresh would be due now, were the cache open
    await cache.get()
    assert cache.fetches == fetches


async def test_dsn_password_is_refused_with_iam(postgres_server: PostgresServer) -> None:
    """A password inside the DSN is refused with IAM, as password= is: the token is the password."""
    dsn = "postgresql://app:hunter2-not-a-token@mydb.abcdefghijkl.us-east-1.rds.amazonaws.com/app"
    with pytest.raises(asyncpg_iam.ConfigurationError, match="password cannot be combined"):
        asyncpg_iam.create_pool(dsn)


async def test_connection_due_during_release_is_retired_once_idle(
    iam_emulator: RDSIAMEmulator, postgres_server: PostgresServer
) -> None:
    """A connection whose deadline passes while asyncpg resets it is closed once it is idle."""
    reset_started = asyncio.Event()
    clock = ManualClock(dt.datetime.now(dt.timezone.utc))

    async def slow_reset(con: asyncpg.Connection) -> None:
        reset_started.set()
        await clock.advance(0.6)  # the deadline passes here, after asyncpg's own check

    kwargs = iam_emulator.pool_kwargs(
        user=postgres_server.user,
        min_size=0,
        max_size=1,
        max_lifetime=0.5,
        max_lifetime_jitter=0,
        reset=slow_reset,
        clock=clock,
    )
    async with asyncpg_iam.create_pool(**kwargs) as pool:
        async with pool.acquire() as con:
            pid = await con.fetchval("SELECT pg_backend_pid()")
        assert reset_started.is_set()
        # The server side goes first: the pool counts the close when the client side ends.
        for _ in range(200):
            if pid not in {
                c.backend_pid for c in iam_emulator.relayed_connections()
            } and pool.stats().connections_closed.get("max_lifetime"):
                break
            await clock.advance(0.1)  # the recycler looks again at a connection it found busy
            await asyncio.sleep(0.02)
        assert pid not in {c.backend_pid for c in iam_emulator.relayed_connections()}
        assert pool.stats().connections_closed.get("max_lifetime") == 1


async def test_new_connection_is_tracked_after_the_handout_and_its_first_error_is_seen(
    postgres_server: PostgresServer,
) -> None:
    """A new connection is handed out before the pool watches and tracks it (the loop's next
    iteration); a server error on its very first query still reaches the failover guard."""
    kwargs = direct_kwargs(
        postgres_server, min_size=0, max_size=1, target_session_attrs="read-write"
    )
    async with asyncpg_iam.create_pool(**kwargs, max_lifetime=60) as pool:
        async with pool.acquire() as con:
            raw = con._con
            assert pool.stats().connections_opened == 1
            # Handed out first: the bookkeeping has not run yet.
            assert pool._recycler.deadline(raw) is None
            assert getattr(raw, "_asyncpg_iam_on_error", None) is None
            with pytest.raises(asyncpg.ReadOnlySQLTransactionError):
                await con.execute("SET TRANSACTION READ ONLY; CREATE TEMP TABLE t (x int)")
            assert pool._recycler.deadline(raw) is not None
        await wait_for(lambda: pool.stats().failover_events == 1)


async def test_connection_closed_before_it_is_tracked_leaves_nothing_behind(
    postgres_server: PostgresServer,
) -> None:
    """A connection terminated by its user before the pool tracked it is counted as closed,
    is no failover event, and leaves no lifetime state."""
    kwargs = direct_kwargs(postgres_server, min_size=0, max_size=1)
    async with asyncpg_iam.create_pool(**kwargs, max_lifetime=60) as pool:
        con = await pool.acquire()
        raw = con._con
        assert pool._recycler.deadline(raw) is None
        raw.terminate()  # before the loop's next iteration
        await pool.release(con)
        await wait_for(lambda: sum(pool.stats().connections_closed.values()) == 1)
        stats = pool.stats()
        assert stats.connections_closed == {"other": 1}
        assert stats.failover_events == 0
        assert not pool._recycler._tracked
        assert not pool._recycler.deadlines
        assert all(entry[2].due_at is None for entry in pool._recycler._due)
        assert await pool.fetchval("SELECT 1") == 1  # a new connection replaces it


async def test_a_login_begun_before_a_failover_event_does_not_end_its_recovery(
    iam_emulator: RDSIAMEmulator, postgres_server: PostgresServer
) -> None:
    """The pool watches a new connection after handing it out, so an event can come in
    between: that connection's login began before the event (it may have reached the old
    writer) and does not end the recovery; the next login does."""
    kwargs = pool_kwargs(iam_emulator, postgres_server, min_size=0, max_size=1)
    async with asyncpg_iam.create_pool(**kwargs) as pool:
        guard = pool._failover
        async with pool.acquire() as con:  # a new connection, not watched yet
            assert guard.report_now("test")  # an event before it is watched
            await asyncio.sleep(0)  # it is watched now, with the epoch its login began in
            assert guard._recovering
            assert guard.recoveries == 0
            await con.fetchval("SELECT 1")
        # The event retired it on release: this is a new login, begun after the event.
        assert await pool.fetchval("SELECT 1") == 1
        assert not guard._recovering
        assert guard.recoveries == 1
        assert pool.stats().failover_events == 1


async def test_a_connection_opened_as_the_pool_terminates_arms_no_lifetime_timer(
    iam_emulator: RDSIAMEmulator, postgres_server: PostgresServer
) -> None:
    """The pool's bookkeeping of a connection that runs after the pool began to close starts
    no lifetime deadline (nothing would cancel its timer again) and counts the close."""
    kwargs = pool_kwargs(iam_emulator, postgres_server, min_size=0, max_size=1, max_lifetime=60)
    pool = await asyncpg_iam.create_pool(**kwargs)
    await pool.acquire()  # a new connection, not tracked yet
    pool.terminate()
    # Its bookkeeping runs, then its termination listener.
    await wait_for(lambda: sum(pool.stats().connections_closed.values()) == 1)
    assert pool._recycler._timer is None
    assert not pool._recycler._due
    assert not pool._recycler._tracked


async def test_a_connection_due_at_its_handout_is_closed_on_release(
    iam_emulator: RDSIAMEmulator, postgres_server: PostgresServer
) -> None:
    """A connection whose lifetime ran out during its own login (no setup: the acquire's check
    ran before its deadline was known) is used once and closed on release, on any clock."""
    clock = ManualClock(dt.datetime.now(dt.timezone.utc))
    kwargs = pool_kwargs(
        iam_emulator,
        postgres_server,
        min_size=0,
        max_size=1,
        max_lifetime=0.5,
        max_lifetime_jitter=0,
        clock=clock,
    )
    async with asyncpg_iam.create_pool(**kwargs) as pool:
        iam_emulator.pause_accepting()  # the login waits for the server
        acquiring = asyncio.ensure_future(pool.acquire())
        try:
            await wait_for(lambda: pool._connector.counters.attempts == 1)
            await asyncio.sleep(0.05)
            await clock.advance(0.6)  # past the lifetime, during the login
        finally:
            iam_emulator.resume_accepting()
        con = await asyncio.wait_for(acquiring, 10)
        assert await con.fetchval("SELECT 1") == 1  # used once
        await pool.release(con)
        await wait_for(lambda: pool.stats().connections_closed.get("max_lifetime") == 1)
        assert pool.stats().handed_out_due == 1
