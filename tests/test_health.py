"""Silent hosts: a server that stops answering without closing its connections.

Pure parts on a `ManualClock` with a scripted probe; then both real forms: a hung server (the
test bed's forwarder goes silent: sockets stay open and acknowledged, nothing is relayed) and
a lost network path (packets dropped by nftables between two network namespaces); and the
server that is only busy, which must retire nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import sys
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import asyncpg
import pytest
import pytest_asyncio

import asyncpg_iam
from asyncpg_iam import ConfigurationError, HealthCheck
from asyncpg_iam._asyncpg_pool import received_within
from asyncpg_iam._health import (
    HealthMonitor,
    probe_host,
)
from asyncpg_iam.testing import (
    ClusterEndpoint,
    CredentialServer,
    FailoverCluster,
    ManualClock,
    NetworkPartition,
    PostgresCluster,
    PostgresNotFoundError,
    PostgresServer,
    find_postgres_bin,
)
from tests._support import direct_kwargs, wait_for

HOST = ("10.0.0.1", 5432)  # only a key here: nothing dials it
# Generous bounds for real waits on a loaded machine; the benchmark measures the real figures.
DETECTED_WITHIN = 30.0


# -- settings ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"interval": 0},
        {"timeout": -1.0},
        {"interval": float("inf")},
        {"count": 0},
        {"count": 1.5},
        {"count": True},
        {"tcp_user_timeout": 1.0},
        {"timeout": "1"},
    ],
)
def test_health_check_refuses_settings_that_cannot_work(kwargs: dict[str, Any]) -> None:
    """Each HealthCheck setting outside its range is a ConfigurationError naming it."""
    with pytest.raises(ConfigurationError, match=next(iter(kwargs))):
        HealthCheck(**kwargs)


def test_pool_refuses_a_health_check_that_is_not_one() -> None:
    """health_check takes a HealthCheck or None, nothing else."""
    with pytest.raises(ConfigurationError, match="health_check"):
        asyncpg_iam.create_pool(host="localhost", iam=False, health_check=3)  # type: ignore[arg-type]


def test_default_detection_time_is_within_the_target() -> None:
    """On defaults a silent host with connections in use is found within 5 s."""
    assert HealthCheck().detection_time <= 5.0
    assert HealthCheck(interval=2, timeout=3, count=2).detection_time == 9.0


@pytest.mark.skipif(not hasattr(socket, "TCP_USER_TIMEOUT"), reason="Linux socket option")
@pytest.mark.parametrize("health_check", [HealthCheck(), None])
async def test_each_connection_socket_gets_keepalive_and_a_user_timeout(
    postgres_server: PostgresServer, health_check: HealthCheck | None
) -> None:
    """With the health check on, a connection's socket has keepalive and TCP_USER_TIMEOUT
    (10 s); with it off, the kernel's defaults."""
    kwargs = direct_kwargs(postgres_server, min_size=1, max_size=1, health_check=health_check)
    async with asyncpg_iam.create_pool(**kwargs) as pool, pool.acquire() as con:
        sock = con._con._transport.get_extra_info("socket")
        user_timeout = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT)
        keepalive = sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)
    if health_check is None:
        assert (user_timeout, keepalive) == (0, 0)
    else:
        assert (user_timeout, keepalive) == (10_000, 1)


@pytest.mark.skipif(not hasattr(socket, "TCP_USER_TIMEOUT"), reason="Linux socket option")
@pytest.mark.parametrize("loop_name", ["asyncio", "uvloop"])
def test_a_connect_makes_at_most_one_socket_object_for_its_options(
    postgres_server: PostgresServer, monkeypatch: pytest.MonkeyPatch, loop_name: str
) -> None:
    """Reading a new connection's peer and setting its socket options make at most one socket
    object, on asyncio and on uvloop (whose transport socket makes one per call), and leave the
    connection's socket open and tuned."""
    if loop_name == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        loop = uvloop.new_event_loop()
    else:
        loop = asyncio.new_event_loop()
    made: list[object] = []
    init = socket.socket.__init__

    def counted(self: socket.socket, *args: Any, **kwargs: Any) -> None:
        made.append(self)
        init(self, *args, **kwargs)

    async def per_connect(health_check: HealthCheck | None) -> tuple[int, tuple[int, int]]:
        kwargs = direct_kwargs(postgres_server, min_size=0, max_size=1, health_check=health_check)
        async with asyncpg_iam.create_pool(**kwargs) as pool:
            with monkeypatch.context() as patch:
                patch.setattr(socket.socket, "__init__", counted)
                made.clear()
                async with pool.acquire() as con:
                    objects = len(made)
                    assert await con.fetchval("SELECT 1") == 1  # its socket is still open
                    sock = con._con._transport.get_extra_info("socket")
                    options = (
                        sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT),
                        sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
                    )
        return objects, options

    try:
        checked, tuned = loop.run_until_complete(per_connect(HealthCheck()))
        unchecked, untuned = loop.run_until_complete(per_connect(None))
    finally:
        loop.close()
    assert (tuned, untuned) == ((10_000, 1), (0, 0))
    assert checked - unchecked <= 1


# -- the monitor, on a manual clock -------------------------------------------------------------


class _Scripted:
    """A probe whose answer the test sets: None (answered) or why not."""

    def __init__(self) -> None:
        self.answer: str | None = None
        self.answers: dict[tuple[str, int], str | None] = {}  # per host, over `answer`
        self.calls: list[tuple[str, int]] = []

    async def __call__(self, host: str, port: int, timeout: float) -> str | None:
        self.calls.append((host, port))
        return self.answers.get((host, port), self.answer)


def _monitor(
    clock: ManualClock,
    probe: _Scripted,
    in_use: set[tuple[str, int]],
    events: list[Any],
    heard: set[tuple[str, int]] | None = None,
) -> HealthMonitor:
    return HealthMonitor(
        HealthCheck(interval=1.0, timeout=1.0, count=3),
        hosts_in_use=lambda: set(in_use),
        on_silent=lambda host, label, cause: events.append(("silent", host, cause)),
        on_answering=lambda host, label: events.append(("answering", host)),
        clock=clock,
        probe=probe,
        heard_from=None if heard is None else (lambda host, seconds: host in heard),
    )


async def test_a_host_is_silent_after_count_unanswered_probes_in_a_row() -> None:
    """The first probe waits one interval; three unanswered probes in a row declare the host
    silent, once; fewer do not."""
    clock, probe = ManualClock(), _Scripted()
    events: list[Any] = []
    monitor = _monitor(clock, probe, {HOST}, events)
    monitor._labels[HOST] = "db:5432"  # as track() records it
    monitor.start()
    try:
        await clock.advance(0.5, step=0.5)
        assert probe.calls == []  # the connect that started it has just been answered
        await clock.advance(3.0, step=0.5)
        assert len(probe.calls) >= 3
        assert events == []
        probe.answer = "no TCP connection within 1 s"
        await clock.advance(1.0, step=0.5)
        await clock.advance(1.0, step=0.5)
        assert events == []  # two in a row
        probe.answer = None
        await clock.advance(1.0, step=0.5)  # an answer starts the count again
        probe.answer = "no answer to an encryption request within 1 s"
        await clock.advance(2.0, step=0.5)
        assert events == []
        await clock.advance(1.0, step=0.5)
        assert events == [
            (
                "silent",
                HOST,
                "3 probes in a row unanswered, the last: "
                "no answer to an encryption request within 1 s",
            )
        ]
        await clock.advance(5.0, step=0.5)
        assert len(events) == 1
        assert monitor.silent_events == 1
        assert monitor.silent_hosts == ["db:5432"]
    finally:
        monitor.stop()


async def test_a_host_heard_from_gets_no_probe_until_it_falls_quiet() -> None:
    """While a connection on a host in use receives data, the host counts as answered and
    gets no probe, whatever a probe would say; once nothing comes, probes resume and three
    unanswered ones declare it silent."""
    clock, probe = ManualClock(), _Scripted()
    events: list[Any] = []
    heard = {HOST}
    monitor = _monitor(clock, probe, {HOST}, events, heard)
    monitor._labels[HOST] = "db:5432"
    monitor.start()
    try:
        probe.answer = "no TCP connection within 1 s"
        await clock.advance(6.0, step=0.5)
        assert probe.calls == []
        assert monitor.probes == 0
        assert monitor.probes_skipped >= 4
        assert events == []
        heard.clear()
        await clock.advance(4.0, step=0.5)
        assert len(probe.calls) >= 3
        assert [e[0] for e in events] == ["silent"]
    finally:
        monitor.stop()


async def test_only_hosts_in_use_are_probed_and_a_silent_one_until_it_answers() -> None:
    """No connection in use, no probe; a silent host is probed until it answers, then let go."""
    clock, probe = ManualClock(), _Scripted()
    events: list[Any] = []
    in_use: set[tuple[str, int]] = set()
    monitor = _monitor(clock, probe, in_use, events)
    monitor._labels[HOST] = "db:5432"
    monitor.start()
    try:
        await clock.advance(5.0, step=0.5)
        assert probe.calls == []
        in_use.add(HOST)
        probe.answer = "no TCP connection within 1 s"
        await clock.advance(4.0, step=0.5)
        assert [e[0] for e in events] == ["silent"]
        in_use.clear()  # its connections were retired: still probed while silent
        probed = len(probe.calls)
        await clock.advance(3.0, step=0.5)
        assert len(probe.calls) >= probed + 2
        probe.answer = None
        await clock.advance(1.0, step=0.5)
        assert [e[0] for e in events] == ["silent", "answering"]
        assert not monitor.is_silent(HOST)
        probed = len(probe.calls)
        await clock.advance(5.0, step=0.5)
        assert len(probe.calls) == probed  # nothing in use, nothing silent: no probes
    finally:
        monitor.stop()


async def test_logins_to_a_silent_host_wait_until_it_answers() -> None:
    """The login gate is free normally, and while a host is silent holds logins to the name
    that led there until a probe is answered."""
    clock, probe = ManualClock(), _Scripted()
    events: list[Any] = []
    monitor = _monitor(clock, probe, {HOST}, events)
    monitor._labels[HOST] = "db:5432"
    monitor._dialled[("db", 5432)] = {HOST}
    assert monitor.login_gate("db", 5432) is None
    monitor.start()
    try:
        probe.answer = "no TCP connection within 1 s"
        await clock.advance(4.0, step=0.5)
        assert monitor.is_silent(HOST)
        assert monitor.login_gate("elsewhere", 5432) is None
        gate = monitor.login_gate("db", 5432)
        assert gate is not None
        waiting = asyncio.ensure_future(gate)
        await clock.advance(3.0, step=0.5)
        assert not waiting.done()
        probe.answer = None
        await clock.advance(1.0, step=0.5)
        await asyncio.wait_for(waiting, 1.0)
        assert monitor.login_gate("db", 5432) is None
    finally:
        monitor.stop()


async def test_logins_go_ahead_once_the_name_leads_to_a_host_that_answers() -> None:
    """A name whose last host went silent but which now answers (DNS moved it) holds no login,
    while the old host stays silent."""
    clock, probe = ManualClock(), _Scripted()
    events: list[Any] = []
    monitor = _monitor(clock, probe, {HOST}, events)
    monitor._labels[HOST] = "db (10.0.0.1:5432)"
    monitor._dialled[("db", 5432)] = {HOST}
    monitor.start()
    try:
        probe.answer = "no TCP connection within 1 s"
        await clock.advance(4.0, step=0.5)
        gate = monitor.login_gate("db", 5432)
        assert gate is not None
        waiting = asyncio.ensure_future(gate)
        probe.answers[("db", 5432)] = None  # the name answers; the old address does not
        await clock.advance(1.0, step=0.5)
        await asyncio.wait_for(waiting, 1.0)
        assert monitor.is_silent(HOST)
        assert monitor.login_gate("db", 5432) is None
    finally:
        monitor.stop()


async def test_probe_reports_a_port_that_accepts_and_never_answers() -> None:
    """A listener that accepts and says nothing (a hung server) fails the probe; PostgreSQL's
    own answer passes it."""
    held: list[asyncio.StreamWriter] = []

    async def hold(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        cause = await probe_host("127.0.0.1", port, 0.3)
        assert cause is not None
        assert "no answer to an encryption request" in cause
    finally:
        server.close()
        for writer in held:
            writer.close()


async def test_probe_passes_on_a_real_postmaster(postgres_server: PostgresServer) -> None:
    """The postmaster answers the probe's GSSENCRequest (no login)."""
    assert await probe_host(postgres_server.host, postgres_server.port, 5.0) is None


async def test_probes_leave_no_line_in_a_tls_servers_log() -> None:
    """A server with TLS on logs nothing for the probe (it logs a hung-up SSLRequest, which
    is why the probe sends a GSSENCRequest)."""
    try:
        find_postgres_bin()
    except PostgresNotFoundError as exc:
        pytest.skip(f"needs a local PostgreSQL to read its log: {exc}")
    server = PostgresCluster()
    try:
        await asyncio.to_thread(server.start)
        log = server.data_dir.parent / "postgres.log"
        before = log.read_text()
        for _ in range(3):
            assert await probe_host(server.host, server.port, 5.0) is None
        reader, writer = await asyncio.open_connection(server.host, server.port)
        writer.write(struct.pack("!ii", 8, 80877103))  # an SSLRequest, then hang up
        assert await reader.read(1) == b"S"
        writer.transport.abort()
        for _ in range(250):
            if "could not accept SSL connection" in log.read_text()[len(before) :]:
                break
            await asyncio.sleep(0.02)
        new = log.read_text()[len(before) :]
        assert new.count("could not accept SSL connection") == 1, new
        assert new.count("LOG:") == 1, new
    finally:
        await asyncio.to_thread(server.stop)


# -- a hung writer (the forwarder goes silent) --------------------------------------------------


@pytest_asyncio.fixture
async def cluster(credential_server: CredentialServer) -> AsyncIterator[FailoverCluster]:
    """Provide a started FailoverCluster trusting the credential server's keys."""
    async with FailoverCluster(lag=1.0) as started:
        credential_server.add_emulator(started)
        yield started


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.WARNING and r.name.startswith("asyncpg_iam")
    ]


async def _all_pids(pool: Any) -> set[int]:
    """Return the server pids of every connection of a full pool (min_size = max_size)."""
    async with contextlib.AsyncExitStack() as stack:
        cons = [await stack.enter_async_context(pool.acquire()) for _ in range(pool.get_max_size())]
        return {con.get_server_pid() for con in cons}


async def _in_flight(pool: Any, n: int) -> tuple[list[asyncio.Task[Any]], set[int]]:
    """Start `n` long queries on their own connections; return them and their server pids."""
    started = asyncio.Event()
    pids: set[int] = set()

    async def query() -> Any:
        async with pool.acquire() as con:
            pids.add(con.get_server_pid())
            if len(pids) == n:
                started.set()
            return await con.fetchval("SELECT pg_sleep(60)")

    queries = [asyncio.ensure_future(query()) for _ in range(n)]
    await asyncio.wait_for(started.wait(), 10)
    await asyncio.sleep(0.3)  # the queries are on the wire
    return queries, pids


async def test_a_hung_writer_fails_queries_and_counts_as_a_failover(
    cluster: FailoverCluster, caplog: pytest.LogCaptureFixture
) -> None:
    """A writer that accepts and acknowledges but answers nothing: its queries in flight fail
    with ConnectionDoesNotExistError, one WARNING names the host and the cause, the pool counts
    a failover, its idle connections are never handed out, and it serves once the host is
    back."""
    caplog.set_level(logging.INFO, logger="asyncpg_iam")
    kwargs = cluster.pool_kwargs(min_size=4, max_size=4)
    async with asyncpg_iam.create_pool(**kwargs) as pool:
        assert pool.settings.target_session_attrs == "read-write"
        old = await _all_pids(pool)
        queries, _ = await _in_flight(pool, 2)
        cluster.writer.silence()
        results = await asyncio.wait_for(
            asyncio.gather(*queries, return_exceptions=True), DETECTED_WITHIN
        )
        assert all(isinstance(r, asyncpg.ConnectionDoesNotExistError) for r in results), results
        warnings = _warnings(caplog)
        assert len(warnings) == 1, warnings
        writer = f"{cluster.writer.host}:{cluster.writer.port}"
        assert writer in warnings[0]
        assert "silent" in warnings[0]
        assert "probes" in warnings[0]
        stats = pool.stats()
        assert stats.failover_events == 1
        assert stats.silent_hosts == 1
        assert stats.failover_retired == 4  # the two busy ones and the two idle ones
        cluster.writer.resume()
        pid = await asyncio.wait_for(pool.fetchval("SELECT pg_backend_pid()"), DETECTED_WITHIN)
        assert pid not in old  # no connection from before the silence is handed out
        assert len(_warnings(caplog)) == 1


async def test_a_silent_host_of_a_reader_pool_retires_only_its_connections(
    postgres_server: PostgresServer, caplog: pytest.LogCaptureFixture
) -> None:
    """On a pool that does not want the writer, a silent host retires only the connections on
    it, and is no failover."""
    caplog.set_level(logging.WARNING, logger="asyncpg_iam")
    backend = (postgres_server.host, postgres_server.port)
    async with ClusterEndpoint(backend) as first, ClusterEndpoint(backend) as second:
        kwargs = direct_kwargs(postgres_server, host=first.host, port=first.port)
        async with asyncpg_iam.create_pool(**kwargs, min_size=0, max_size=4) as pool:
            queries, _ = await _in_flight(pool, 2)
            pool.set_connect_args(
                host=second.host,
                port=second.port,
                user=postgres_server.user,
                password=postgres_server.password,
                database=postgres_server.database,
            )
            async with pool.acquire() as a, pool.acquire() as b:
                on_second = {a.get_server_pid(), b.get_server_pid()}
            first.silence()
            results = await asyncio.wait_for(
                asyncio.gather(*queries, return_exceptions=True), DETECTED_WITHIN
            )
            assert all(isinstance(r, asyncpg.ConnectionDoesNotExistError) for r in results)
            stats = pool.stats()
            assert stats.failover_events == 0
            assert stats.silent_hosts == 1
            assert stats.connections_closed.get("silent_host") == 2
            async with pool.acquire() as a, pool.acquire() as b:
                assert {a.get_server_pid(), b.get_server_pid()} == on_second
            warnings = _warnings(caplog)
            assert len(warnings) == 1
            assert f"{first.host}:{first.port}" in warnings[0]
            first.resume()


@pytest.mark.parametrize(
    ("attrs", "warning"),
    [("any", "terminated"), ("read-write", "failover or restart detected")],
)
async def test_the_engine_terminates_a_hung_hosts_connections(
    postgres_server: PostgresServer, caplog: pytest.LogCaptureFixture, attrs: str, warning: str
) -> None:
    """The SQLAlchemy engine does the same: its query in flight fails as a lost connection,
    its idle connection is never checked out again, one WARNING (a failover on a writer
    engine), and it serves afterwards."""
    pytest.importorskip("sqlalchemy")
    from sqlalchemy import text
    from sqlalchemy.exc import DBAPIError

    from asyncpg_iam.sqlalchemy import create_async_engine

    caplog.set_level(logging.WARNING, logger="asyncpg_iam")
    async with ClusterEndpoint((postgres_server.host, postgres_server.port)) as endpoint:
        url = (
            f"postgresql+asyncpg://{postgres_server.user}@{endpoint.host}:{endpoint.port}/"
            f"{postgres_server.database}"
        )
        engine = create_async_engine(
            url,
            iam=False,
            connect_args={"password": postgres_server.password, "target_session_attrs": attrs},
            pool_size=2,
        )
        try:
            busy = await engine.connect()
            async with engine.connect() as idle:  # a second connection, left idle in the pool
                old = {await idle.scalar(text("SELECT pg_backend_pid()"))}
            try:
                old.add(await busy.scalar(text("SELECT pg_backend_pid()")))
                assert len(old) == 2
                endpoint.silence()
                with pytest.raises(DBAPIError) as caught:
                    await asyncio.wait_for(
                        busy.execute(text("SELECT pg_sleep(60)")), DETECTED_WITHIN
                    )
                orig = caught.value.orig
                assert isinstance(
                    orig.__cause__ if orig else None, asyncpg.ConnectionDoesNotExistError
                )
            finally:
                await busy.close()
            warnings = _warnings(caplog)
            assert len(warnings) == 1
            assert f"{endpoint.host}:{endpoint.port}" in warnings[0]
            assert warning in warnings[0]
            endpoint.resume()
            async with engine.connect() as fresh:
                pid = await asyncio.wait_for(
                    fresh.scalar(text("SELECT pg_backend_pid()")), DETECTED_WITHIN
                )
            assert pid not in old
        finally:
            await engine.dispose()


async def test_a_login_to_a_host_still_silent_fails_at_the_connect_timeout(
    postgres_server: PostgresServer,
) -> None:
    """A connection needed while its host is silent is not dialled into the silence: after the
    connect timeout it fails as a ConnectTimeoutError in phase "silent"."""
    async with ClusterEndpoint((postgres_server.host, postgres_server.port)) as endpoint:
        kwargs = direct_kwargs(postgres_server, host=endpoint.host, port=endpoint.port, timeout=2.0)
        async with asyncpg_iam.create_pool(**kwargs, min_size=1, max_size=1) as pool:
            queries, _ = await _in_flight(pool, 1)
            endpoint.silence()
            await asyncio.wait_for(
                asyncio.gather(*queries, return_exceptions=True), DETECTED_WITHIN
            )
            with pytest.raises(asyncpg_iam.ConnectTimeoutError) as caught:
                await asyncio.wait_for(pool.fetchval("SELECT 1"), DETECTED_WITHIN)
            assert caught.value.phase == "silent"  # held at the gate, never dialled
            endpoint.resume()
            assert await asyncio.wait_for(pool.fetchval("SELECT 1"), DETECTED_WITHIN) == 1


# -- a host heard from on its connections gets no probe ------------------------------------------


async def test_a_connection_tells_how_recently_it_received_data(
    postgres_server: PostgresServer,
) -> None:
    """The kernel's count of a connection's last received data, on a real socket: just after
    a query it is recent; after a pause longer than the window asked, it is not."""
    if not sys.platform.startswith("linux"):
        pytest.skip("TCP_INFO's last received data is Linux's")
    async with asyncpg_iam.create_pool(**direct_kwargs(postgres_server, min_size=1)) as pool:
        async with pool.acquire() as con:
            await con.fetchval("SELECT 1")
            assert received_within(con, 5.0)
            await asyncio.sleep(0.3)
            assert not received_within(con, 0.1)
            await con.fetchval("SELECT 1")
            assert received_within(con, 5.0)
        assert not received_within(object(), 5.0)  # no transport: cannot tell


async def test_a_busy_pool_sends_no_probe_and_an_idle_handout_does(
    postgres_server: PostgresServer,
) -> None:
    """Connections in use that keep receiving data spare their host the probes (not one in
    several intervals); a connection held in use with nothing on the wire gets them again."""
    if not sys.platform.startswith("linux"):
        pytest.skip("TCP_INFO's last received data is Linux's")
    settings = HealthCheck(interval=0.2, timeout=1.0)
    kwargs = direct_kwargs(postgres_server, min_size=2, max_size=2, health_check=settings)
    async with asyncpg_iam.create_pool(**kwargs) as pool:
        loop = asyncio.get_running_loop()
        stop = loop.time() + 8 * settings.interval

        async def busy() -> None:
            while loop.time() < stop:
                async with pool.acquire() as con:
                    await con.fetchval("SELECT 1")

        await asyncio.gather(busy(), busy())
        busy_stats = pool.stats()
        assert busy_stats.health_probes == 0
        assert pool._health is not None
        assert pool._health.probes_skipped >= 3
        async with pool.acquire():
            await wait_for(lambda: pool.stats().health_probes >= 2, timeout=10)
        assert pool.stats().silent_hosts == 0
    # On a clock of its own the pool's seconds are not the kernel's: every probe is sent.
    async with asyncpg_iam.create_pool(**kwargs, clock=ManualClock()) as manual:
        assert manual._health is not None
        assert manual._health._heard_from is None


# -- a saturated server is not a silent one -----------------------------------------------------


async def test_a_busy_server_retires_nothing(
    postgres_server: PostgresServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A server busy with long queries and CPU work, callers waiting for connections: the
    probes are answered, nothing is retired, nothing is logged."""
    caplog.set_level(logging.WARNING, logger="asyncpg_iam")
    kwargs = direct_kwargs(postgres_server, min_size=4, max_size=4)
    seconds = 6
    async with asyncpg_iam.create_pool(**kwargs) as pool:

        async def sleep() -> None:
            await pool.execute(f"SELECT pg_sleep({seconds})")

        async def burn() -> None:  # a CPU busy for the whole time
            await pool.execute(
                "DO $$ BEGIN WHILE clock_timestamp() < now() + "
                f"interval '{seconds} seconds' LOOP END LOOP; END $$"
            )

        async def wait_and_query() -> None:
            await pool.fetchval("SELECT 1")

        work = [sleep(), burn(), burn(), burn(), *(wait_and_query() for _ in range(8))]
        await asyncio.wait_for(asyncio.gather(*work), 120)
        stats = pool.stats()
        assert stats.health_probes >= 3
        assert stats.silent_hosts == 0
        assert stats.failover_events == 0
        assert "silent_host" not in stats.connections_closed
        assert _warnings(caplog) == []


# -- a lost network path (packets dropped between namespaces) -----------------------------------


def _partition_unavailable() -> str | None:
    try:
        return NetworkPartition.unavailable()
    except Exception as exc:  # pragma: no cover - depends on the machine
        return f"cannot probe for network namespaces: {exc}"


needs_netns = pytest.mark.skipif(
    bool(_partition_unavailable()), reason=str(_partition_unavailable())
)


async def _on_main(loop: asyncio.AbstractEventLoop, coro: Awaitable[None]) -> None:
    """Run `coro` on the test's own loop from the client thread's loop."""
    await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, loop))  # type: ignore[arg-type]


@needs_netns
async def test_dropped_packets_fail_queries_and_the_pool_recovers(
    postgres_server: PostgresServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Every packet to and from the server dropped (no FIN, no RST): queries in flight fail
    with ConnectionDoesNotExistError, one WARNING, idle connections are not handed out, and
    the pool serves again once packets flow."""
    caplog.set_level(logging.WARNING, logger="asyncpg_iam")
    main = asyncio.get_running_loop()
    async with NetworkPartition((postgres_server.host, postgres_server.port)) as path:
        kwargs = direct_kwargs(postgres_server, host=path.host, port=path.port)

        async def client() -> tuple[list[Any], set[int], int, Any]:
            async with asyncpg_iam.create_pool(**kwargs, min_size=4, max_size=4) as pool:
                old = await _all_pids(pool)
                queries, _ = await _in_flight(pool, 2)
                await _on_main(main, path.drop())
                results = await asyncio.wait_for(
                    asyncio.gather(*queries, return_exceptions=True), DETECTED_WITHIN
                )
                stats = pool.stats()
                await _on_main(main, path.restore())
                pid = await asyncio.wait_for(
                    pool.fetchval("SELECT pg_backend_pid()"), DETECTED_WITHIN
                )
                return results, old, pid, stats

        results, old, pid, stats = await path.run_client(client)
    assert all(isinstance(r, asyncpg.ConnectionDoesNotExistError) for r in results), results
    assert stats.silent_hosts == 1
    assert stats.connections_closed.get("silent_host") == 4  # the idle ones too
    assert pid not in old
    warnings = _warnings(caplog)
    assert len(warnings) == 1, warnings
    assert f"{path.host}:{path.port}" in warnings[0]


@needs_netns
async def test_logins_while_packets_are_dropped_wait_and_then_succeed(
    postgres_server: PostgresServer,
) -> None:
    """An acquire that needs a new connection to the silent host waits for it to answer
    (no login into the void, no failure), and succeeds once packets flow."""
    main = asyncio.get_running_loop()
    async with NetworkPartition((postgres_server.host, postgres_server.port)) as path:
        kwargs = direct_kwargs(postgres_server, host=path.host, port=path.port)

        async def client() -> tuple[int, Any]:
            async with asyncpg_iam.create_pool(**kwargs, min_size=1, max_size=1) as pool:
                queries, _ = await _in_flight(pool, 1)
                await _on_main(main, path.drop())
                await asyncio.wait_for(
                    asyncio.gather(*queries, return_exceptions=True), DETECTED_WITHIN
                )
                waiting = asyncio.ensure_future(pool.fetchval("SELECT 1"))
                await asyncio.sleep(2.0)
                assert not waiting.done()
                await _on_main(main, path.restore())
                value = await asyncio.wait_for(waiting, DETECTED_WITHIN)
                return value, pool.stats()

        value, stats = await path.run_client(client)
    assert value == 1
    assert stats.connect_failures == 0
