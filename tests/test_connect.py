"""The connect path's edge cases: closing mid-fetch, slow setup, multi-host logins per host."""

from __future__ import annotations

import asyncio
import logging

import asyncpg
import pytest

import asyncpg_iam
from asyncpg_iam import ConfigurationError, IAMAuth
from asyncpg_iam.testing import CredentialServer, PostgresServer, RDSIAMEmulator

from ._support import pool_kwargs, wait_for


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
        await asyncio.sleep(0.5)

    kwargs = pool_kwargs(
        iam_emulator,
        postgres_server,
        min_size=0,
        max_size=1,
        max_lifetime=0.2,
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
            host="mydb.abcdefghijkl.us-east-1.rds.amazonaws.com",
            user="app",
            target_session_attrs="primary-please",
        )
    message = str(caught.value)
    assert "read-write" in message
    assert "prefer-standby" in message
    assert "built-in method" not in message
