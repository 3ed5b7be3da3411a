"""The connect path's edge cases: closing mid-fetch, slow setup, multi-host logins per host."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import trustme

import asyncpg_iam
from asyncpg_iam import (
    ConfigurationError,
    ConnectError,
    ConnectTimeoutError,
    Credentials,
    IAMAuth,
    TLSVerificationError,
)
from asyncpg_iam.testing import CredentialServer, PostgresServer, RDSIAMEmulator

from ._support import pool_kwargs, resolve_as_unknown, wait_for
from ._traps import Trap

RDS = "mydb.abcdefghijkl.us-east-1.rds.amazonaws.com"
KEY = Credentials("AKIACONNECTTEST00001", "connect-test-secret-" + "c" * 20)


def closed_port() -> int:
    """Return a loopback port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize("how", ["close", "terminate"])
async def test_closing_during_the_first_credential_fetch(
    iam_emulator: RDSIAMEmulator,
    postgres_server: PostgresServer,
    credential_server: CredentialServer,
    how: str,
) -> None:
    """Acquirers waiting on the first credential fetch get "pool is closing", not a bare cancel."""
    credential_server.hang = True
    try:
        pool = asyncpg_iam.create_pool(**pool_kwargs(iam_emulator, postgres_server, min_size=0))
        await pool
        provider = pool._connector.provider
        assert provider is not None
        waiters = [asyncio.create_task(pool.fetchval("SELECT 1")) for _ in range(3)]
        await wait_for(lambda: provider.credentials.fetches == 1)
        await asyncio.sleep(0.05)  # let every waiter reach the fetch in flight
        if how == "close":
            await asyncio.wait_for(pool.close(), 10)
        else:
            pool.terminate()
        results = await asyncio.wait_for(asyncio.gather(*waiters, return_exceptions=True), 10)
    finally:
        credential_server.hang = False
    for result in results:
        assert isinstance(result, asyncpg.InterfaceError), repr(result)
        assert "pool is closing" in str(result)
        assert isinstance(result.__cause__, asyncpg_iam.CredentialsError)
    await wait_for(lambda: provider.credentials.closed)
    assert iam_emulator.logins_accepted == 0


async def test_setup_longer_than_max_lifetime_still_hands_out_once(
    iam_emulator: RDSIAMEmulator,
    postgres_server: PostgresServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A connection that comes due during its own setup is used once and closed on release."""
    caplog.set_level(logging.WARNING, logger="asyncpg_iam.pool")

    async def slow_setup(_con: asyncpg.Connection) -> None:
        await asyncio.sleep(0.1)  # real time: asyncpg's setup knows no other clock

    kwargs = pool_kwargs(
        iam_emulator,
        postgres_server,
        min_size=0,
        max_size=1,
        max_lifetime=0.05,
        max_lifetime_jitter=0,
        setup=slow_setup,
    )
    async with asyncpg_iam.create_pool(**kwargs) as pool:
        for expected in (1, 2):
            assert await asyncio.wait_for(pool.fetchval("SELECT $1::int", expected), 10) == expected
        await wait_for(lambda: pool.stats().connections_closed.get("max_lifetime", 0) >= 1)
        stats = pool.stats()
    assert stats.handed_out_due == 2
    assert stats.connections_opened == 2
    warnings = [r for r in caplog.records if "before it was handed out" in r.message]
    assert len(warnings) == 1


async def test_prefer_standby_logs_in_once_per_host(
    postgres_server: PostgresServer, credential_server: CredentialServer
) -> None:
    """prefer-standby over two primaries: two logins (one per host), as plain asyncpg makes."""
    emulators = [
        RDSIAMEmulator(
            backend_host=postgres_server.host,
            backend_port=postgres_server.port,
            backend_password=postgres_server.password,
            endpoint=endpoint,
            region="us-east-1",
            iam_users=[postgres_server.user],
        )
        for endpoint in ("127.0.0.1", "localhost")
    ]
    a, b = emulators
    for emulator in emulators:
        credential_server.add_emulator(emulator)
    async with a, b:
        context = a.client_ssl_context()
        context.load_verify_locations(cadata=b.ca_pem)
        async with asyncpg_iam.create_pool(
            host=["127.0.0.1", "localhost"],
            port=[a.port, b.port],
            user=postgres_server.user,
            database=postgres_server.database,
            ssl=context,
            target_session_attrs="prefer-standby",
            min_size=0,
            max_size=1,
            iam=IAMAuth(region="us-east-1"),
        ) as pool:
            assert await pool.fetchval("SELECT 1") == 1
            stats = pool.stats()
    assert (a.logins_accepted, b.logins_accepted) == (1, 1)
    assert stats.tokens_signed == 2
    assert stats.connections_opened == 1


def test_unsupported_target_session_attrs_lists_the_valid_values() -> None:
    """An unknown target_session_attrs names the valid ones, not an object's repr."""
    with pytest.raises(ConfigurationError) as caught:
        asyncpg_iam.create_pool(
            host=RDS,
            user="app",
            target_session_attrs="primary-please",
        )
    message = str(caught.value)
    assert "read-write" in message
    assert "prefer-standby" in message
    assert "built-in method" not in message


# -- what a new user meets: every failure says where, how far it got, and what to do ---------


@pytest.fixture
def no_cached_bundle(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No RDS bundle cached and no PG* variables: the default CA is the system store."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("ASYNCPG_IAM_CA_BUNDLE", raising=False)
    for name in [n for n in os.environ if n.startswith("PG")]:
        monkeypatch.delenv(name)


@pytest.mark.parametrize("ssl_option", [{}, {"ssl": "verify-full"}, {"ssl": True}])
async def test_untrusted_certificate_names_host_ca_and_fix(
    iam_emulator: RDSIAMEmulator,
    postgres_server: PostgresServer,
    no_cached_bundle: None,
    ssl_option: dict[str, Any],
) -> None:
    """verify-full against a CA nobody trusts: TLSVerificationError with the CA and the fix."""
    kwargs = pool_kwargs(iam_emulator, postgres_server, min_size=0, timeout=10)
    del kwargs["ssl"]
    async with asyncpg_iam.create_pool(**kwargs, **ssl_option) as pool:
        with pytest.raises(TLSVerificationError) as caught:
            await pool.fetchval("SELECT 1")
    error = caught.value
    assert isinstance(error, ssl.SSLCertVerificationError)
    assert isinstance(error.__cause__, ssl.SSLCertVerificationError)
    assert (error.host, error.port, error.phase) == (iam_emulator.host, iam_emulator.port, "tls")
    assert f"{iam_emulator.host}:{iam_emulator.port}" in str(error)
    assert "the system store" in error.ca
    assert "asyncpg-iam ca-bundle" in error.hint
    assert "sslrootcert=" in error.hint
    assert iam_emulator.password_messages == 0


async def test_certificate_for_another_name_hints_verify_ca_and_signing_host(
    no_cached_bundle: None, tmp_path: Path
) -> None:
    """A certificate that names another host gets the tunnel/CNAME hint."""
    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("db.example.internal").configure_cert(context)
    ca_file = tmp_path / "ca.pem"
    ca_file.write_bytes(ca.cert_pem.bytes())
    async with Trap(tls=context) as trap:
        pool = asyncpg_iam.create_pool(
            host="127.0.0.1",
            port=trap.port,
            user="app",
            sslrootcert=str(ca_file),
            iam=IAMAuth(region="us-east-1", credentials=KEY),
            min_size=0,
            timeout=5,
        )
        async with pool:
            with pytest.raises(TLSVerificationError) as caught:
                await pool.fetchval("SELECT 1")
    assert "verify-ca" in caught.value.hint
    assert "signing_host" in caught.value.hint
    assert str(ca_file) in caught.value.ca
    assert trap.passwords == []


def test_a_misspelled_keyword_names_the_closest_valid_one() -> None:
    """max_lifetim=5 is a ConfigurationError at creation that suggests max_lifetime."""
    with pytest.raises(ConfigurationError, match=r"'max_lifetim': did you mean 'max_lifetime'\?"):
        asyncpg_iam.create_pool(host=RDS, user="app", min_size=0, max_lifetim=5)
    with pytest.raises(ConfigurationError, match=r"did you mean 'command_timeout'\?"):
        asyncpg_iam.create_pool(host=RDS, user="app", comand_timeout=5)


async def test_a_refused_port_names_host_port_and_phase() -> None:
    """A closed port: ConnectError, phase tcp, naming host:port and what to check."""
    port = closed_port()
    pool = asyncpg_iam.create_pool(
        host="127.0.0.1",
        port=port,
        user="app",
        iam=IAMAuth(region="us-east-1", credentials=KEY),
        ssl=ssl.create_default_context(),
        min_size=0,
    )
    async with pool:
        with pytest.raises(ConnectError) as caught:
            await pool.fetchval("SELECT 1")
    assert caught.value.phase == "tcp"
    assert f"127.0.0.1:{port} refused" in str(caught.value)
    assert "check the port" in caught.value.hint
    assert isinstance(caught.value, ConnectionRefusedError) or isinstance(
        caught.value.__cause__, ConnectionRefusedError
    )


async def test_a_silent_port_times_out_with_the_phase_and_timeout() -> None:
    """A port that accepts TCP and never answers: ConnectTimeoutError naming the timeout used."""

    async def silent(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(30)
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        pool = asyncpg_iam.create_pool(
            host="127.0.0.1",
            port=port,
            user="app",
            iam=IAMAuth(region="us-east-1", credentials=KEY),
            ssl=ssl.create_default_context(),
            min_size=0,
            timeout=1,
        )
        async with pool:
            with pytest.raises(ConnectTimeoutError) as caught:
                await pool.fetchval("SELECT 1")
    finally:
        server.close()
    error = caught.value
    assert isinstance(error, asyncio.TimeoutError)
    assert (error.phase, error.timeout) == ("startup", 1)
    assert "within 1 s" in str(error)
    assert "not PostgreSQL" in error.hint


async def test_an_unresolvable_host_names_the_host(monkeypatch: pytest.MonkeyPatch) -> None:
    """A name DNS does not know: ConnectError, phase dns, naming the host.

    DNS itself cannot be asked here (no traffic off loopback), so the loop's resolver answers
    as a resolver does for an unknown name.
    """
    resolve_as_unknown(monkeypatch, "db.nowhere.invalid")
    pool = asyncpg_iam.create_pool(
        host="db.nowhere.invalid",
        user="app",
        iam=IAMAuth(region="us-east-1", credentials=KEY),
        min_size=0,
        timeout=5,
    )
    async with pool:
        with pytest.raises(ConnectError) as caught:
            await pool.fetchval("SELECT 1")
    assert caught.value.phase == "dns"
    assert "'db.nowhere.invalid'" in str(caught.value)
    assert "getent hosts" in caught.value.hint


async def test_connector_stop_refuses_connects_and_stops_its_monitors() -> None:
    """Connector.stop() runs every stop given to stop_with (the pool's blue/green and health
    monitors) and refuses any later connect with "pool is closing"."""
    from asyncpg_iam._connect import Connector, plan_connect

    plan = plan_connect(None, {"host": "127.0.0.1", "port": 5432, "user": "app"}, auth=None)
    connector = Connector(plan)
    stopped: list[str] = []
    connector.stop_with(lambda: stopped.append("bluegreen"))
    connector.stop_with(lambda: stopped.append("health"))
    connector.stop()
    assert stopped == ["bluegreen", "health"]
    with pytest.raises(asyncpg.InterfaceError, match="pool is closing"):
        connector.open()


async def test_pool_terminate_stops_the_health_monitor(postgres_server: PostgresServer) -> None:
    """pool.terminate() stops the silent-host monitor (through the connector's stop): its
    probe task is gone and no connect starts afterwards."""
    pool = await asyncpg_iam.create_pool(postgres_server.dsn, iam=False, min_size=1, max_size=1)
    assert pool._health is not None
    await wait_for(lambda: pool._health._task is not None)
    pool.terminate()
    assert pool._health._task is None
    with pytest.raises(asyncpg.InterfaceError, match="pool is closing"):
        await pool._connector.open()


async def test_a_pool_connect_runs_in_one_coroutine_of_the_library(
    iam_emulator: RDSIAMEmulator, postgres_server: PostgresServer
) -> None:
    """While asyncpg connects a new pool connection, one coroutine of the library waits on it
    (the connector's login, which does the failover guard's first attempt), not one a layer
    (the first connect also runs the blue/green check)."""
    import sys

    chains: list[list[str]] = []

    async def connect(**kwargs: Any) -> Any:
        frame = sys._getframe(1)
        chain = []
        while frame is not None:
            path = frame.f_code.co_filename.replace("\\", "/")
            if "/asyncpg_iam/" in path and "/testing/" not in path:
                chain.append(frame.f_code.co_name)  # co_qualname is 3.11+
            frame = frame.f_back
        chains.append(chain)
        return await asyncpg.connect(**kwargs)

    kwargs = pool_kwargs(iam_emulator, postgres_server, min_size=0, max_size=1, connect=connect)
    async with asyncpg_iam.create_pool(**kwargs) as pool:
        for _ in range(2):
            assert await pool.fetchval("SELECT 1") == 1
            await pool.expire_connections()
        assert pool.stats().connections_opened == 2
    assert len(chains) == 2
    assert chains[1] == ["_login", "_acquire"]  # Connector._login, AsyncpgPool._acquire


async def test_a_pool_parses_each_endpoints_connect_arguments_once(
    iam_emulator: RDSIAMEmulator, postgres_server: PostgresServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """asyncpg's argument parsing runs once per endpoint and target_session_attrs, not on every
    login: five connects of a pool parse each endpoint once, and a new plan parses again."""
    import asyncpg.connect_utils

    parsed: list[tuple[Any, Any, Any]] = []
    parse = asyncpg.connect_utils._parse_connect_arguments

    def counting(**arguments: Any) -> Any:
        parsed.append((arguments["host"], arguments["port"], arguments["target_session_attrs"]))
        return parse(**arguments)

    kwargs = pool_kwargs(iam_emulator, postgres_server, min_size=0, max_size=1)
    async with asyncpg_iam.create_pool(**kwargs) as pool:
        monkeypatch.setattr(asyncpg.connect_utils, "_parse_connect_arguments", counting)
        for _ in range(5):
            assert await pool.fetchval("SELECT 1") == 1
            await pool.expire_connections()
        assert pool.stats().connections_opened == 5
        assert parsed
        assert len(parsed) == len(set(parsed)), parsed  # each endpoint once
        first = len(parsed)
        pool.set_connect_args(
            **{key: kwargs[key] for key in ("host", "port", "user", "database", "ssl")}
        )
        assert await pool.fetchval("SELECT 1") == 1
        # The new plan's check parses once, and its first login once more.
        assert len(parsed) == first + 2


async def test_a_server_that_fails_target_session_attrs_is_refused_as_asyncpg_refuses(
    iam_emulator: RDSIAMEmulator, postgres_server: PostgresServer
) -> None:
    """A login to a primary with target_session_attrs="standby" raises asyncpg's
    TargetServerAttributeNotMatched, as asyncpg.connect does, and leaves no backend behind."""
    admin = await asyncpg.connect(postgres_server.dsn)

    async def backends() -> int:
        return int(
            await admin.fetchval(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
            )
        )

    try:
        before = await backends()
        kwargs = pool_kwargs(
            iam_emulator, postgres_server, min_size=0, max_size=1, target_session_attrs="standby"
        )
        accepted = iam_emulator.logins_accepted
        async with asyncpg_iam.create_pool(**kwargs) as pool:
            for _ in range(2):  # the first login parses, the second reuses the parse
                with pytest.raises(
                    asyncpg.TargetServerAttributeNotMatched, match="target attribute requirement"
                ):
                    await pool.fetchval("SELECT 1")
        assert iam_emulator.logins_accepted - accepted >= 2
        for _ in range(200):  # the terminated backends exit
            if await backends() <= before:
                break
            await asyncio.sleep(0.05)
        assert await backends() <= before
    finally:
        await admin.close()
