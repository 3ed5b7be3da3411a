"""The IAM pool through the emulator, real PostgreSQL and the local credential endpoint."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import math
from collections.abc import Callable
from typing import Any

import asyncpg
import pytest

import asyncpg_iam
from asyncpg_iam import IAMAuth, _asyncpg_pool
from asyncpg_iam.testing import (
    AccessKey,
    CredentialServer,
    ManualClock,
    PostgresServer,
    RDSIAMEmulator,
    Sandbox,
)
from tests._support import direct_kwargs, pool_kwargs, run_in_lock_step, wait_for


async def test_pool_is_an_asyncpg_pool(
    iam_emulator: RDSIAMEmulator, postgres_server: PostgresServer
) -> None:
    """create_pool returns an asyncpg.Pool that runs queries with a token-authenticated login."""
    async with asyncpg_iam.create_pool(**pool_kwargs(iam_emulator, postgres_server)) as pool:
        assert isinstance(pool, asyncpg.Pool)
        assert await pool.fetchval("SELECT 41 + 1") == 42
        async with pool.acquire() as con:
            assert await con.fetchval("SELECT current_user") == postgres_server.user
        stats = pool.stats()
    assert stats.tokens_signed >= 1
    assert stats.credential_fetches == 1
    assert iam_emulator.logins_rejected == 0
    assert iam_emulator.logins_accepted == stats.connections_opened


async def test_default_chain_across_rotations_and_lifetimes(
    postgres_server: PostgresServer,
    rds_access_key: AccessKey,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """20 workers for 30 clock s with max_lifetime=3 and keys rotating every 10 s never fail."""
    from asyncpg_iam.testing._aws_fixtures import isolate_aws_environment

    isolate_aws_environment(monkeypatch, tmp_path_factory)
    max_lifetime = 3.0
    # Time is a ManualClock shared by the pool, the emulator and the credential endpoint,
    # started at the real time (aiobotocore reads the keys' expiry against real time). The
    # workers run in lock-step: the clock moves one pause (0.1 s) only once every worker is
    # paused, so real round trips take no clock time and load cannot move lifetimes or
    # rotations; the 30 s take 300 steps, 6000 uses.
    clock = ManualClock(dt.datetime.now(dt.timezone.utc))
    sandbox = Sandbox(
        server=postgres_server,
        access_key=rds_access_key,
        credential_server=False,
        isolate_environment=False,
        clock=clock,
    )
    async with sandbox:
        rds_emulator = sandbox.emulator
        with CredentialServer(lifetime=20.0, rotate_every=10.0, clock=clock) as creds:
            creds.add_emulator(rds_emulator)
            for name, value in creds.env().items():
                monkeypatch.setenv(name, value)
            uses: list[tuple[int, dt.datetime]] = []
            failures: list[BaseException] = []

            async def turn(n: int) -> None:
                try:
                    async with pool.acquire(timeout=10) as con:
                        acquired = clock.now()
                        pid, value = await con.fetchrow("SELECT pg_backend_pid(), $1::int", n)
                        assert value == n
                        uses.append((pid, acquired))
                except Exception as exc:
                    failures.append(exc)

            kwargs = pool_kwargs(
                rds_emulator,
                postgres_server,
                max_size=10,
                min_size=2,
                max_lifetime=max_lifetime,
                clock=clock,
            )
            async with asyncpg_iam.create_pool(**kwargs) as pool:
                await run_in_lock_step(
                    clock, workers=20, step=0.1, until=clock.monotonic() + 30.0, turn=turn
                )
                stats = pool.stats()
            issued = len(creds.issued)

    assert failures == []
    assert len(uses) > 1000
    assert issued >= 3, "credentials rotated at least twice during the run"
    assert rds_emulator.logins_rejected == 0
    accepted = [r for r in rds_emulator.records if r.accepted]
    assert len(accepted) == stats.connections_opened
    assert len({r.access_key for r in accepted}) >= 3, "logins used the rotated keys"
    assert all(r.token_age is not None and r.token_age < 5 for r in accepted)
    opened = {r.backend_pid: r.at for r in accepted}
    # Every query ran on a connection younger than its lifetime (plus the connect itself).
    oldest_use = max((used - opened[pid]).total_seconds() for pid, used in uses)
    assert oldest_use <= max_lifetime + 0.25
    assert stats.connections_closed.get("max_lifetime", 0) >= 10


async def test_in_use_connection_outlives_deadline_then_closes_on_release(
    iam_emulator: RDSIAMEmulator, postgres_server: PostgresServer
) -> None:
    """A connection held across its deadline keeps working and is closed when released."""
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
        async with pool.acquire() as con:
            pid = await con.fetchval("SELECT pg_backend_pid()")
            await clock.advance(0.8)
            assert await con.fetchval("SELECT pg_backend_pid()") == pid
            assert pid in {c.backend_pid for c in iam_emulator.relayed_connections()}
        await wait_for(
            lambda: pid not in {c.backend_pid for c in iam_emulator.relayed_connections()}
        )
        assert pool.stats().connections_closed["max_lifetime"] == 1
        assert await pool.fetchval("SELECT pg_backend_pid()") != pid


async def test_idle_due_connection_closed_without_acquire_and_min_size_restored(
    iam_emulator: RDSIAMEmulator, postgres_server: PostgresServer
) -> None:
    """Idle connections close at their deadline with no acquire, and min_size is refilled."""
    kwargs = pool_kwargs(
        iam_emulator,
        postgres_server,
        min_size=2,
        max_size=4,
        max_lifetime=0.5,
        max_lifetime_jitter=0,
    )
    async with asyncpg_iam.create_pool(**kwargs) as pool:
        first = {c.backend_pid for c in iam_emulator.relayed_connections()}
        assert len(first) == 2

        def replaced() -> bool:
            now = {c.backend_pid for c in iam_emulator.relayed_connections()}
            return len(now) == 2 and not (now & first) and pool.get_size() == 2

        await wait_for(replaced)
        assert pool.stats().connections_closed["max_lifetime"] >= 2


class _StalledTimers(ManualClock):
    """A manual clock whose timers never run: a deadline passes before its timer fires."""

    def call_at(self, when: float, callback: Callable[..., object], *args: Any) -> Any:
        return super().call_at(math.inf, callback, *args)


async def test_due_connection_is_never_handed_out(
    iam_emulator: RDSIAMEmulator, postgres_server: PostgresServer
) -> None:
    """A connection past its deadline whose timer has not fired yet is replaced on acquire."""
    clock = _StalledTimers(dt.datetime.now(dt.timezone.utc))
    kwargs = pool_kwargs(
        iam_emulator,
        postgres_server,
        min_size=1,
        max_size=1,
        max_lifetime=0.3,
        max_lifetime_jitter=0,
        clock=clock,
    )
    async with asyncpg_iam.create_pool(**kwargs) as pool:
        old = await pool.fetchval("SELECT pg_backend_pid()")
        await clock.advance(0.4)  # past the deadline; its timer does not run
        async with pool.acquire() as con:
            assert await con.fetchval("SELECT pg_backend_pid()") != old
        assert pool.stats().connections_closed == {"discarded_on_acquire": 1}, pool.stats()


async def test_multi_host_signs_for_each_host(
    postgres_server: PostgresServer, credential_server: CredentialServer
) -> None:
    """Two endpoints in one host list each receive a token signed for themselves."""
    a = RDSIAMEmulator(
        backend_host=postgres_server.host,
        backend_port=postgres_server.port,
        backend_password=postgres_server.password,
        endpoint="127.0.0.1",
        region="us-east-1",
        iam_users=[postgres_server.user],
    )
    b = RDSIAMEmulator(
        backend_host=postgres_server.host,
        backend_port=postgres_server.port,
        backend_password=postgres_server.password,
        endpoint="localhost",
        region="us-east-1",
        iam_users=[postgres_server.user],
        ca=None,
    )
    credential_server.add_emulator(a)
    credential_server.add_emulator(b)
    async with a, b:
        ssl_a = a.client_ssl_context()
        ssl_a.load_verify_locations(cadata=b.ca_pem)
        kwargs = {
            "host": ["127.0.0.1", "localhost"],
            "port": [a.port, b.port],
            "user": postgres_server.user,
            "database": postgres_server.database,
            "ssl": ssl_a,
            "min_size": 0,
            "max_size": 2,
            "iam": IAMAuth(region="us-east-1"),
        }
        async with asyncpg_iam.create_pool(**kwargs) as pool:
            assert await pool.fetchval("SELECT 1") == 1
        await a.stop()  # the first host refuses connections: the pool moves on to the second
        async with asyncpg_iam.create_pool(**kwargs) as pool:
            assert await pool.fetchval("SELECT 2") == 2
    assert a.logins_accepted == 1
    assert a.logins_rejected == 0
    assert b.logins_accepted == 1
    assert b.logins_rejected == 0


@pytest.mark.parametrize(
    "tls",
    [
        {"ssl": "prefer"},
        {"ssl": "disable"},
        {"ssl": "allow"},
        {"ssl": False},
        {"dsn_query": "sslmode=prefer"},
    ],
)
async def test_plaintext_capable_tls_is_refused_before_any_byte(
    iam_emulator: RDSIAMEmulator, postgres_server: PostgresServer, tls: dict[str, Any]
) -> None:
    """sslmode prefer/allow/disable is refused at creation: the emulator sees no connection."""
    kwargs = pool_kwargs(iam_emulator, postgres_server)
    del kwargs["ssl"]
    if "dsn_query" in tls:
        dsn = f"postgresql://{postgres_server.user}@{iam_emulator.host}:{iam_emulator.port}/x?{tls['dsn_query']}"
        for key in ("host", "port", "user"):
            del kwargs[key]
        args: tuple[Any, ...] = (dsn,)
    else:
        kwargs.update(tls)
        args = ()
    with pytest.raises(asyncpg_iam.ConfigurationError, match="unencrypted"):
        await asyncpg_iam.create_pool(*args, **kwargs)
    assert iam_emulator.connections_total == 0
    assert iam_emulator.password_messages == 0


async def test_disabled_user_gets_diagnosed_error_and_connections_retire(
    iam_emulator: RDSIAMEmulator, postgres_server: PostgresServer
) -> None:
    """After the user loses IAM, connects raise IAMAuthenticationError and old ones retire."""
    kwargs = pool_kwargs(iam_emulator, postgres_server, min_size=2, max_size=2, max_lifetime=1.0)
    async with asyncpg_iam.create_pool(**kwargs) as pool:
        # Not `open_connections == 2`: on a loaded machine the first may already be retired.
        assert pool.stats().connections_opened >= 2
        iam_emulator.disable_iam_user(postgres_server.user)
        await wait_for(lambda: iam_emulator.open_connections == 0, timeout=30)
        with pytest.raises(asyncpg_iam.IAMAuthenticationError) as caught:
            await pool.fetchval("SELECT 1")
    error = caught.value
    assert isinstance(error, asyncpg.InvalidAuthorizationSpecificationError)
    assert isinstance(error, asyncpg_iam.IAMError)
    assert isinstance(error.__cause__, asyncpg.InvalidAuthorizationSpecificationError)
    text = str(error)
    assert f'PAM authentication failed for user "{postgres_server.user}"' in text
    assert f'GRANT rds_iam TO "{postgres_server.user}"' in text
    assert "rds-db:connect on arn:aws:rds-db:us-east-1:<account-id>:dbuser:" in text
    assert error.context.signing_host == iam_emulator.endpoint
    assert error.context.credential_source
    assert error.user == postgres_server.user
    assert all(r.reason == "user_not_iam_enabled" for r in iam_emulator.records if not r.accepted)


async def test_region_mismatch_is_named_first(
    iam_emulator: RDSIAMEmulator, postgres_server: PostgresServer
) -> None:
    """A token signed for another region than the endpoint's fails with that as the top hint."""
    auth = IAMAuth(signing_host=iam_emulator.endpoint, region="eu-west-1")
    with pytest.raises(asyncpg_iam.IAMAuthenticationError) as caught:
        await asyncpg_iam.create_pool(**pool_kwargs(iam_emulator, postgres_server, iam=auth))
    assert caught.value.hints[0].startswith("Region mismatch")
    assert "'us-east-1'" in caught.value.hints[0]
    assert iam_emulator.records[-1].reason == "wrong_region"


async def test_ip_without_signing_host_is_explained(
    iam_emulator: RDSIAMEmulator, postgres_server: PostgresServer
) -> None:
    """Signing for the dialled IP instead of the endpoint name names signing_host as the fix."""
    auth = IAMAuth(region="us-east-1")
    with pytest.raises(asyncpg_iam.IAMAuthenticationError) as caught:
        await asyncpg_iam.create_pool(**pool_kwargs(iam_emulator, postgres_server, iam=auth))
    assert "which is an IP address" in caught.value.hints[0]
    assert "signing_host" in caught.value.hints[0]
    assert iam_emulator.records[-1].reason == "wrong_host"


# How much a login's arrival at the server may vary after the pool began it (TCP, TLS, relay).
HANDSHAKE_JITTER = 0.5


async def test_max_connect_rate_caps_logins_per_second(postgres_server: PostgresServer) -> None:
    """With max_connect_rate=5, 50 concurrent acquires never begin more than 5 logins a second."""
    # Time is a ManualClock shared by the pool and the emulator, started at the real time. It
    # moves (to the next rate-limit slot or the end of a hold) only while no login is in flight,
    # so the real logins take no clock time and the holds and waits take no real time.
    clock = ManualClock(dt.datetime.now(dt.timezone.utc))
    logins_began: list[float] = []
    holding = 0
    finished = 0
    async with Sandbox(server=postgres_server, clock=clock) as sandbox:
        iam_emulator = sandbox.emulator
        kwargs = pool_kwargs(
            iam_emulator, postgres_server, min_size=0, max_size=50, max_connect_rate=5, clock=clock
        )
        async with asyncpg_iam.create_pool(**kwargs) as pool:

            async def hold() -> None:
                nonlocal holding, finished
                try:
                    async with pool.acquire(timeout=30) as con:
                        await con.fetchval("SELECT 1")  # the pool tracks it meanwhile
                        began = pool._recycler.opened_at(con._con)
                        assert began is not None
                        logins_began.append(began)
                        holding += 1
                        await clock.sleep(12)
                finally:
                    finished += 1

            def quiet() -> bool:
                # Every login the rate limit let through has become a held connection (every
                # grant waited for a slot, so each is counted in connects_rate_limited).
                return finished == 50 or pool.stats().connects_rate_limited == holding

            async def drive() -> None:
                while finished < 50:
                    await wait_for(quiet, timeout=30)
                    due = clock.next_due()
                    if due is None:
                        await asyncio.sleep(0.01)  # the last holders are closing
                        continue
                    await clock.advance(max(0.0, due - clock.monotonic()))

            await asyncio.gather(drive(), *(hold() for _ in range(50)))
            stats = pool.stats()
    assert iam_emulator.logins_accepted == 50
    assert stats.connects_rate_limited >= 45
    # When each login began, by the pool's clock: six consecutive ones span at least 1 s, so no
    # second holds more than five (1 ms for the work between the grant and the reading).
    began = sorted(logins_began)
    assert min(b - a for a, b in zip(began, began[5:], strict=False)) >= 1.0 - 0.001
    # At the server, each login arrives after its own TCP and TLS handshake (and, on the
    # container lane, a slower relay), so per-second counts there carry that jitter; the 50
    # logins still take the 9.8 s that 5 a second allows, less a handshake.
    arrivals = sorted(r.at for r in iam_emulator.records)
    assert (arrivals[-1] - arrivals[0]).total_seconds() >= 49 / 5 - HANDSHAKE_JITTER


async def test_token_reuse_shares_a_token_within_its_age(
    iam_emulator: RDSIAMEmulator, postgres_server: PostgresServer
) -> None:
    """With token_reuse, consecutive connects present one token until it ages out."""
    auth = IAMAuth(signing_host=iam_emulator.endpoint, token_reuse=600)
    kwargs = pool_kwargs(iam_emulator, postgres_server, iam=auth, min_size=5, max_size=5)
    async with asyncpg_iam.create_pool(**kwargs) as pool:
        stats = pool.stats()
    assert stats.connections_opened == 5
    assert stats.tokens_signed == 1
    assert stats.token_reuses == 4
    assert iam_emulator.logins_accepted == 5


async def test_plain_pool_without_iam_still_recycles(postgres_server: PostgresServer) -> None:
    """iam=False gives a static-password pool whose connections still retire at max_lifetime."""
    async with asyncpg_iam.create_pool(
        **direct_kwargs(postgres_server),
        min_size=1,
        max_size=1,
        max_lifetime=0.3,
        max_lifetime_jitter=0,
    ) as pool:
        first = await pool.fetchval("SELECT pg_backend_pid()")
        await wait_for(lambda: pool.stats().connections_closed.get("max_lifetime", 0) >= 1)
        assert await pool.fetchval("SELECT pg_backend_pid()") != first
        assert pool.stats().tokens_signed == 0


async def test_setup_init_reset_and_record_class_pass_through(
    iam_emulator: RDSIAMEmulator, postgres_server: PostgresServer
) -> None:
    """asyncpg's pool hooks and connect arguments work unchanged on the IAM pool."""
    calls: list[str] = []

    class Row(asyncpg.Record):
        pass

    async def init(con: asyncpg.Connection) -> None:
        calls.append("init")

    async def setup(con: Any) -> None:
        calls.append("setup")

    async def reset(con: asyncpg.Connection) -> None:
        calls.append("reset")

    kwargs = pool_kwargs(
        iam_emulator,
        postgres_server,
        init=init,
        setup=setup,
        reset=reset,
        record_class=Row,
        server_settings={"application_name": "iam-test"},
        command_timeout=5,
        min_size=1,
        max_size=1,
    )
    async with asyncpg_iam.create_pool(**kwargs) as pool:
        row = await pool.fetchrow("SELECT current_setting('application_name') AS app")
        assert isinstance(row, Row)
        assert row["app"] == "iam-test"
    assert calls == ["init", "setup", "reset"]


async def test_a_cancelled_release_still_resets_and_returns_the_connection(
    postgres_server: PostgresServer,
) -> None:
    """A caller cancelled while its release resets the connection leaves the reset running:
    the same connection comes back to the pool, reset, and nothing is logged."""
    resetting, finish = asyncio.Event(), asyncio.Event()
    resets: list[int] = []

    async def reset(con: asyncpg.Connection) -> None:
        resetting.set()
        await finish.wait()
        await con.execute("RESET ALL")
        resets.append(await con.fetchval("SELECT pg_backend_pid()"))

    errors: list[dict[str, Any]] = []
    asyncio.get_running_loop().set_exception_handler(lambda _loop, context: errors.append(context))
    async with asyncpg_iam.create_pool(
        **direct_kwargs(postgres_server), reset=reset, min_size=1, max_size=1
    ) as pool:
        finish.set()
        pid = await pool.fetchval("SELECT pg_backend_pid()")
        finish.clear()
        resetting.clear()

        async def use() -> None:
            async with pool.acquire() as con:
                await con.execute("SET application_name = 'dirty'")

        caller = asyncio.create_task(use())
        await resetting.wait()
        caller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await caller
        assert pool.get_idle_size() == 0  # still resetting
        finish.set()
        await wait_for(lambda: pool.get_idle_size() == 1)
        async with pool.acquire() as con:
            assert await con.fetchval("SELECT pg_backend_pid()") == pid
            assert await con.fetchval("SHOW application_name") != "dirty"
        assert resets == [pid, pid, pid]  # the first use's, the cancelled one's, this one's
        assert pool.stats().connections_opened == 1
    assert errors == []


async def test_a_failed_reset_reaches_the_releaser_and_replaces_the_connection(
    postgres_server: PostgresServer,
) -> None:
    """An error in the release's reset is raised to the caller, as asyncpg does, and the
    connection is closed and replaced; once the caller is cancelled, it is dropped unlogged."""
    failing = asyncio.Event()
    resetting = asyncio.Event()

    async def reset(con: asyncpg.Connection) -> None:
        if failing.is_set():
            resetting.set()
            await asyncio.sleep(0.05)
            raise RuntimeError("reset failed")

    errors: list[dict[str, Any]] = []
    asyncio.get_running_loop().set_exception_handler(lambda _loop, context: errors.append(context))
    async with asyncpg_iam.create_pool(
        **direct_kwargs(postgres_server), reset=reset, min_size=1, max_size=1
    ) as pool:
        first = await pool.fetchval("SELECT pg_backend_pid()")
        failing.set()
        con = await pool.acquire()
        with pytest.raises(RuntimeError, match="reset failed"):
            await pool.release(con)
        resetting.clear()
        caller = asyncio.create_task(pool.fetchval("SELECT 1"))
        await resetting.wait()
        caller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await caller
        failing.clear()
        await wait_for(lambda: pool.stats().connections_closed.get("other", 0) >= 2)
        assert await pool.fetchval("SELECT pg_backend_pid()") != first
        assert pool.stats().connections_opened == 3
    assert errors == []


async def test_release_checks_the_connection_as_asyncpg_does(
    postgres_server: PostgresServer,
) -> None:
    """A release of another pool's connection is refused with asyncpg's message; releasing
    one twice does nothing the second time."""
    kwargs = direct_kwargs(postgres_server, min_size=1, max_size=1)
    async with (
        asyncpg_iam.create_pool(**kwargs) as pool,
        asyncpg_iam.create_pool(**kwargs) as other,
    ):
        con = await other.acquire()
        with pytest.raises(asyncpg.InterfaceError, match="is not a member of this pool"):
            await pool.release(con)
        await other.release(con)
        await other.release(con)
        assert other.get_idle_size() == 1
        assert await other.fetchval("SELECT 1") == 1


async def test_a_shielded_release_cancelled_itself_cancels_its_caller() -> None:
    """When the release's own task is cancelled (as a loop's shutdown does), the caller's
    await is cancelled too, as with asyncio.shield; cancelled before it starts, it calls
    nothing."""
    started = asyncio.Event()
    calls: list[float | None] = []

    async def release(timeout: float | None) -> None:
        calls.append(timeout)
        started.set()
        await asyncio.Event().wait()

    def settle_tasks() -> list[asyncio.Task[Any]]:
        return [t for t in asyncio.all_tasks() if t.get_coro().__qualname__ == "_settle"]

    outcome = _asyncpg_pool._shielded(release, 5.0)
    await started.wait()
    (task,) = settle_tasks()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await outcome
    assert task.cancelled()
    assert calls == [5.0]

    _asyncpg_pool._shielded(release, None)
    (unstarted,) = settle_tasks()
    unstarted.cancel()
    with pytest.raises(asyncio.CancelledError):
        await unstarted
    assert calls == [5.0]  # never called, so no coroutine left unawaited


@pytest.mark.parametrize("max_lifetime", [None, 900])
async def test_connect_callback_returning_no_connection_gets_asyncpgs_error(
    postgres_server: PostgresServer, max_lifetime: float | None
) -> None:
    """A connect= callback that returns no connection gets asyncpg's own error, not ours."""

    async def connect(*args: Any, **kwargs: Any) -> int:
        return 1

    with pytest.raises(
        asyncpg.InterfaceError,
        match="expected pool connect callback to return an instance of "
        r"'asyncpg\.connection\.Connection', got 'int'",
    ):
        await asyncpg_iam.create_pool(
            **direct_kwargs(postgres_server), connect=connect, max_lifetime=max_lifetime
        )


async def test_pool_logs_name_the_pool_and_never_the_token(
    iam_emulator: RDSIAMEmulator, postgres_server: PostgresServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Pool log lines carry the pool's name; no token appears in logs or the repr."""
    caplog.set_level(logging.DEBUG)
    async with asyncpg_iam.create_pool(**pool_kwargs(iam_emulator, postgres_server)) as pool:
        await pool.fetchval("SELECT 1")
        text = repr(pool) + caplog.text
    assert pool.name in caplog.text
    assert "X-Amz-Signature" not in text
    assert "X-Amz-Credential" not in text


async def test_no_token_kept_on_the_connection_or_given_to_query_loggers(
    iam_emulator: RDSIAMEmulator, postgres_server: PostgresServer
) -> None:
    """asyncpg keeps the ``password`` it was given on the connection and hands it to every
    query logger (``LoggedQuery.conn_params``): that is the pool's callable, never a token,
    also when the credentials are at hand and the token is had without waiting."""
    logged: list[Any] = []
    kwargs = pool_kwargs(iam_emulator, postgres_server, min_size=1, max_size=1)
    async with asyncpg_iam.create_pool(**kwargs) as pool:
        await pool.expire_connections()  # the next login finds the credentials cached
        async with pool.acquire() as con:
            con.add_query_logger(logged.append)
            await con.fetchval("SELECT 1")
            con.remove_query_logger(logged.append)
            kept = con._con._params  # the pool's proxy wraps the connection asyncpg made
    assert iam_emulator.logins_accepted == 2
    assert logged
    assert logged[0].conn_params is kept
    assert callable(kept.password)
    for text in (repr(kept), repr(logged[0]), repr(kept.password)):
        assert "X-Amz-Signature" not in text
        assert "X-Amz-Credential" not in text
