"""Secrets: tokens never travel in clear, never to an unverified server, never across targets."""

from __future__ import annotations

import functools
import logging
import ssl
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import trustme

import asyncpg_iam
from asyncpg_iam import ConfigurationError, Credentials, IAMAuth
from asyncpg_iam._auth import TokenProvider
from asyncpg_iam.testing import AccessKey, PostgresServer, RDSIAMEmulator
from asyncpg_iam.testing._leak_guard import LeakGuard

from .._traps import Trap
from .conftest import no_hang

pytestmark = pytest.mark.reliability


def test_leak_guard_finds_tokens_keys_and_session_tokens(secret_leak_guard: LeakGuard) -> None:
    """The guard finds a token (even cut short), a secret key and a session token anywhere."""
    credentials = Credentials(
        "AKIAGUARDSELFTEST001", "guard-secret-" + "g" * 27, "guard-session-" * 4
    )
    token = asyncpg_iam.build_auth_token(
        host="mydb.abcdefghijkl.us-east-1.rds.amazonaws.com",
        port=5432,
        user="app",
        region="us-east-1",
        credentials=credentials,
    )
    logging.getLogger("asyncpg_iam.selftest").debug("token %s", token[:-1])
    logged = secret_leak_guard.find_leaks()
    secret_leak_guard.forget_logs()
    secret_leak_guard.watch(f"printed {credentials.secret_key}", "stdout")
    secret_leak_guard.watch(ValueError(f"bad {credentials.token}"))
    found = secret_leak_guard.find_leaks()
    secret_leak_guard.texts.clear()
    secret_leak_guard.exceptions.clear()
    assert logged == ["log record of 'asyncpg_iam.selftest' at DEBUG: session token"]
    assert found == ["exception ValueError: session token", "stdout: secret key"]
    registry = secret_leak_guard.registry
    assert registry.find(token) == ["session token", "token signature"]
    assert registry.find(token.split("X-Amz-Security-Token")[0] + token[-70:]) == [
        "token signature"
    ]
    assert registry.redact(token).endswith("X-Amz-Signature=[token signature]")
    assert registry.find(repr(credentials)) == []


# -- a server that declines TLS and asks for the password in clear (tests/_traps.py) -----------


def _pool_against(port: int, **kwargs: Any) -> asyncpg_iam.Pool:
    return asyncpg_iam.create_pool(
        host="127.0.0.1",
        port=port,
        user="app",
        database="app",
        iam=IAMAuth(
            region="us-east-1",
            signing_host="mydb.abcdefghijkl.us-east-1.rds.amazonaws.com",
            credentials=Credentials("AKIATRAPTEST00000001", "trap-secret-" + "t" * 28),
        ),
        min_size=0,
        timeout=5,
        **kwargs,
    )


@pytest.mark.parametrize(
    "ssl_option",
    [
        {"ssl": "verify-ca", "sslrootcert": "<a CA file>"},
        {"ssl": ssl.create_default_context()},
        {},
    ],
    ids=["verify-ca", "verify-full-context", "default"],
)
async def test_server_declining_tls_never_gets_the_token(
    ssl_option: dict[str, Any], tmp_path: Path
) -> None:
    """A server answering "N" to SSLRequest and asking for a cleartext password gets no token."""
    if "sslrootcert" in ssl_option:
        # verify-ca needs a CA file: with the system store it is refused.
        ca_file = tmp_path / "ca.pem"
        ca_file.write_bytes(trustme.CA().cert_pem.bytes())
        ssl_option = {**ssl_option, "sslrootcert": str(ca_file)}
    async with Trap() as trap, _pool_against(trap.port, **ssl_option) as pool:
        with pytest.raises((ConnectionError, asyncpg.PostgresError, OSError)):
            await no_hang(pool.fetchval("SELECT 1"))
        stats = pool.stats()
    assert trap.ssl_requests >= 1
    assert trap.passwords == []
    assert trap.startups == 0, "not even the startup message went in clear"
    assert stats.connect_failures == 1


async def test_cleartext_trap_does_catch_a_password_sent_in_clear() -> None:
    """Control: plain asyncpg with sslmode=prefer hands the trap its password (so it can detect)."""
    async with Trap() as trap:
        with pytest.raises((asyncpg.PostgresError, ConnectionError, OSError)):
            await no_hang(
                asyncpg.connect(
                    host="127.0.0.1",
                    port=trap.port,
                    user="app",
                    password="not-a-secret",
                    ssl="prefer",
                    timeout=5,
                )
            )
    assert trap.passwords == [b"not-a-secret\x00"]


@pytest.mark.parametrize("mode", ["disable", "allow", "prefer"])
def test_tls_policy_refuses_modes_that_fall_back_to_plaintext(
    mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """sslmode disable/allow/prefer, as an argument, in the DSN or in PGSSLMODE, is refused."""
    with pytest.raises(ConfigurationError, match="unencrypted"):
        _pool_against(5432, ssl=mode)
    with pytest.raises(ConfigurationError, match="unencrypted"):
        asyncpg_iam.create_pool(
            f"postgresql://app@mydb.abcdefghijkl.us-east-1.rds.amazonaws.com/app?sslmode={mode}",
            iam=IAMAuth(credentials=Credentials("AKIATRAPTEST00000001", "x" * 40)),
        )
    monkeypatch.setenv("PGSSLMODE", mode)
    with pytest.raises(ConfigurationError, match="unencrypted"):
        _pool_against(5432)


# -- TLS verification failure -----------------------------------------------------------------


@pytest.mark.parametrize("trust", ["other-ca", "system-store"])
async def test_tls_verification_failure_sends_no_token(
    iam_emulator: RDSIAMEmulator, postgres_server: PostgresServer, trust: str
) -> None:
    """When the server's certificate does not verify, the emulator receives no password at all."""
    if trust == "other-ca":
        context = ssl.create_default_context(cadata=trustme.CA().cert_pem.bytes().decode())
    else:
        context = ssl.create_default_context()
    kwargs = {
        "host": iam_emulator.host,
        "port": iam_emulator.port,
        "user": postgres_server.user,
        "database": postgres_server.database,
        "ssl": context,
        "iam": IAMAuth(signing_host=iam_emulator.endpoint),
        "min_size": 0,
        "timeout": 5,
    }
    async with asyncpg_iam.create_pool(**kwargs) as pool:
        with pytest.raises(ssl.SSLCertVerificationError):
            await no_hang(pool.fetchval("SELECT 1"))
    assert iam_emulator.connections_total >= 1, "the client did reach the emulator"
    assert iam_emulator.password_messages == 0
    assert iam_emulator.records == []


# -- token reuse never crosses users, hosts or ports ------------------------------------------


async def test_reused_tokens_never_cross_users_hosts_or_ports(
    postgres_server: PostgresServer, rds_access_key: AccessKey
) -> None:
    """One provider with token_reuse, 2 users x 2 endpoints on 2 ports: every login verifies."""
    users = [postgres_server.user, "iam_reader"]
    endpoints = [
        "db-a.abcdefghijkl.us-east-1.rds.amazonaws.com",
        "db-b.abcdefghijkl.us-east-1.rds.amazonaws.com",
    ]
    emulators = [
        RDSIAMEmulator(
            backend_host=postgres_server.host,
            backend_port=postgres_server.port,
            backend_user=postgres_server.user,
            backend_password=postgres_server.password,
            endpoint=endpoint,
            iam_users=users,
        )
        for endpoint in endpoints
    ]
    credentials = Credentials(rds_access_key.access_key, rds_access_key.secret_key)
    provider = TokenProvider(IAMAuth(credentials=credentials, token_reuse=600))
    async with emulators[0], emulators[1]:
        await emulators[0].ensure_role("iam_reader")
        for emulator in emulators:
            emulator.register_key(rds_access_key.access_key, rds_access_key.secret_key)
        rounds = 5
        for _ in range(rounds):
            for emulator, endpoint in zip(emulators, endpoints, strict=False):
                for user in users:
                    # Signed for the endpoint name, dialled at the emulator's address.
                    target = provider.target(endpoint, emulator.port, user)
                    con = await no_hang(
                        asyncpg.connect(
                            **emulator.connect_kwargs(user=user, database=postgres_server.database),
                            password=functools.partial(provider.token, target),
                        )
                    )
                    assert await con.fetchval("SELECT current_user") == user
                    await con.close()
        # Control: a token for one user presented by the other is refused by the emulator.
        wrong = provider.target(endpoints[0], emulators[0].port, users[0])
        with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError):
            await asyncpg.connect(
                **emulators[0].connect_kwargs(user=users[1], database=postgres_server.database),
                password=await provider.token(wrong),
            )
    await provider.aclose()

    logins = rounds * len(users)
    for emulator in emulators:
        accepted = [r for r in emulator.records if r.accepted]
        assert len(accepted) == logins
        assert {r.user for r in accepted} == set(users)
    assert [r.reason for r in emulators[0].records if not r.accepted] == ["wrong_user"]
    assert [r for r in emulators[1].records if not r.accepted] == []
    assert provider.tokens_signed == 4, "one token per (endpoint, port, user)"
    assert provider.token_reuses == 2 * logins - 4 + 1
