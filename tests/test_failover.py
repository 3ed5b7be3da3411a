"""Failover: detection, retirement and landing on the writer, through real servers.

The rehearsal is `asyncpg_iam.testing.FailoverCluster`: a primary and a synchronous streaming
standby, each behind the RDS IAM emulator, behind a cluster endpoint that switches after a lag.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
import pytest_asyncio
import trustme

import asyncpg_iam
from asyncpg_iam import IAMAuth
from asyncpg_iam._signing import is_cluster_endpoint, is_reader_endpoint, is_writer_endpoint
from asyncpg_iam.testing import (
    DEFAULT_CLUSTER_ENDPOINT,
    DEFAULT_READER_ENDPOINT,
    CredentialServer,
    FailoverCluster,
    ManualClock,
    PostgresServer,
    RDSIAMEmulator,
    ReaderEndpoint,
)
from tests._support import engine_on, pool_kwargs, wait_for

WRITER = DEFAULT_CLUSTER_ENDPOINT
READER = DEFAULT_READER_ENDPOINT


@pytest_asyncio.fixture
async def cluster(credential_server: CredentialServer) -> AsyncIterator[FailoverCluster]:
    """Provide a started FailoverCluster (lag 1 s) trusting the credential server's keys."""
    async with FailoverCluster(lag=1.0) as started:
        credential_server.add_emulator(started)
        yield started


async def set_read_only(admin: asyncpg.Connection, dsn: str, *, on: bool) -> None:
    """Make new sessions of the server read-only (or not again); return once one sees it."""
    if on:
        await admin.execute("ALTER SYSTEM SET default_transaction_read_only = on")
    else:
        await admin.execute("ALTER SYSTEM RESET default_transaction_read_only")
    await admin.execute("SELECT pg_reload_conf()")
    wanted = "on" if on else "off"
    for _ in range(500):
        probe = await asyncpg.connect(dsn)
        try:
            if await probe.fetchval("SHOW default_transaction_read_only") == wanted:
                return
        finally:
            await probe.close()
        await asyncio.sleep(0.01)
    pytest.fail(f"default_transaction_read_only did not become {wanted}")


# -- configuration -----------------------------------------------------------------------------


def test_endpoint_names_are_classified() -> None:
    """Cluster endpoints are writers, cluster-ro endpoints readers, anything else neither;
    cluster, reader and custom endpoints are cluster names, instances and others not."""
    assert is_writer_endpoint(WRITER)
    assert not is_reader_endpoint(WRITER)
    assert is_reader_endpoint(READER)
    assert not is_writer_endpoint(READER)
    custom = "mine.cluster-custom-abcdefghijkl.eu-west-1.rds.amazonaws.com"
    instance = "mydb-instance-1.abcdefghijkl.us-east-1.rds.amazonaws.com"
    for host in (custom, instance, "db.example.com", "127.0.0.1"):
        assert not is_writer_endpoint(host)
        assert not is_reader_endpoint(host)
    assert is_writer_endpoint("A.CLUSTER-X1.cn-north-1.rds.amazonaws.com.cn")
    for host in (WRITER, READER, custom, "A.CLUSTER-X1.cn-north-1.rds.amazonaws.com.cn."):
        assert is_cluster_endpoint(host), host
    for host in (instance, "db.example.com", "127.0.0.1"):
        assert not is_cluster_endpoint(host), host


async def test_read_write_is_the_default_only_on_a_cluster_endpoint(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """IAM pools on a cluster endpoint want the writer; readers, instances and choices stay."""
    monkeypatch.delenv("PGTARGETSESSIONATTRS", raising=False)

    def attrs(**kwargs: Any) -> str:
        pool = asyncpg_iam.create_pool(user="app", **kwargs)
        return str(pool.settings.target_session_attrs)

    assert attrs(host=WRITER) == "read-write"
    assert attrs(host="127.0.0.1", iam=IAMAuth(signing_host=WRITER)) == "read-write"
    assert attrs(host=READER) == "any"
    assert attrs(host="mydb.abcdefghijkl.us-east-1.rds.amazonaws.com") == "any"
    assert attrs(host=WRITER, target_session_attrs="any") == "any"
    assert attrs(dsn=f"postgresql://app@{WRITER}/app?target_session_attrs=any") == "any"
    assert attrs(host=WRITER, iam=False) == "any"
    monkeypatch.setenv("PGTARGETSESSIONATTRS", "prefer-standby")
    assert attrs(host=WRITER) == "prefer-standby"


# -- the test bed ------------------------------------------------------------------------------


async def test_cluster_endpoint_points_at_the_old_writer_until_the_lag_is_over(
    cluster: FailoverCluster,
) -> None:
    """During the lag new connections reach the old (read-only) writer, afterwards the new one."""
    old_port, new_port = (server.port for server in cluster.servers)

    async def where() -> tuple[int, bool]:
        pool = await asyncpg_iam.create_pool(
            **cluster.pool_kwargs(min_size=1, max_size=1, target_session_attrs="any")
        )
        try:
            row = await pool.fetchrow(
                "SELECT inet_server_port() AS port, "
                "current_setting('transaction_read_only') = 'on' AS read_only"
            )
            assert row is not None
            return int(row["port"]), bool(row["read_only"])
        finally:
            await pool.close()

    assert await where() == (old_port, False)
    failover = asyncio.ensure_future(cluster.failover(lag=1.0, old_writer="read_only"))
    await wait_for(lambda: cluster.servers[1].running and not failover.done(), timeout=10)
    # The promotion and the old writer's restart (read-only) take ~0.2 s: poll for them.
    during: tuple[int, bool] | None = None
    while during is None or not during[1]:
        try:
            during = await where()
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            await asyncio.sleep(0.02)
    assert not failover.done()
    assert during == (old_port, True)
    timeline = await failover
    assert timeline.started_at <= timeline.stopped_at <= timeline.promoted_at
    assert timeline.switched_at - timeline.promoted_at >= 1.0
    assert await where() == (new_port, False)
    assert cluster.primary is cluster.servers[1]


# -- detection and retirement ------------------------------------------------------------------


async def test_one_lost_connection_retires_every_idle_one(
    iam_emulator: RDSIAMEmulator, postgres_server: PostgresServer
) -> None:
    """A connection the server ends makes the pool retire its idle ones at once."""
    kwargs = pool_kwargs(iam_emulator, postgres_server, min_size=4, max_size=4)
    async with asyncpg_iam.create_pool(**kwargs) as pool:
        async with pool.acquire() as con:  # the pool's own closes are not failovers
            await con.close()
        await wait_for(lambda: pool.get_size() == 4)
        assert pool.stats().failover_events == 0
        pids = {c.backend_pid for c in iam_emulator.relayed_connections()}
        assert len(pids) == 4
        victim = sorted(pids)[0]
        admin = await asyncpg.connect(postgres_server.dsn)
        try:
            assert await admin.fetchval("SELECT pg_terminate_backend($1)", victim)
        finally:
            await admin.close()
        await wait_for(lambda: pool.stats().failover_events == 1)
        stats = pool.stats()
        assert stats.failover_retired == 3
        assert stats.connections_closed.get("failover") == 3
        await wait_for(
            lambda: not pids & {c.backend_pid for c in iam_emulator.relayed_connections()}
        )
        # What is handed out now is a new connection, and it works.
        assert await pool.fetchval("SELECT pg_backend_pid()") not in pids
        assert pool.stats().failover_events == 1


async def test_connection_lost_while_in_use_retires_the_idle_ones(
    iam_emulator: RDSIAMEmulator, postgres_server: PostgresServer
) -> None:
    """A connection the server ends in the middle of a query is seen too (through the proxy)."""
    kwargs = pool_kwargs(iam_emulator, postgres_server, min_size=4, max_size=4)
    async with asyncpg_iam.create_pool(**kwargs) as pool:
        async with pool.acquire() as con:
            pid = con.get_server_pid()
            query = asyncio.ensure_future(con.execute("SELECT pg_sleep(10)"))
            admin = await asyncpg.connect(postgres_server.dsn)
            try:
                running = "SELECT wait_event = 'PgSleep' FROM pg_stat_activity WHERE pid = $1"
                for _ in range(500):
                    if await admin.fetchval(running, pid):
                        break
                    await asyncio.sleep(0.02)
                assert await admin.fetchval("SELECT pg_terminate_backend($1)", pid)
            finally:
                await admin.close()
            with pytest.raises((asyncpg.AdminShutdownError, asyncpg.ConnectionDoesNotExistError)):
                await query
        await wait_for(lambda: pool.stats().failover_events == 1)
        assert pool.stats().failover_retired == 3
        assert await pool.fetchval("SELECT pg_backend_pid()") != pid


async def test_read_only_error_on_a_writer_pool_retires_and_retries(
    iam_emulator: RDSIAMEmulator, postgres_server: PostgresServer
) -> None:
    """25006 on a read-write pool is an event; new logins on the read-only server are retried."""
    kwargs = pool_kwargs(
        iam_emulator, postgres_server, min_size=2, max_size=2, target_session_attrs="read-write"
    )
    admin = await asyncpg.connect(postgres_server.dsn)
    try:
        async with asyncpg_iam.create_pool(**kwargs) as pool:
            await pool.execute("CREATE TABLE IF NOT EXISTS failover_ro (x int)")
            await set_read_only(admin, postgres_server.dsn, on=True)
            with pytest.raises(asyncpg.ReadOnlySQLTransactionError):
                await pool.execute("INSERT INTO failover_ro VALUES (1)")
            await wait_for(lambda: pool.stats().failover_events == 1)
            # asyncpg may be refilling to min_size meanwhile: count from the same moment.
            logins_before = iam_emulator.logins_accepted
            retries_before = pool.stats().read_only_retries
            acquiring = asyncio.ensure_future(pool.fetchval("SELECT 1"))
            await wait_for(lambda: pool.stats().read_only_retries >= 2)
            assert not acquiring.done()
            await set_read_only(admin, postgres_server.dsn, on=False)
            assert await asyncio.wait_for(acquiring, 10) == 1
            stats = pool.stats()
            await pool.execute("INSERT INTO failover_ro VALUES (2)")
        assert stats.failover_events == 1
        assert stats.failover_retired == 2
        # Every retry was a fresh login with a fresh token, and counted.
        logins = iam_emulator.logins_accepted - logins_before
        assert logins >= stats.read_only_retries - retries_before + 1
        assert stats.connect_retries >= stats.read_only_retries
    finally:
        await set_read_only(admin, postgres_server.dsn, on=False)
        await admin.execute("DROP TABLE IF EXISTS failover_ro")
        await admin.close()


def _writer_kwargs_on_a_manual_clock(
    iam_emulator: RDSIAMEmulator, postgres_server: PostgresServer, **extra: Any
) -> tuple[ManualClock, dict[str, Any]]:
    clock = ManualClock(dt.datetime.now(dt.timezone.utc))
    kwargs = pool_kwargs(
        iam_emulator,
        postgres_server,
        min_size=0,
        max_size=1,
        target_session_attrs="read-write",
        clock=clock,
        **extra,
    )
    return clock, kwargs


async def _acquire_retrying(
    pool: asyncpg_iam.Pool, admin: asyncpg.Connection, dsn: str, table: str
) -> asyncio.Future[Any]:
    """Make the server read-only under a write (a failover starts), then start an acquire
    and return it once it waits in the read-only retry loop."""
    await pool.execute("SELECT 1")  # one connection on the writer
    await set_read_only(admin, dsn, on=True)
    # 25006 starts a failover: logins on the read-only server are retried from now on.
    with pytest.raises(asyncpg.ReadOnlySQLTransactionError):
        await pool.execute(f"CREATE TABLE {table} (x int)")
    await wait_for(lambda: pool.stats().failover_events == 1)
    acquiring = asyncio.ensure_future(pool.fetchval("SELECT 1"))
    await wait_for(lambda: pool.stats().read_only_retries == 1)
    return acquiring


async def test_connect_retry_backoff_waits_on_the_pool_clock(
    iam_emulator: RDSIAMEmulator, postgres_server: PostgresServer
) -> None:
    """A connect retried after landing on a read-only server waits on the pool's clock."""
    clock, kwargs = _writer_kwargs_on_a_manual_clock(iam_emulator, postgres_server)
    admin = await asyncpg.connect(postgres_server.dsn)
    try:
        async with asyncpg_iam.create_pool(**kwargs) as pool:
            acquiring = await _acquire_retrying(pool, admin, postgres_server.dsn, "failover_clock")
            logins = iam_emulator.logins_accepted
            # The first backoff is at most 50 ms: in real time it would have retried by now.
            await asyncio.sleep(0.3)
            assert pool.stats().read_only_retries == 1
            assert iam_emulator.logins_accepted == logins
            await clock.advance(0.05)
            await wait_for(lambda: pool.stats().read_only_retries == 2)
            await set_read_only(admin, postgres_server.dsn, on=False)
            assert not acquiring.done()
            await clock.advance(0.1)
            assert await asyncio.wait_for(acquiring, 10) == 1
            stats = pool.stats()
        assert stats.read_only_retries == 2
        assert stats.failover_events == 1
    finally:
        await set_read_only(admin, postgres_server.dsn, on=False)
        await admin.close()


async def test_a_retry_that_runs_out_of_the_connect_timeout_raises_what_it_retried(
    iam_emulator: RDSIAMEmulator, postgres_server: PostgresServer
) -> None:
    """The last retry gets what is left of the connect timeout; when it times out, the caller
    gets the failure that was being retried (the server is read-only), not a TimeoutError."""
    clock, kwargs = _writer_kwargs_on_a_manual_clock(iam_emulator, postgres_server, timeout=3)
    admin = await asyncpg.connect(postgres_server.dsn)
    try:
        async with asyncpg_iam.create_pool(**kwargs) as pool:
            acquiring = await _acquire_retrying(pool, admin, postgres_server.dsn, "failover_spent")
            # Every login from now on outlasts what is left: the retry's own timeout fires.
            iam_emulator.latency = 30.0
            # The backoff ends late, with at most 0.1 s of the 3 s left for the retry.
            await clock.jump(2.9)
            with pytest.raises(asyncpg.TargetServerAttributeNotMatched):
                await asyncio.wait_for(acquiring, 10)
            stats = pool.stats()
        assert stats.read_only_retries == 1
        assert stats.failover_events == 1
    finally:
        iam_emulator.latency = 0.0
        await set_read_only(admin, postgres_server.dsn, on=False)
        await admin.close()


async def test_read_only_login_outside_a_failover_fails_at_once(
    iam_emulator: RDSIAMEmulator, postgres_server: PostgresServer
) -> None:
    """With no failover going on, a login on a read-only server fails at once, as asyncpg's."""
    kwargs = pool_kwargs(
        iam_emulator,
        postgres_server,
        min_size=1,
        max_size=2,
        target_session_attrs="read-write",
        timeout=5,
    )
    admin = await asyncpg.connect(postgres_server.dsn)
    try:
        async with asyncpg_iam.create_pool(**kwargs) as pool:
            await set_read_only(admin, postgres_server.dsn, on=True)
            logins = iam_emulator.logins_accepted
            async with pool.acquire():  # the open connection is busy: the next one logs in
                with pytest.raises(asyncpg.TargetServerAttributeNotMatched):
                    await pool.fetchval("SELECT 1")
            stats = pool.stats()
        assert iam_emulator.logins_accepted - logins == 1
        assert (stats.failover_events, stats.read_only_retries, stats.connect_retries) == (0, 0, 0)
    finally:
        await set_read_only(admin, postgres_server.dsn, on=False)
        await admin.close()


async def test_any_pool_accepts_a_read_only_server(
    iam_emulator: RDSIAMEmulator, postgres_server: PostgresServer
) -> None:
    """A pool that takes any server neither retries on nor reports a read-only one."""
    admin = await asyncpg.connect(postgres_server.dsn)
    try:
        await set_read_only(admin, postgres_server.dsn, on=True)
        kwargs = pool_kwargs(iam_emulator, postgres_server, min_size=1, max_size=1)
        async with asyncpg_iam.create_pool(**kwargs) as pool:
            assert await pool.fetchval("SHOW transaction_read_only") == "on"
            with pytest.raises(asyncpg.ReadOnlySQLTransactionError):
                await pool.execute("CREATE TABLE failover_any (x int)")
            await asyncio.sleep(0.1)
            stats = pool.stats()
        assert (stats.failover_events, stats.read_only_retries) == (0, 0)
    finally:
        await set_read_only(admin, postgres_server.dsn, on=False)
        await admin.close()


# -- under load through a failover ------------------------------------------------------------


@pytest.mark.slow
async def test_iam_pool_under_load_survives_a_failover_with_dns_lag(
    cluster: FailoverCluster, caplog: pytest.LogCaptureFixture
) -> None:
    """Under load through a failover: only queries begun before the event fail, none is lost."""
    caplog.set_level(logging.WARNING, logger="asyncpg_iam.pool")
    lag, workers, size = 2.0, 16, 8
    ids = itertools.count(1)
    acknowledged: list[tuple[int, float]] = []
    failed: list[tuple[float, str]] = []
    stop = asyncio.Event()
    kwargs = cluster.pool_kwargs(min_size=size, max_size=size)
    async with asyncpg_iam.create_pool(**kwargs) as pool:
        assert pool.settings.target_session_attrs == "read-write"
        await pool.execute("CREATE TABLE ledger (id bigint, port int)")

        async def worker() -> None:
            while not stop.is_set():
                write_id = next(ids)
                began = time.time()
                try:
                    async with pool.acquire(timeout=15) as con:
                        await con.execute(
                            "INSERT INTO ledger VALUES ($1, inet_server_port())", write_id
                        )
                except Exception as exc:
                    failed.append((began, type(exc).__name__))
                else:
                    acknowledged.append((write_id, time.time()))
                await asyncio.sleep(0.005)

        tasks = [asyncio.ensure_future(worker()) for _ in range(workers)]
        await asyncio.sleep(1.0)
        stopped_wall = dt.datetime.now(dt.timezone.utc)
        timeline = await cluster.failover(lag=lag, old_writer="read_only")
        switched_wall = time.time()
        await asyncio.sleep(1.5)
        stop.set()
        await asyncio.gather(*tasks)
        stats = pool.stats()

    events = [r for r in caplog.records if "failover or restart detected" in r.getMessage()]
    assert len(events) == 1
    saw_event = events[0].created
    # No caller that began after the pool saw the event failed.
    assert [f for f in failed if f[0] > saw_event] == []
    assert stats.failover_events == 1
    assert stats.read_only_retries >= 1
    assert timeline.switched_at - timeline.promoted_at >= lag
    # Logins after the stop: at most one per pool slot, plus the retries the pool counted.
    logins = [r for e in cluster.emulators for r in e.records if r.at >= stopped_wall]
    assert len(logins) <= size + stats.connect_retries
    # Every acknowledged write is on the new primary exactly once; later ones landed there.
    con = await asyncpg.connect(cluster.primary.dsn)
    try:
        rows = await con.fetch("SELECT id, port FROM ledger")
    finally:
        await con.close()
    stored = Counter(row["id"] for row in rows)
    assert [write_id for write_id, _ in acknowledged if stored[write_id] != 1] == []
    assert max(stored.values()) == 1
    after_switch = {write_id for write_id, at in acknowledged if at > switched_wall}
    assert after_switch
    assert {row["port"] for row in rows if row["id"] in after_switch} == {cluster.primary.port}
    print(
        f"\nfailover under load: {len(acknowledged)} writes acknowledged, {len(failed)} failed "
        f"(all begun before the event), {len(logins)} logins after the stop, {stats}"
    )


@pytest.mark.slow
async def test_sqlalchemy_engine_on_a_cluster_endpoint_writes_to_the_new_writer(
    cluster: FailoverCluster,
) -> None:
    """An engine on a cluster endpoint wants the writer: after the switch every write succeeds
    on the new primary (the old writer, back read-only, gets none)."""
    pytest.importorskip("sqlalchemy")
    from sqlalchemy import text

    engine = engine_on(cluster.pool_kwargs(), pool_size=4, max_lifetime=None)
    loop = asyncio.get_running_loop()
    results: list[tuple[float, int | None]] = []  # (loop time begun, port or None if it failed)
    stop = asyncio.Event()

    async def writer() -> None:
        while not stop.is_set():
            began = loop.time()
            try:
                async with engine.begin() as con:
                    port = await con.scalar(
                        text("INSERT INTO ledger VALUES (inet_server_port()) RETURNING port")
                    )
            except Exception:
                results.append((began, None))
            else:
                results.append((began, int(port)))
            await asyncio.sleep(0.01)

    try:
        async with engine.begin() as con:
            await con.execute(text("CREATE TABLE ledger (port int)"))
        tasks = [asyncio.ensure_future(writer()) for _ in range(4)]
        await asyncio.sleep(0.3)
        timeline = await cluster.failover(lag=1.0, old_writer="read_only")
        await asyncio.sleep(1.5)
        stop.set()
        await asyncio.gather(*tasks)
    finally:
        await engine.dispose()
    after = [port for began, port in results if began > timeline.switched_at]
    assert after, results
    assert set(after) == {cluster.primary.port}, after


# -- reader endpoints --------------------------------------------------------------------------


@pytest.mark.slow
async def test_max_lifetime_spreads_connections_onto_a_replica_added_later(
    postgres_server: PostgresServer, credential_server: CredentialServer
) -> None:
    """On a reader endpoint, max_lifetime moves connections onto a replica added later."""
    ca = trustme.CA()
    replicas = [
        RDSIAMEmulator(
            backend_host=postgres_server.host,
            backend_port=postgres_server.port,
            backend_user=postgres_server.user,
            backend_password=postgres_server.password,
            endpoint=READER,
            endpoint_port=5432,
            ca=ca,
            iam_users=[postgres_server.user],
        )
        for _ in range(2)
    ]
    for replica in replicas:
        credential_server.add_emulator(replica)
        await replica.start()
    endpoint = ReaderEndpoint([replicas[0]])
    await endpoint.start()
    common = {
        "host": endpoint.host,
        "port": endpoint.port,
        "user": postgres_server.user,
        "database": postgres_server.database,
        "ssl": replicas[0].client_ssl_context(),
        "iam": IAMAuth(signing_host=READER, signing_port=5432),
        "min_size": 4,
        "max_size": 4,
    }
    clock = ManualClock(dt.datetime.now(dt.timezone.utc))
    try:
        recycled = await asyncpg_iam.create_pool(
            **common, max_lifetime=1.5, max_lifetime_jitter=0.5, name="recycled", clock=clock
        )
        kept = await asyncpg_iam.create_pool(**common, max_lifetime=None, name="kept")
        assert recycled._connector.plan.target_session_attrs == "any"
        first = {c.backend_pid for c in replicas[0].relayed_connections()}
        assert len(first) == 8
        endpoint.add_backend(replicas[1])
        await clock.advance(2.5)  # more than one lifetime: every recycled connection retired
        await wait_for(
            lambda: (
                recycled.stats().connections_closed.get("max_lifetime", 0) >= 4
                and recycled.get_size() == 4
            )
        )
        for pool in (recycled, kept):
            assert await pool.fetchval("SELECT 1") == 1
        on_new = {c.backend_pid for c in replicas[1].relayed_connections()}
        on_old = {c.backend_pid for c in replicas[0].relayed_connections()}
        # The recycled pool's connections are spread over both; the other's all stayed put.
        assert len(on_new) >= 1
        assert len(on_old - first) >= 1
        assert len(first & on_old) == 4
        assert recycled.stats().connections_closed.get("max_lifetime", 0) >= 4
        await recycled.close()
        await kept.close()
    finally:
        await endpoint.stop()
        for replica in replicas:
            await replica.stop()


async def test_my_service_survives_a_failover(credential_server: CredentialServer) -> None:
    """The README's rehearsal: after a failover the next write lands on the new primary."""
    async with FailoverCluster(lag=1.0) as cluster:
        credential_server.add_emulator(cluster)
        kwargs = cluster.pool_kwargs(min_size=2, max_size=8)
        async with asyncpg_iam.create_pool(**kwargs) as pool:
            await pool.execute("CREATE TABLE t (x int)")
            await cluster.failover(old_writer="read_only")
            await pool.execute("INSERT INTO t VALUES (1)")
            assert pool.stats().failover_events == 1
            assert await pool.fetchval("SELECT inet_server_port()") == cluster.primary.port


@pytest.mark.parametrize("how", ["close", "terminate"])
async def test_failover_retries_stop_when_the_pool_closes(
    how: str, iam_emulator: RDSIAMEmulator, postgres_server: PostgresServer
) -> None:
    """A caller in the failover retry loop gets "pool is closing" once the pool closes, and
    no further login is made (issue 27, class 5: main kept dialling after close)."""
    clock, kwargs = _writer_kwargs_on_a_manual_clock(iam_emulator, postgres_server)
    admin = await asyncpg.connect(postgres_server.dsn)
    try:
        pool = asyncpg_iam.create_pool(**kwargs)
        await pool
        acquiring = await _acquire_retrying(pool, admin, postgres_server.dsn, "failover_closing")
        logins = iam_emulator.logins_accepted
        if how == "close":
            closing = asyncio.ensure_future(pool.close())
            await asyncio.sleep(0.1)
        else:
            pool.terminate()
        await clock.advance(1.0)  # past the backoff: main retried here
        with pytest.raises(asyncpg.InterfaceError, match="pool is closing"):
            await asyncio.wait_for(acquiring, 10)
        if how == "close":
            await asyncio.wait_for(closing, 10)
        await clock.advance(5.0)
        await asyncio.sleep(0.3)
        assert iam_emulator.logins_accepted == logins
    finally:
        await set_read_only(admin, postgres_server.dsn, on=False)
        await admin.close()


async def test_set_connect_args_to_a_writer_makes_new_connections_report_query_errors(
    iam_emulator: RDSIAMEmulator, postgres_server: PostgresServer
) -> None:
    """The connection class a connect uses follows the plan: after set_connect_args asks for
    the writer, new connections report their query errors; before, they only mark closes."""
    from asyncpg_iam._failover import _marked_classes, _reporting_classes

    kwargs = pool_kwargs(iam_emulator, postgres_server, min_size=0, max_size=1)
    async with asyncpg_iam.create_pool(**kwargs) as pool:
        async with pool.acquire() as con:
            before = type(con._con)
        del kwargs["iam"], kwargs["min_size"], kwargs["max_size"]
        pool.set_connect_args(**kwargs, target_session_attrs="read-write")
        await pool.expire_connections()
        async with pool.acquire() as con:
            after = type(con._con)
    assert before in _marked_classes.values()
    assert before not in _reporting_classes.values()
    assert after in _reporting_classes.values()
