"""The topology's pure core, router and monitor schedule, without servers (`ManualClock`)."""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Any

import pytest

import asyncpg_iam
from asyncpg_iam import AuroraTopology, ConfigurationError, IAMAuth, NoWriterError
from asyncpg_iam._auth import SigningTarget
from asyncpg_iam._topology import (
    Router,
    TopologyMonitor,
    fair_shares,
    instance_host_pattern,
    multi_az_rows,
    topology_from_rows,
)
from asyncpg_iam.testing import ManualClock

CLUSTER = "mydb.cluster-abc123.us-east-1.rds.amazonaws.com"
READER = "mydb.cluster-ro-abc123.us-east-1.rds.amazonaws.com"
PATTERN = "?.abc123.us-east-1.rds.amazonaws.com"
NOW = dt.datetime(2026, 1, 1, 12, tzinfo=dt.timezone.utc)


def _row(server_id: str, *, writer: bool = False, ago: float = 1.0, lag: float = 5.0) -> tuple:
    return (
        server_id,
        "MASTER_SESSION_ID" if writer else f"session-{server_id}",
        None if writer else lag,
        NOW - dt.timedelta(seconds=ago),
    )


def _base(host: str = CLUSTER) -> SigningTarget:
    return SigningTarget(
        host=host,
        port=5432,
        signing_host=host,
        signing_port=5432,
        user="app",
        region="us-east-1",
        region_source="the endpoint name",
        endpoint_region="us-east-1",
    )


def test_instance_pattern_comes_from_the_cluster_and_reader_names() -> None:
    """Cluster and reader endpoints give the instances' DNS suffix; other names give none."""
    assert instance_host_pattern(CLUSTER) == PATTERN
    assert instance_host_pattern(READER) == PATTERN
    assert instance_host_pattern("A.CLUSTER-X1.cn-north-1.rds.amazonaws.com.cn") == (
        "?.x1.cn-north-1.rds.amazonaws.com.cn"
    )
    assert instance_host_pattern("instance-1.abc123.us-east-1.rds.amazonaws.com") is None
    assert instance_host_pattern("db.example.com") is None


def test_rows_become_a_writer_and_readers_with_instance_names() -> None:
    """The MASTER_SESSION_ID row is the writer; the others are readers with their lag."""
    topology = topology_from_rows(
        [_row("b"), _row("a", writer=True), _row("c", lag=250.0)],
        pattern=PATTERN,
        port=5432,
        now=NOW,
    )
    assert topology.writer is not None
    assert topology.writer.id == "a"
    assert topology.writer.host == "a.abc123.us-east-1.rds.amazonaws.com"
    assert [r.id for r in topology.readers] == ["b", "c"]
    assert topology.readers[1].lag == 0.25
    assert topology.find("c") is topology.readers[1]


def test_stale_rows_are_ignored() -> None:
    """A row not updated for more than 300 s is left out."""
    topology = topology_from_rows(
        [_row("a", writer=True), _row("b", ago=301.0), _row("c", ago=299.0)],
        pattern=PATTERN,
        port=5432,
        now=NOW,
    )
    assert [r.id for r in topology.readers] == ["c"]


def test_of_several_writers_the_newest_wins() -> None:
    """When two rows claim the writer, the most recently updated one is the writer."""
    topology = topology_from_rows(
        [_row("old", writer=True, ago=20.0), _row("new", writer=True, ago=1.0), _row("r")],
        pattern=PATTERN,
        port=5432,
        now=NOW,
    )
    assert topology.writer is not None
    assert topology.writer.id == "new"
    assert [r.id for r in topology.readers] == ["r"]


def test_an_identifier_that_is_not_one_dns_label_is_dropped() -> None:
    """Identifiers with dots, spaces or other characters never become a host name."""
    topology = topology_from_rows(
        [_row("a", writer=True), _row("evil.example.com"), _row("x y"), _row("-bad"), _row("ok-2")],
        pattern=PATTERN,
        port=5432,
        now=NOW,
    )
    assert [r.id for r in topology.readers] == ["ok-2"]


def test_the_pattern_may_name_a_port() -> None:
    """A ':port' in the pattern overrides the cluster's port."""
    topology = topology_from_rows(
        [_row("a", writer=True)], pattern="?.db.internal:6432", port=5432, now=NOW
    )
    assert topology.writer is not None
    assert (topology.writer.host, topology.writer.port) == ("a.db.internal", 6432)


def test_multi_az_rows_name_the_writer_by_resource_id() -> None:
    """rds_tools.show_topology() rows become replica-status rows, the writer's by its id."""
    rows = multi_az_rows(
        [("db-A", "one.abc123.us-east-1.rds.amazonaws.com", 5432), ("db-B", "two.abc123.x", 5432)],
        "db-B",
        now=NOW,
    )
    topology = topology_from_rows(rows, pattern=PATTERN, port=5432, now=NOW)
    assert topology.writer is not None
    assert topology.writer.id == "two"
    assert [r.id for r in topology.readers] == ["one"]


async def test_settings_are_validated() -> None:
    """Unknown strategies, bad durations and patterns are configuration errors."""
    with pytest.raises(ConfigurationError, match="reader_strategy"):
        AuroraTopology(reader_strategy="random")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="refresh_interval"):
        AuroraTopology(refresh_interval=0)
    with pytest.raises(ConfigurationError, match="no_writer_timeout"):
        AuroraTopology(no_writer_timeout=float("nan"))
    with pytest.raises(ConfigurationError, match="max_reader_lag"):
        AuroraTopology(max_reader_lag=-1)
    with pytest.raises(ConfigurationError, match="resolve"):
        AuroraTopology(resolve="127.0.0.1")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="port of instance_host_pattern"):
        AuroraTopology(instance_host_pattern="?.abc.us-east-1.rds.amazonaws.com:70000")
    with pytest.raises(ConfigurationError, match="instance_host_pattern"):
        AuroraTopology(instance_host_pattern="?.abc.us-east-1.rds.amazonaws.com\n")
    with pytest.raises(ConfigurationError, match="instance_host_pattern"):
        AuroraTopology(instance_host_pattern="db.example.com")
    with pytest.raises(ConfigurationError, match="topology"):
        asyncpg_iam.create_pool(host=CLUSTER, user="app", topology="yes")


class _Con:
    """A stand-in for an open connection the router tracks (only is_closed is asked)."""

    def __init__(self) -> None:
        self.closed = False

    def is_closed(self) -> bool:
        return self.closed


def _router(role: Any = "reader", **settings: Any) -> Router:
    router = Router(_base(READER), role=role, settings=AuroraTopology(**settings))
    router.use(
        topology_from_rows(
            [_row("w", writer=True), _row("r1"), _row("r2")], pattern=PATTERN, port=5432, now=NOW
        )
    )
    return router


_HELD: list[_Con] = []  # the router tracks connections weakly


def _spread(router: Router, n: int) -> dict[str, int]:
    cons = _HELD
    for _ in range(n):
        target = router.route()
        assert target is not None
        con = _Con()
        cons.append(con)
        router.settle(target, con)
    return router.connections_by_instance()


def test_a_writer_router_dials_the_writer_instance_and_signs_for_its_name() -> None:
    """The writer's target dials its instance endpoint and signs for that name."""
    router = Router(
        _base(), role="writer", settings=AuroraTopology(resolve=lambda n, p: ("127.0.0.9", 7000))
    )
    assert router.route() is None  # no topology yet: the plan's own endpoint
    router.use(topology_from_rows([_row("w", writer=True)], pattern=PATTERN, port=5432, now=NOW))
    target = router.route()
    assert target is not None
    assert (target.host, target.port) == ("127.0.0.9", 7000)
    assert (target.signing_host, target.signing_port) == (
        "w.abc123.us-east-1.rds.amazonaws.com",
        5432,
    )
    assert (target.user, target.region) == ("app", "us-east-1")


def test_least_connections_spreads_evenly_and_fills_a_new_reader_first() -> None:
    """Ten connects over two readers give 5 and 5; a third reader gets the next ones."""
    router = _router()
    assert _spread(router, 10) == {"r1": 5, "r2": 5}
    router.use(
        topology_from_rows(
            [_row("w", writer=True), _row("r1"), _row("r2"), _row("r3")],
            pattern=PATTERN,
            port=5432,
            now=NOW,
        )
    )
    assert _spread(router, 3)["r3"] == 3


def test_round_robin_takes_readers_in_turn() -> None:
    """Round robin alternates whatever each reader holds."""
    router = _router(reader_strategy="round_robin")
    assert _spread(router, 4) == {"r1": 2, "r2": 2}


def test_lag_aware_routing_leaves_out_lagging_readers() -> None:
    """With max_reader_lag, a reader lagging more gets nothing while another is fresh."""
    router = Router(_base(READER), role="reader", settings=AuroraTopology(max_reader_lag=1.0))
    router.use(
        topology_from_rows(
            [_row("w", writer=True), _row("r1", lag=5000.0), _row("r2", lag=10.0)],
            pattern=PATTERN,
            port=5432,
            now=NOW,
        )
    )
    assert _spread(router, 4) == {"r2": 4}


def test_a_reader_that_failed_is_left_out_for_a_while() -> None:
    """After a failed connect to a reader, new connects go to the others."""
    clock = ManualClock()
    router = Router(_base(READER), role="reader", settings=AuroraTopology(), clock=clock)
    router.use(
        topology_from_rows(
            [_row("w", writer=True), _row("r1"), _row("r2")], pattern=PATTERN, port=5432, now=NOW
        )
    )
    first = router.route()
    assert first is not None
    other = router.failed(first)
    assert other is not None
    assert other.signing_host != first.signing_host
    assert all(router.route() == other for _ in range(4))


def test_prefer_reader_falls_back_to_the_writer() -> None:
    """With no reader listed, a prefer-standby pool goes to the writer."""
    router = Router(_base(), role="prefer_reader", settings=AuroraTopology())
    router.use(topology_from_rows([_row("w", writer=True)], pattern=PATTERN, port=5432, now=NOW))
    target = router.route()
    assert target is not None
    assert target.signing_host.startswith("w.")


def test_fair_shares_name_the_over_and_under_served() -> None:
    """Surplus per reader: positive over its share, negative under, balanced pools at zero."""
    shares = fair_shares({"a": 5, "b": 5, "c": 0}, ["a", "b", "c"])
    assert shares["c"] == -3
    assert sorted([shares["a"], shares["b"]]) == [1, 2]
    assert fair_shares({"a": 4, "b": 3, "c": 3}, ["a", "b", "c"]) == {"a": 0, "b": 0, "c": 0}


async def test_writer_connects_wait_for_a_confirmed_writer_then_fail_fast() -> None:
    """After a failover signal a writer connect waits; NoWriterError once none is found."""
    router = Router(_base(), role="writer", settings=AuroraTopology())
    router.use(topology_from_rows([_row("w", writer=True)], pattern=PATTERN, port=5432, now=NOW))
    router.start_search()
    waiting = asyncio.ensure_future(router.wait(5.0))
    await asyncio.sleep(0)
    assert not waiting.done()
    router.confirm_writer()
    target = await waiting
    assert target is not None
    assert target.signing_host.startswith("w.")
    router.start_search()
    router.no_writer("no writer in cluster X: the listed writer w is read-only")
    with pytest.raises(NoWriterError, match="read-only") as caught:
        await router.wait(5.0)
    assert caught.value.phase == "topology"


async def _settle() -> None:
    """Let the monitor's task run until it waits again."""
    for _ in range(20):
        await asyncio.sleep(0)


class _FakeConnection:
    def __init__(self, rows: list[tuple]) -> None:
        self.rows = rows
        self.queries = 0

    def is_closed(self) -> bool:
        return False

    def terminate(self) -> None:
        pass

    async def fetch(self, query: str, timeout: float | None = None) -> list[tuple]:
        self.queries += 1
        return self.rows


async def test_the_monitor_refreshes_on_its_schedule_and_on_a_signal() -> None:
    """30 s apart in the steady state, at once on a signal, every 0.1 s while searching,
    every second for 30 s after a new writer was found, one login for all of it."""
    clock = ManualClock(NOW)
    router = Router(_base(), role="writer", settings=AuroraTopology(), clock=clock)
    con = _FakeConnection([_row("w", writer=True), _row("r")])
    opened: list[tuple[Any, str]] = []

    async def open_connection(target: Any, attrs: str, timeout: float) -> tuple[Any, float]:
        opened.append((target, attrs))
        return con, 0.0

    monitor = TopologyMonitor(
        router, open_connection=open_connection, retire=None, name="t", clock=clock
    )
    await monitor.start()
    try:
        assert monitor.refreshes == 1
        assert len(opened) == 1
        assert monitor.next_interval() == 30.0
        await _settle()
        await clock.advance(29.0)
        await _settle()
        assert monitor.refreshes == 1
        await clock.advance(1.5)
        await _settle()
        assert monitor.refreshes == 2
        con.rows = [_row("r", writer=True), _row("w")]
        monitor.signal("connection_lost")
        assert router.searching
        assert monitor.next_interval() == 0.1
        await _settle()
        assert monitor.refreshes == 3
        assert not router.searching  # the new writer accepted the read-write probe
        assert opened[-1][1] == "read-write"
        assert opened[-1][0].signing_host.startswith("r.")
        assert monitor.next_interval() == 1.0
        await clock.advance(31.0, step=1.0)
        assert monitor.next_interval() == 30.0
        assert monitor.logins == 2
    finally:
        await monitor.aclose()


async def test_a_cluster_without_topology_functions_stays_on_dns() -> None:
    """No aurora_replica_status() and no rds_tools: no error, no routing, no task."""
    import asyncpg

    class _Plain(_FakeConnection):
        async def fetch(self, query: str, timeout: float | None = None) -> list[tuple]:
            raise asyncpg.UndefinedFunctionError("function does not exist")

        async def fetchval(self, query: str, timeout: float | None = None) -> Any:
            raise asyncpg.UndefinedFunctionError("function does not exist")

    async def open_connection(target: Any, attrs: str, timeout: float) -> tuple[Any, float]:
        return _Plain([]), 0.0

    router = Router(_base(), role="writer", settings=AuroraTopology())
    monitor = TopologyMonitor(router, open_connection=open_connection, retire=None, name="t")
    await monitor.start()
    assert monitor.available is False
    assert monitor._task is None
    assert router.route() is None


async def test_topology_applies_to_cluster_and_reader_endpoints_only() -> None:
    """Instance endpoints, custom endpoints, other names, topology=False: no router."""

    def router_of(host: str, **kwargs: Any) -> Router | None:
        pool = asyncpg_iam.create_pool(host=host, user="app", **kwargs)
        return pool._connector.router

    assert router_of(CLUSTER) is not None
    assert router_of(CLUSTER).role == "writer"
    assert router_of(READER).role == "reader"
    assert router_of(CLUSTER, target_session_attrs="read-only").role == "reader"
    assert router_of(CLUSTER, topology=False) is None
    assert router_of("instance-1.abc123.us-east-1.rds.amazonaws.com") is None
    assert router_of("x.cluster-custom-abc123.us-east-1.rds.amazonaws.com") is None
    assert router_of("db.example.com", iam=IAMAuth(region="us-east-1")) is None
    # A tunnel: dialling another name than it signs for needs resolve=.
    assert router_of("127.0.0.1", iam=IAMAuth(signing_host=CLUSTER)) is None
    resolve = AuroraTopology(resolve=lambda name, port: ("127.0.0.1", port))
    assert router_of("127.0.0.1", iam=IAMAuth(signing_host=CLUSTER), topology=resolve)
