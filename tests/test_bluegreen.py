"""Blue/green switchovers: the pure phases and routing, and the pool on the test bed."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
import pytest_asyncio
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

import asyncpg_iam
from asyncpg_iam import SwitchoverTimeoutError, _asyncpg_pool
from asyncpg_iam._switchover import (
    HOLD,
    PASS,
    REROUTE,
    SOURCE_ROLE,
    TARGET_ROLE,
    BlueGreenSettings,
    Phase,
    Tracker,
    _Gate,
    blue_name_of,
    decide,
    parse_rows,
    pin_name,
    poll_interval,
)
from asyncpg_iam.otel import instrument_pool
from asyncpg_iam.testing import (
    DEFAULT_BLUE_ENDPOINT,
    DEFAULT_GREEN_ENDPOINT,
    BlueGreenDeployment,
    CredentialServer,
    ManualClock,
    PostgresServer,
    RDSIAMEmulator,
)
from tests._support import engine_on, pool_kwargs, wait_for
from tests.test_otel import collect, value

BLUE, GREEN = DEFAULT_BLUE_ENDPOINT, DEFAULT_GREEN_ENDPOINT


def rows(status: str, version: str = "1.0") -> list[tuple[Any, ...]]:
    return [
        (version, BLUE, 5432, SOURCE_ROLE, status),
        (version, GREEN, 5432, TARGET_ROLE, status),
    ]


# -- the pure core -------------------------------------------------------------------------------


def test_rows_map_to_phases() -> None:
    """Each status maps to its phase; no rows, or only rows of another version, is no deployment."""
    assert parse_rows([]).phase == Phase.NOT_CREATED
    assert parse_rows(rows("AVAILABLE")).phase == Phase.CREATED
    assert parse_rows(rows("SWITCHOVER_INITIATED")).phase == Phase.PREPARATION
    assert parse_rows(rows("SWITCHOVER_IN_PROGRESS")).phase == Phase.IN_PROGRESS
    assert parse_rows(rows("SWITCHOVER_IN_POST_PROCESSING")).phase == Phase.POST
    assert parse_rows(rows("SWITCHOVER_COMPLETED")).phase == Phase.COMPLETED
    assert parse_rows(rows("SWITCHOVER_COMPLETED", version="2.0")).phase == Phase.NOT_CREATED
    mixed = [(*rows("SWITCHOVER_IN_PROGRESS")[0],), (*rows("SWITCHOVER_COMPLETED")[1],)]
    assert parse_rows(mixed).phase == Phase.COMPLETED  # the most advanced row


def test_green_is_found_for_the_blue_name() -> None:
    """The green member of a blue name is the one whose name loses '-green-<id>' to it."""
    assert blue_name_of(GREEN) == BLUE
    member = parse_rows(rows("AVAILABLE")).green_for(BLUE)
    assert member is not None
    assert member.endpoint == GREEN
    assert member.green


def test_routing_per_phase() -> None:
    """Pass before the switch, hold during it within the bound, reroute after it until DNS
    catches up."""
    base = {"held_since": 100.0, "now": 110.0, "hold": 30.0, "green_known": True}
    for phase in (Phase.NOT_CREATED, Phase.CREATED, Phase.PREPARATION):
        assert decide(phase, completed=False, dns_caught_up=False, **base) == PASS
    assert decide(Phase.IN_PROGRESS, completed=False, dns_caught_up=False, **base) == HOLD
    late = {**base, "now": 130.0}
    assert decide(Phase.IN_PROGRESS, completed=False, dns_caught_up=False, **late) == PASS
    assert decide(Phase.IN_PROGRESS, completed=True, dns_caught_up=False, **base) == REROUTE
    for phase in (Phase.POST, Phase.COMPLETED):
        assert decide(phase, completed=False, dns_caught_up=False, **base) == REROUTE
        assert decide(phase, completed=False, dns_caught_up=True, **base) == PASS
    unknown = {**base, "green_known": False}
    assert decide(Phase.COMPLETED, completed=False, dns_caught_up=False, **unknown) == PASS


def test_cadence_follows_the_phase() -> None:
    """60 s without a deployment, 1 s with one, 100 ms during a switchover."""
    assert poll_interval(Phase.NOT_CREATED, switching=False) == 60.0
    assert poll_interval(Phase.CREATED, switching=False) == 1.0
    for phase in (Phase.PREPARATION, Phase.IN_PROGRESS, Phase.POST):
        assert poll_interval(phase, switching=False) == 0.1
    assert poll_interval(Phase.COMPLETED, switching=True) == 0.1


def test_tracker_holds_then_rolls_back() -> None:
    """Entering the switch starts the hold; a phase that moves backwards is a rollback that
    ends it."""
    tracker = Tracker(hold=30.0)
    assert tracker.update(parse_rows(rows("AVAILABLE")), 1.0) == []
    assert tracker.update(parse_rows(rows("SWITCHOVER_IN_PROGRESS")), 2.0) == ["hold"]
    assert tracker.held_since == 2.0
    assert tracker.update(parse_rows(rows("AVAILABLE")), 3.0) == ["rollback"]
    assert tracker.held_since is None
    assert tracker.rollbacks == 1
    assert tracker.action(3.0, green_known=True, dns_caught_up=False) == PASS


def test_completion_the_metadata_never_reports_is_observed() -> None:
    """Stuck 'in progress', the switch ends once green (seen read-only) takes writes, or once
    the blue name resolves to green."""
    for signal in ("green", "dns"):
        tracker = Tracker()
        tracker.update(parse_rows(rows("SWITCHOVER_IN_PROGRESS")), 0.0)
        assert tracker.observe_green(writable=False) is False
        assert tracker.action(1.0, green_known=True, dns_caught_up=False) == HOLD
        if signal == "green":
            assert tracker.observe_green(writable=True) is True
        else:
            assert tracker.observe_dns(blue_on_green=True) is True
        assert tracker.action(1.0, green_known=True, dns_caught_up=False) == REROUTE


def test_a_writable_green_alone_ends_nothing() -> None:
    """A green that was never seen read-only in this deployment does not signal completion."""
    tracker = Tracker()
    tracker.update(parse_rows(rows("SWITCHOVER_IN_PROGRESS")), 0.0)
    assert tracker.observe_green(writable=True) is False
    assert tracker.action(1.0, green_known=True, dns_caught_up=False) == HOLD


async def test_hold_is_bounded_on_the_clock() -> None:
    """A held caller gets SwitchoverTimeoutError once the pool's clock passes the bound, not
    before."""
    clock = ManualClock()
    gate = _Gate(clock, clock.monotonic() + 30.0)
    waiter = asyncio.ensure_future(gate.wait())
    await clock.advance(29.0)
    assert not waiter.done()
    await clock.advance(1.0)
    with pytest.raises(SwitchoverTimeoutError) as caught:
        await waiter
    assert isinstance(caught.value, asyncio.TimeoutError)
    released = _Gate(clock, clock.monotonic() + 30.0)
    waiter = asyncio.ensure_future(released.wait())
    released.release()
    await waiter  # released before the bound: no error


def test_a_pinned_name_is_verified_for_its_address() -> None:
    """A verifying context checks (and sends SNI for) the name pinned for an IP address; other
    hosts and non-verifying contexts are left alone."""
    context = ssl.create_default_context()
    pin_name(context, "127.0.0.2", BLUE)
    pin_name(context, "not-an-ip.example", GREEN)  # a name is verified as itself
    pinned = context.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO(), server_hostname="127.0.0.2")
    other = context.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO(), server_hostname="127.0.0.3")
    named = context.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO(), server_hostname="not-an-ip.example")
    assert pinned.server_hostname == BLUE
    assert other.server_hostname == "127.0.0.3"
    assert named.server_hostname == "not-an-ip.example"
    unverified = ssl.create_default_context()
    unverified.check_hostname = False
    pin_name(unverified, "127.0.0.2", BLUE)
    assert "sslobject_class" not in unverified.__dict__


def test_settings_are_validated() -> None:
    """A hold that is not seconds in (0, 3600) is a ConfigurationError."""
    for bad in (0, -1, 3600, True, "30"):
        with pytest.raises(asyncpg_iam.ConfigurationError, match="hold"):
            BlueGreenSettings(hold=bad)  # type: ignore[arg-type]


async def test_on_by_default_only_for_iam_pools_on_an_rds_name() -> None:
    """blue_green=None follows switchovers for an IAM pool on an RDS name only; True on a pool
    it cannot serve is a ConfigurationError."""
    common = {"user": "app", "database": "app", "min_size": 0}
    on_rds = asyncpg_iam.Pool(host=BLUE, **common)
    assert on_rds._bluegreen is not None
    assert on_rds._connector.route is None  # no connect waits for the check
    assert on_rds._reset is not None  # the first connection released will check
    assert asyncpg_iam.Pool(host=BLUE, blue_green=False, **common)._bluegreen is None
    proxy = "app.proxy-abc123.us-east-1.rds.amazonaws.com"
    assert asyncpg_iam.Pool(host=proxy, **common)._bluegreen is None
    plain = {**common, "host": "127.0.0.1", "iam": False, "password": "x"}
    assert asyncpg_iam.Pool(**plain)._bluegreen is None
    with pytest.raises(asyncpg_iam.ConfigurationError, match="blue_green"):
        asyncpg_iam.Pool(blue_green=True, **plain)
    with pytest.raises(asyncpg_iam.ConfigurationError, match="blue_green"):
        asyncpg_iam.Pool(host=BLUE, blue_green="yes", **common)


async def test_a_held_acquire_passes_the_gate_once(
    iam_emulator: RDSIAMEmulator, postgres_server: PostgresServer
) -> None:
    """An acquire held by a switch awaits the gate once, with a timeout or without (the timed
    acquire runs asyncpg's acquire under the gate, not the gated one again)."""
    calls = 0

    async def gate() -> None:
        nonlocal calls
        calls += 1

    async with asyncpg_iam.create_pool(
        **pool_kwargs(iam_emulator, postgres_server, min_size=1, max_size=1)
    ) as pool:
        _asyncpg_pool.hold_acquires(pool, gate)
        async with pool.acquire(timeout=5) as con:
            assert await con.fetchval("SELECT 1") == 1
        assert calls == 1
        async with pool.acquire() as con:
            assert await con.fetchval("SELECT 1") == 1
        assert calls == 2
        _asyncpg_pool.hold_acquires(pool, None)
        assert await pool.fetchval("SELECT 1") == 1
        assert calls == 2


# -- on the test bed -----------------------------------------------------------------------------


@pytest_asyncio.fixture
async def bed(
    credential_server: CredentialServer, request: pytest.FixtureRequest
) -> AsyncIterator[BlueGreenDeployment]:
    """Provide a started blue/green deployment trusting the credential server's keys."""
    options = getattr(request, "param", {})
    async with BlueGreenDeployment(**options) as started:
        credential_server.add_listener(started.register_key)
        yield started


def _holding(pool: Any) -> bool:
    follower = pool._bluegreen.follower
    return follower is not None and follower._gate is not None


async def _monitor_phase(pool: Any, phase: Phase) -> None:
    if not pool._bluegreen._checked:
        await pool.fetchval("SELECT 1")  # the first connection released checks for metadata
    await wait_for(lambda: pool._bluegreen.tracker.phase == phase, timeout=20)


class Ledger:
    """Writers and readers through a pool; every acknowledged write id is kept."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool
        self.acknowledged: list[int] = []
        self.failures: list[tuple[float, BaseException]] = []
        self.next_id = 0
        self.stop = False

    async def worker(self) -> None:
        loop = asyncio.get_running_loop()
        while not self.stop:
            self.next_id += 1
            ident = self.next_id
            began = loop.time()
            try:
                async with self.pool.acquire() as con:
                    await con.execute("INSERT INTO ledger VALUES ($1)", ident)
                self.acknowledged.append(ident)
            except Exception as exc:  # counted, the test judges them
                self.failures.append((began, exc))
            await asyncio.sleep(0.02)


async def test_switchover_loses_no_write_and_refuses_no_known_login(
    bed: BlueGreenDeployment,
) -> None:
    """Through a switch with a DNS lag longer than the test, every acknowledged write is on
    green, no query that began after blue went read-only fails, blue connections are retired,
    and no login is refused once the pool knows which name green takes."""
    await bed._admin(bed.blue, "CREATE TABLE ledger (id int PRIMARY KEY)")
    await bed._admin(bed.blue, "GRANT ALL ON ledger TO PUBLIC")
    async with asyncpg_iam.create_pool(**bed.pool_kwargs(min_size=2, max_size=4)) as pool:
        await _monitor_phase(pool, Phase.CREATED)
        ledger = Ledger(pool)
        workers = [asyncio.ensure_future(ledger.worker()) for _ in range(4)]
        await asyncio.sleep(0.5)
        timeline = await bed.switchover(duration=1.0, dns_lag=60.0, prepare=1.5)
        await _monitor_phase(pool, Phase.COMPLETED)
        refused_by_then = pool._bluegreen.counters.fallback_refusals
        await asyncio.sleep(1.0)
        ledger.stop = True
        await asyncio.gather(*workers)
        bg = pool._bluegreen
        late = [exc for began, exc in ledger.failures if began > timeline.read_only_at + 0.5]
        assert late == [], late
        assert bg.counters.switchovers == 1
        assert bg.counters.rerouted >= 1
        assert bed.blue_emulator.open_connections == 0  # every blue connection retired
        # One login at a time finds the name green takes (the green name is refused once it
        # answers to the blue name); from then on nothing is refused: 0 when green had taken
        # the blue name before the pool's first try, else 1.
        assert bg.counters.fallback_refusals == refused_by_then <= 1
        assert any(r.accepted for r in bed.green_emulator.records), "no login reached green"
        await wait_for(lambda: len(ledger.acknowledged) > 0)
    on_green = {r[0] for r in await bed.query(bed.green, "SELECT id FROM ledger")}
    assert set(ledger.acknowledged) <= on_green
    assert bed.blue_dns.target == (bed.blue_emulator.host, bed.blue_emulator.port)


async def test_racing_connects_cost_one_refused_login_per_switchover(
    bed: BlueGreenDeployment,
) -> None:
    """32 connects held by the switch, released when green takes writes before its rename:
    logins signed for the green name go one at a time until green takes the blue name, so the
    rename costs exactly one refused login, and every connect lands on green."""
    racing = 32
    async with asyncpg_iam.create_pool(
        **bed.pool_kwargs(hold=60.0, min_size=1, max_size=racing)
    ) as pool:
        reader = InMemoryMetricReader()
        instrument_pool(pool, MeterProvider(metric_readers=[reader]))
        bg = pool._bluegreen
        await _monitor_phase(pool, Phase.CREATED)
        follower = bg.follower
        assert follower is not None
        await wait_for(lambda: follower._green is not None, timeout=20)
        await bed.begin_switchover(prepare=1.2)
        await wait_for(lambda: follower._gate is not None, timeout=20)
        release = asyncio.Event()

        async def connect_and_hold() -> bool:
            async with pool.acquire() as con:
                in_recovery: bool = await con.fetchval("SELECT pg_is_in_recovery()")
                await release.wait()
                return in_recovery

        held = [asyncio.ensure_future(connect_and_hold()) for _ in range(racing)]
        await asyncio.sleep(0.3)
        assert not any(task.done() for task in held)
        accepted_before = bed.green_emulator.logins_accepted

        def rename_after_two(record: Any) -> None:
            if record.accepted and bed.green_emulator.logins_accepted >= accepted_before + 1:
                bed.green_emulator.on_login = None
                bed.rename_endpoints()  # between the second login and the next one

        bed.green_emulator.on_login = rename_after_two
        await bed.promote_green()  # the metadata stays "in progress": green taking writes ends it
        await wait_for(lambda: bg.counters.rerouted >= racing, timeout=30)
        await wait_for(lambda: pool.get_size() >= racing, timeout=30)
        release.set()
        assert await asyncio.wait_for(asyncio.gather(*held), 30) == [False] * racing
        assert bed.green_emulator.endpoint == BLUE  # renamed while connects were still due
        assert bg.counters.fallback_refusals == 1
        assert follower._settled == BLUE
        stats = pool.stats()
        metrics = collect(reader)
    assert stats.blue_green_phase == "in_progress"  # the metadata never said more
    assert stats.blue_green_holds == 1
    assert stats.blue_green_hold_timeouts == 0
    assert stats.blue_green_reroutes == bg.counters.rerouted >= racing
    assert stats.blue_green_fallback_refusals == 1
    assert value(metrics["asyncpg_iam.bluegreen.phase"]) == 3
    assert value(metrics["asyncpg_iam.bluegreen.holds"]) == 1
    assert value(metrics["asyncpg_iam.bluegreen.hold_timeouts"]) == 0
    assert value(metrics["asyncpg_iam.bluegreen.reroutes"]) == stats.blue_green_reroutes
    assert value(metrics["asyncpg_iam.bluegreen.fallback_refusals"]) == 1


async def test_sqlalchemy_engine_follows_a_switchover(bed: BlueGreenDeployment) -> None:
    """The SQLAlchemy engine follows a switch through the same connector as the pool: no
    write begun after the switch completed fails, and every acknowledged write is on green."""
    from sqlalchemy import text

    await bed._admin(bed.blue, "CREATE TABLE ledger (id int PRIMARY KEY)")
    await bed._admin(bed.blue, "GRANT ALL ON ledger TO PUBLIC")
    kwargs = bed.pool_kwargs()
    engine = engine_on(
        kwargs, blue_green=kwargs["blue_green"], pool_size=4, max_overflow=0, max_lifetime=None
    )
    loop = asyncio.get_running_loop()
    acknowledged: list[tuple[float, int]] = []
    failures: list[tuple[float, BaseException]] = []
    stop = False
    ids = iter(range(1, 1_000_000))

    async def writer() -> None:
        while not stop:
            ident, began = next(ids), loop.time()
            try:
                async with engine.begin() as conn:
                    await conn.execute(text("INSERT INTO ledger VALUES (:id)"), {"id": ident})
                acknowledged.append((began, ident))
            except Exception as exc:  # counted, the test judges them
                failures.append((began, exc))
            await asyncio.sleep(0.02)

    try:
        workers = [asyncio.ensure_future(writer()) for _ in range(4)]
        await wait_for(lambda: len(acknowledged) > 0, timeout=20)
        # The engine's poller moves to green once it has learned it: a login there.
        await wait_for(lambda: bed.green_emulator.logins_accepted >= 1, timeout=20)
        timeline = await bed.switchover(duration=1.0, dns_lag=60.0, prepare=1.5)
        assert timeline.completed_at is not None
        await asyncio.sleep(1.5)
        stop = True
        await asyncio.gather(*workers)
    finally:
        await engine.dispose()
    late = [exc for began, exc in failures if began > timeline.completed_at]
    assert late == [], late
    assert any(began > timeline.completed_at for began, _ in acknowledged)
    on_green = {r[0] for r in await bed.query(bed.green, "SELECT id FROM ledger")}
    assert {ident for _, ident in acknowledged} <= on_green
    assert bed.green_emulator.logins_accepted >= 2  # the poller, and the engine's connections


@pytest.mark.parametrize("bed", [{"source": None}], indirect=True)
async def test_no_metadata_means_one_check_and_nothing_polled(bed: BlueGreenDeployment) -> None:
    """On a database with neither metadata source the pool checks once, in the reset of the
    first connection released (no round trip of its own), and never polls."""
    async with asyncpg_iam.create_pool(**bed.pool_kwargs(min_size=1, max_size=2)) as pool:
        monitor = pool._bluegreen
        assert not monitor._checked  # nothing waited for it
        async with pool.acquire() as con:
            await con.execute("SET search_path = nowhere")
            raw = con._con
        assert monitor._checked
        # The SET, then the reset with the probe in one message: asyncpg counts two queries.
        assert raw._protocol.queries_count == 2
        assert await pool.fetchval("SHOW search_path") != "nowhere"  # the reset ran too
        assert raw._protocol.queries_count == 4  # later resets: the reset query alone
        await asyncio.sleep(0.5)
        assert monitor.source is None
        assert monitor._task is None  # no poller
        assert monitor.follower is None  # nothing of the switchover's following loaded
        assert monitor.counters.polls == 0
        assert pool._connector.route is None
        logins = bed.blue_emulator.logins_accepted
        assert logins == 1  # the pool's one connection carried the check


@pytest.mark.parametrize("bed", [{"source": "rds"}], indirect=True)
async def test_rollback_releases_the_hold(bed: BlueGreenDeployment) -> None:
    """A switch rolled back (RDS PostgreSQL's rds_tools source) ends the hold: acquires held
    during it go to blue again."""
    async with asyncpg_iam.create_pool(**bed.pool_kwargs(min_size=1, max_size=2)) as pool:
        await _monitor_phase(pool, Phase.CREATED)
        assert pool._bluegreen.source == "rds"
        await bed.begin_switchover(prepare=1.2)
        await wait_for(lambda: _holding(pool), timeout=20)
        held = asyncio.ensure_future(pool.fetchval("SELECT 1"))
        await asyncio.sleep(0.3)
        assert not held.done()
        await bed.rollback()
        assert await asyncio.wait_for(held, 10) == 1
        assert pool._bluegreen.counters.rollbacks == 1
        assert "_acquire" not in pool.__dict__
        assert pool._connector.route is None
        assert await pool.fetchval("SELECT 1") == 1
        monitor = pool._bluegreen
    assert monitor._task is not None
    await asyncio.sleep(0)
    assert monitor._task.done()  # the poller stops when the pool closes
    assert monitor.follower is not None
    assert monitor.follower._poll_con is None


async def test_completion_the_metadata_never_shows_releases_traffic(
    bed: BlueGreenDeployment,
) -> None:
    """With the metadata stuck 'in progress', the pool ends the hold when green takes writes and
    sends new connections there, long before the hold's bound."""
    async with asyncpg_iam.create_pool(
        **bed.pool_kwargs(hold=60.0, min_size=1, max_size=2)
    ) as pool:
        await _monitor_phase(pool, Phase.CREATED)
        await bed.begin_switchover(prepare=1.2)
        await wait_for(lambda: _holding(pool), timeout=20)
        held = asyncio.ensure_future(pool.fetchval("SELECT pg_is_in_recovery()"))
        await asyncio.sleep(0.5)
        await bed.complete_switchover(dns_lag=600.0, report_completion=False)
        assert await asyncio.wait_for(held, 20) is False  # it ran on green, promoted
        bg = pool._bluegreen
        assert bg.tracker.phase == Phase.IN_PROGRESS
        assert bg.tracker.completed
        assert bg.counters.hold_timeouts == 0


async def test_hold_bound_gives_a_clear_error(bed: BlueGreenDeployment) -> None:
    """A switch longer than the hold gives SwitchoverTimeoutError at the bound, then stops
    holding."""
    # A bound well above how late a loaded machine may see the gate appear.
    async with asyncpg_iam.create_pool(**bed.pool_kwargs(hold=8.0, min_size=1, max_size=2)) as pool:
        await _monitor_phase(pool, Phase.CREATED)
        await bed.begin_switchover(prepare=1.2)
        await wait_for(lambda: _holding(pool), timeout=20)
        with pytest.raises(SwitchoverTimeoutError, match="hold"):
            await pool.fetchval("SELECT 1")
        assert pool._bluegreen.counters.hold_timeouts >= 1
        stats = pool.stats()
        assert stats.blue_green_holds == stats.blue_green_hold_timeouts == 1
        assert stats.blue_green_phase == "in_progress"
        assert await pool.fetchval("SELECT 1") == 1  # not held again: reads reach blue
        with contextlib.suppress(asyncpg.PostgresError):
            await bed.rollback()


@pytest.mark.parametrize("bed", [{"source": None}], indirect=True)
async def test_a_check_that_fails_in_the_reset_still_resets_and_keeps_the_connection(
    bed: BlueGreenDeployment, caplog: pytest.LogCaptureFixture
) -> None:
    """When the probe sent with the first reset fails, the reset is sent again alone: the
    connection is reset and kept, and nothing is polled."""
    await bed.query(bed.blue, "CREATE ROLE app LOGIN")
    await bed.query(bed.blue, "GRANT rds_iam TO app")
    await bed.query(bed.blue, "REVOKE EXECUTE ON FUNCTION to_regprocedure(text) FROM PUBLIC")
    caplog.set_level(logging.INFO, logger="asyncpg_iam.bluegreen")
    kwargs = bed.pool_kwargs(user="app", min_size=1, max_size=1)
    async with asyncpg_iam.create_pool(**kwargs) as pool:
        async with pool.acquire() as con:
            await con.execute("SET search_path = nowhere")
            raw = con._con
        monitor = pool._bluegreen
        assert monitor._checked
        assert monitor.source is None
        assert "metadata not readable (42501)" in caplog.text  # the probe was refused
        assert monitor._task is None
        async with pool.acquire() as con:
            assert con._con is raw  # not terminated
            assert await con.fetchval("SHOW search_path") != "nowhere"
    assert pool.stats().connections_opened == 1


@pytest.mark.parametrize("bed", [{"source": "rds"}], indirect=True)
async def test_no_right_to_read_the_metadata_means_nothing_polled(
    bed: BlueGreenDeployment,
) -> None:
    """A user who may not call rds_tools.show_topology gets its connections as usual, and the
    pool polls nothing."""
    await bed.query(bed.blue, "CREATE ROLE app LOGIN")
    await bed.query(bed.blue, "GRANT rds_iam TO app")
    await bed.query(
        bed.blue, "REVOKE EXECUTE ON FUNCTION rds_tools.show_topology(text) FROM PUBLIC"
    )
    kwargs = bed.pool_kwargs(user="app", min_size=1, max_size=2)
    async with asyncpg_iam.create_pool(**kwargs) as pool:
        assert await pool.fetchval("SELECT current_user") == "app"
        monitor = pool._bluegreen
        assert monitor._checked
        assert monitor.source is None
        assert monitor._task is None
        assert pool._connector.route is None
