"""Aurora as a topology, on the test bed: instance endpoints, failover without DNS, readers.

The rehearsal is `asyncpg_iam.testing.AuroraCluster`: a writer and streaming replicas, each
behind the RDS IAM emulator under an instance endpoint name of its own, answering
``aurora_replica_status()``; cluster and reader endpoints with DNS lag in front.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
import pytest_asyncio

import asyncpg_iam
from asyncpg_iam.testing import AuroraCluster, CredentialServer
from tests._support import engine_on


@pytest_asyncio.fixture
async def cluster(credential_server: CredentialServer) -> AsyncIterator[AuroraCluster]:
    """Provide a started AuroraCluster (a writer, one replica, DNS lag 20 s)."""
    async with AuroraCluster(replicas=1, lag=20.0) as started:
        credential_server.add_emulator(started)
        yield started


async def test_the_pool_learns_the_topology_and_dials_the_writer_instance(
    cluster: AuroraCluster,
) -> None:
    """A pool on the cluster endpoint reads the topology and connects to the writer's
    instance endpoint, with tokens signed for that instance's name."""
    async with asyncpg_iam.create_pool(**cluster.pool_kwargs(min_size=2, max_size=4)) as pool:
        on = await pool.fetchval("SELECT aurora_db_instance_identifier()")
        stats = pool.stats()
    writer = cluster.writer_instance
    assert on == writer.id
    assert stats.topology_refreshes >= 1
    assert stats.connections_by_instance == {writer.id: 2}
    # The monitor's first login went through the cluster endpoint; the pool's did not.
    assert sum(cluster.writer.connections_by_backend.values()) == 1
    accepted = [r for r in writer.emulator.records if r.accepted]
    by_alias = [r for r in accepted if "alias" in r.detail]
    assert len(accepted) - len(by_alias) >= 2  # signed for the instance's own name


@dataclasses.dataclass
class _Write:
    began: float
    ended: float
    ok: bool
    error: str = ""


async def _write_load(pool: Any, writes: list[_Write], stop: asyncio.Event, n: int) -> None:
    """Run `n` writers until `stop`, recording each write (loop times) and its outcome."""
    loop = asyncio.get_running_loop()

    async def writer() -> None:
        while not stop.is_set():
            began = loop.time()
            try:
                await pool.execute("INSERT INTO writes (at) VALUES (now())")
            except Exception as exc:
                writes.append(_Write(began, loop.time(), False, type(exc).__name__))
                await asyncio.sleep(0.01)
            else:
                writes.append(_Write(began, loop.time(), True))
                await asyncio.sleep(0.005)

    await asyncio.gather(*(writer() for _ in range(n)))


async def _first(condition: Any, timeout: float = 60.0) -> float:
    """Return the loop time at which `condition()` first held (polled every 10 ms)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            pytest.fail(f"condition not met within {timeout} s")
        await asyncio.sleep(0.01)
    return loop.time()


async def _until(condition: Any, timeout: float) -> None:
    """Poll `condition()` every 10 ms until it holds or `timeout` s pass (the caller asserts)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            return
        await asyncio.sleep(0.01)


async def test_topology_shows_in_stats_and_opentelemetry(cluster: AuroraCluster) -> None:
    """Refreshes and connections per instance reach PoolStats and the OpenTelemetry metrics."""
    pytest.importorskip("opentelemetry.sdk")
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    from asyncpg_iam.otel import instrument_pool

    reader = InMemoryMetricReader()
    kwargs = cluster.pool_kwargs(reader=True, min_size=3, max_size=3)
    async with asyncpg_iam.create_pool(**kwargs) as pool:
        instrument_pool(pool, meter_provider=MeterProvider(metric_readers=[reader]))
        stats = pool.stats()
        data = reader.get_metrics_data()
    assert data is not None
    metrics = {m.name: m for r in data.resource_metrics for s in r.scope_metrics for m in s.metrics}
    by_instance = {
        p.attributes["asyncpg_iam.instance.id"]: p.value
        for p in metrics["asyncpg_iam.connections.by_instance"].data.data_points
    }
    refreshes = list(metrics["asyncpg_iam.topology.refreshes"].data.data_points)
    assert by_instance == stats.connections_by_instance == {"instance-2": 3}
    assert refreshes[0].value == stats.topology_refreshes >= 1


async def test_failover_reaches_the_new_writer_without_waiting_for_dns(
    cluster: AuroraCluster,
) -> None:
    """With a 20 s DNS lag, writes reach the promoted instance through its instance endpoint,
    never through the cluster endpoint's stale DNS: no write begun after the pool's failover
    signal fails, and the logins from the old writer's stop to the first write on the new one
    stay within twice the pool size (the time to that write is the failover benchmark's)."""
    kwargs = cluster.pool_kwargs(min_size=10, max_size=10)
    async with asyncpg_iam.create_pool(**kwargs) as pool:
        await pool.execute("CREATE TABLE writes (at timestamptz)")
        writes: list[_Write] = []
        stop = asyncio.Event()
        load = asyncio.ensure_future(_write_load(pool, writes, stop, 16))
        await _first(lambda: sum(w.ok for w in writes) > 50)
        logins_before = cluster.logins()
        failover = asyncio.ensure_future(cluster.failover(old_writer="down"))
        signalled = await _first(lambda: pool.stats().failover_events > 0)
        promoted_by = await _first(lambda: cluster.writer_instance.id != "instance-1")
        await _first(lambda: any(w.ok and w.began > promoted_by for w in writes))
        logins = cluster.logins() - logins_before
        on = await pool.fetchval("SELECT aurora_db_instance_identifier()")
        await asyncio.sleep(1.0)
        stop.set()
        await load
        await failover  # the DNS switch, 20 s after the promotion
    assert on == "instance-2"
    failed_after_signal = [w for w in writes if not w.ok and w.began >= signalled]
    assert failed_after_signal == []
    assert logins <= 2 * 10, logins
    # Only the monitor's first login went through the cluster endpoint: the pool never waited
    # for its DNS (which would have sent connections to instance-2 through it).
    assert sum(cluster.writer.connections_by_backend.values()) == 1


async def test_sqlalchemy_engine_follows_the_topology_through_a_failover(
    cluster: AuroraCluster,
) -> None:
    """An engine on the cluster endpoint reads the topology through the same Connector as the
    pool: it dials the writer's instance endpoint, and after a failover reaches the promoted
    instance while DNS (20 s lag) still names the old one."""
    pytest.importorskip("sqlalchemy")
    from sqlalchemy import text

    kwargs = cluster.pool_kwargs()
    engine = engine_on(kwargs, topology=kwargs["topology"], pool_size=2, max_lifetime=None)
    query = text("SELECT aurora_db_instance_identifier()")
    try:
        async with engine.connect() as con:
            before = await con.scalar(query)
        failover = asyncio.ensure_future(cluster.failover(old_writer="down"))
        await _first(lambda: cluster.writer_instance.id != "instance-1")
        loop = asyncio.get_running_loop()
        # A generous deadline: the assertions are on where the writes landed, not when.
        after, deadline = None, loop.time() + 120.0
        while after != "instance-2" and loop.time() < deadline:
            with contextlib.suppress(Exception):
                async with engine.begin() as con:
                    await con.execute(text("CREATE TABLE IF NOT EXISTS t (x int)"))
                    after = await con.scalar(query)
            await asyncio.sleep(0.1)
        await failover  # the DNS switch, 20 s after the promotion
    finally:
        await engine.dispose()
    assert before == "instance-1"
    assert after == "instance-2"
    # Only the monitor's first login went through the cluster endpoint's name: the engine
    # reached instance-2 through its instance endpoint, not through DNS once it moved.
    assert sum(cluster.writer.connections_by_backend.values()) == 1


async def _write_until_refused(pool: Any) -> None:
    """Write every 0.1 s for 10 s; a lost connection (the restart) is not the answer."""
    for _ in range(100):
        with contextlib.suppress(asyncpg.ConnectionDoesNotExistError, ConnectionError):
            await pool.execute("CREATE TABLE IF NOT EXISTS t (x int)")
        await asyncio.sleep(0.1)


async def test_the_topology_functions_answer_schema_qualified(
    credential_server: CredentialServer,
) -> None:
    """The topology functions answer schema-qualified in pg_catalog, on the writer and a
    replica, as AWS's wrappers query them."""
    async with AuroraCluster(replicas=1) as aurora:
        credential_server.add_emulator(aurora)
        for instance in aurora.instances.values():
            con = await asyncpg.connect(instance.server.dsn, ssl=False)
            try:
                rows = await con.fetch(
                    "SELECT server_id, session_id = 'MASTER_SESSION_ID' AS writer "
                    "FROM pg_catalog.aurora_replica_status() ORDER BY server_id"
                )
                on = await con.fetchval("SELECT pg_catalog.aurora_db_instance_identifier()")
            finally:
                await con.close()
            assert [tuple(r) for r in rows] == [("instance-1", True), ("instance-2", False)]
            assert on == instance.id


async def test_a_cluster_left_without_a_writer_fails_fast(
    credential_server: CredentialServer,
) -> None:
    """A lone writer back read-only: connects fail with NoWriterError (not a timeout after
    the whole connect timeout), after a handful of logins rather than a retry loop."""
    async with AuroraCluster(replicas=0) as lone:
        credential_server.add_emulator(lone)
        topology = asyncpg_iam.AuroraTopology(no_writer_timeout=1.0)
        kwargs = lone.pool_kwargs(min_size=1, max_size=2, topology=topology, timeout=60)
        async with asyncpg_iam.create_pool(**kwargs) as pool:
            await pool.execute("SELECT 1")
            await lone.restart("instance-1", read_only=True)
            logins_before = lone.logins()
            with pytest.raises(asyncpg_iam.NoWriterError, match="read-only"):
                await _write_until_refused(pool)
            logins = lone.logins() - logins_before
    # The monitor's writer probes (one a second per candidate) and the pool's logins before
    # its failover signal; retrying for the 60 s connect timeout would log in again and again.
    print(f"{logins} logins before NoWriterError")
    assert logins <= 10, logins


@pytest_asyncio.fixture
async def readers(credential_server: CredentialServer) -> AsyncIterator[AuroraCluster]:
    """Provide a started AuroraCluster with two replicas."""
    async with AuroraCluster(replicas=2, lag=20.0) as started:
        credential_server.add_emulator(started)
        yield started


async def _read_load(pool: Any, stop: asyncio.Event, failures: list[str], n: int = 3) -> None:
    async def reader() -> None:
        while not stop.is_set():
            try:
                await pool.fetchval("SELECT pg_sleep(0.02)")
            except Exception as exc:
                failures.append(type(exc).__name__)
            await asyncio.sleep(0.01)

    await asyncio.gather(*(reader() for _ in range(n)))


async def test_readers_share_the_pool_and_a_new_replica_gets_its_share(
    readers: AuroraCluster,
) -> None:
    """A pool of 10 on the reader endpoint: neither reader holds more than 6 at start; a
    third replica added later gets at least 25 % of the connections on the default settings
    (how soon is the failover benchmark's figure)."""
    kwargs = readers.pool_kwargs(reader=True, min_size=10, max_size=10)
    async with asyncpg_iam.create_pool(**kwargs) as pool:
        start = pool.stats().connections_by_instance
        assert sorted(start) == ["instance-2", "instance-3"]
        assert max(start.values()) <= 6
        stop, failures = asyncio.Event(), []
        load = asyncio.ensure_future(_read_load(pool, stop, failures))
        added = await readers.add_replica()

        def share() -> float:
            counts = pool.stats().connections_by_instance
            return counts.get(added.id, 0) / max(sum(counts.values()), 1)

        # A generous deadline: the assertion is on the share, not on when it was reached.
        await _until(lambda: share() >= 0.25, timeout=180.0)
        reached = share()
        stop.set()
        await load
        stats = pool.stats()
    assert reached >= 0.25, reached
    assert failures == []
    assert stats.failover_events == 0
    assert stats.connections_closed.get("topology", 0) >= 2


async def test_a_reader_that_leaves_costs_only_its_in_flight_queries(
    readers: AuroraCluster,
) -> None:
    """Removing a replica fails at most the queries running on it; the pool sees no failover
    and keeps its connections to the other reader."""
    kwargs = readers.pool_kwargs(reader=True, min_size=6, max_size=6)
    async with asyncpg_iam.create_pool(**kwargs) as pool:
        stop, failures = asyncio.Event(), []
        load = asyncio.ensure_future(_read_load(pool, stop, failures, n=4))
        await asyncio.sleep(0.5)
        before = pool.stats()
        await readers.remove_replica("instance-3")
        await asyncio.sleep(2.0)
        stop.set()
        await load
        after = pool.stats()
        on = {await pool.fetchval("SELECT aurora_db_instance_identifier()") for _ in range(6)}
    assert before.connections_by_instance.get("instance-3", 0) >= 1
    assert len(failures) <= 4  # at most one query per worker was running on it
    assert after.failover_events == 0
    assert after.connections_closed.get("failover", 0) == 0
    assert on == {"instance-2"}


async def test_my_service_writes_through_an_aurora_failover(
    credential_server: CredentialServer,
) -> None:
    """The guide's rehearsal: a write after the failover lands on the promoted instance."""
    async with AuroraCluster(replicas=1, lag=20.0) as cluster:
        credential_server.add_emulator(cluster)
        kwargs = cluster.pool_kwargs(min_size=2, max_size=8)
        async with asyncpg_iam.create_pool(**kwargs) as pool:
            await pool.execute("CREATE TABLE t (x int)")
            failover = asyncio.ensure_future(cluster.failover())
            # Long before the cluster endpoint's DNS moves, writes reach the new writer.
            await cluster.promoted.wait()
            await pool.execute("INSERT INTO t VALUES (1)")
            assert not failover.done()
            on = await pool.fetchval("SELECT aurora_db_instance_identifier()")
            assert on == cluster.writer_instance.id
            await failover


async def test_set_connect_args_plans_the_topology_again(cluster: AuroraCluster) -> None:
    """A writer pool switched to read-only by set_connect_args routes to the reader."""
    async with asyncpg_iam.create_pool(**cluster.pool_kwargs(min_size=1, max_size=2)) as pool:
        assert await pool.fetchval("SELECT aurora_db_instance_identifier()") == "instance-1"
        pool.set_connect_args(
            host=cluster.writer.host,
            port=cluster.writer.port,
            user=cluster.user,
            database=cluster.database,
            ssl=cluster.client_ssl_context(),
            target_session_attrs="read-only",
        )
        await pool.expire_connections()
        await _first(lambda: pool.stats().topology_refreshes >= 1)
        on = await pool.fetchval("SELECT aurora_db_instance_identifier()")
    assert on == "instance-2"


async def test_a_new_replica_is_used_before_the_reader_endpoint_lists_it(
    credential_server: CredentialServer,
) -> None:
    """With the reader endpoint's DNS not yet listing it, the topology already sends
    connections to a replica added to the cluster."""
    # The reader endpoint's DNS moves after 600 s: never within this test.
    async with AuroraCluster(replicas=1, reader_lag=600.0) as lagging:
        credential_server.add_emulator(lagging)
        topology = asyncpg_iam.AuroraTopology(refresh_interval=1.0)
        kwargs = lagging.pool_kwargs(reader=True, min_size=4, max_size=4, topology=topology)
        async with asyncpg_iam.create_pool(**kwargs) as pool:
            added = await lagging.add_replica()
            await _first(
                lambda: pool.stats().connections_by_instance.get(added.id, 0) >= 1, timeout=120.0
            )
            assert len(lagging.reader.backends) == 1  # DNS has not moved


async def test_close_and_terminate_stop_the_topology_monitor(cluster: AuroraCluster) -> None:
    """Pool.close() and Pool.terminate() stop the topology's background refresh, as they stop
    the other monitors: no refresh task outlives the pool."""

    def refreshers() -> set[asyncio.Task[Any]]:
        return {t for t in asyncio.all_tasks() if t.get_name().startswith("asyncpg_iam topology")}

    for end in ("close", "terminate"):
        pool = await asyncpg_iam.create_pool(**cluster.pool_kwargs(min_size=1, max_size=1))
        running = refreshers()
        assert running, "the monitor refreshes in the background while the pool is open"
        if end == "close":
            await pool.close()
        else:
            pool.terminate()
        _, pending = await asyncio.wait(running, timeout=10.0)
        assert pending == set(), end
