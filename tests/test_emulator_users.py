"""The emulator's users as on RDS (GRANT rds_iam, ordinary passwords) and its ports (443 too)."""

from __future__ import annotations

import datetime as dt
import secrets
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
import pytest_asyncio

import asyncpg_iam
from asyncpg_iam._signing import Credentials, build_auth_token
from asyncpg_iam.testing import AccessKey, PostgresCluster, PostgresServer, RDSIAMEmulator
from asyncpg_iam.testing._emu_verify import RegisteredKey, verify_token
from tests.conftest import TokenFactory, botocore_token

PAM = 'PAM authentication failed for user "{}"'


async def connect(emulator: RDSIAMEmulator, user: str, password: str) -> asyncpg.Connection:
    return await asyncpg.connect(
        password=password, timeout=30, **emulator.connect_kwargs(user=user, database="postgres")
    )


async def admin(server: PostgresServer) -> asyncpg.Connection:
    return await asyncpg.connect(server.dsn, database="postgres", ssl=False)


@pytest_asyncio.fixture
async def sql_user(postgres_server: PostgresServer) -> AsyncIterator[tuple[str, str]]:
    """A role made with plain SQL (CREATE USER ... PASSWORD), dropped afterwards.

    On a backend that asks for passwords (the container lane) its password is the backend's,
    which the emulator answers with when it relays a login, as it does for `ensure_role`.
    """
    name = f"app_{secrets.token_hex(4)}"
    password = postgres_server.password or secrets.token_urlsafe(12)
    conn = await admin(postgres_server)
    try:
        await conn.execute(f"CREATE USER {name} PASSWORD '{password}'")
        yield name, password
        await conn.execute(f"DROP OWNED BY {name}; DROP USER {name}")
    finally:
        await conn.close()


async def test_sql_grant_then_iam_pool(
    iam_emulator: RDSIAMEmulator, postgres_server: PostgresServer, sql_user: tuple[str, str]
) -> None:
    """CREATE USER + GRANT rds_iam through the emulator lets an IAM pool log in as that user."""
    name, _ = sql_user
    pool = await asyncpg_iam.create_pool(**iam_emulator.pool_kwargs(user=postgres_server.user))
    try:
        # The role existed before; the grant is plain SQL through the emulator, as on RDS.
        await pool.execute(f"GRANT rds_iam TO {name}")
    finally:
        await pool.close()
    assert name not in iam_emulator.iam_users
    pool = await asyncpg_iam.create_pool(
        **iam_emulator.pool_kwargs(user=name, database="postgres", min_size=1)
    )
    try:
        assert await pool.fetchval("SELECT current_user") == name
    finally:
        await pool.close()
    record = iam_emulator.records[-1]
    assert (record.user, record.accepted, record.reason) == (name, True, "ok")
    assert record.access_key is not None  # a token was verified, not a password


async def test_user_without_grant_logs_in_with_its_password_not_a_token(
    iam_emulator: RDSIAMEmulator, sql_user: tuple[str, str], make_token: TokenFactory
) -> None:
    """A user outside rds_iam: a valid token is refused (RDS's message), its password works."""
    name, password = sql_user
    token = make_token(user=name)
    with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError) as info:
        await connect(iam_emulator, name, token)
    assert str(info.value) == PAM.format(name)
    record = iam_emulator.records[-1]
    assert (record.accepted, record.reason) == (False, "user_not_iam_enabled")
    assert "GRANT rds_iam" in record.detail
    assert "the token itself: ok" in record.detail

    conn = await connect(iam_emulator, name, password)
    try:
        assert await conn.fetchval("SELECT current_user") == name
    finally:
        await conn.close()
    assert iam_emulator.records[-1].accepted

    with pytest.raises(asyncpg.InvalidPasswordError) as wrong:
        await connect(iam_emulator, name, password + "x")
    assert str(wrong.value) == f'password authentication failed for user "{name}"'
    assert iam_emulator.records[-1].reason == "password_mismatch"


async def test_enable_iam_user_grants_rds_iam_and_stop_revokes_it(
    postgres_server: PostgresServer, rds_access_key: AccessKey, sql_user: tuple[str, str]
) -> None:
    """enable_iam_user GRANTs rds_iam in the backend, disable REVOKEs it, stop undoes its grant."""
    name, _ = sql_user
    member = "SELECT pg_has_role($1, 'rds_iam', 'member')"
    conn = await admin(postgres_server)
    try:
        async with RDSIAMEmulator(
            backend_host=postgres_server.host,
            backend_port=postgres_server.port,
            backend_password=postgres_server.password,
            iam_users=[name],
        ) as emulator:
            assert await conn.fetchval(member, name)
            emulator.disable_iam_user(name)
            emulator.register_key(rds_access_key.access_key, rds_access_key.secret_key)
            token = botocore_token(
                rds_access_key,
                host=emulator.endpoint,
                port=emulator.endpoint_port,
                user=name,
                region=emulator.region,
            )
            with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError):
                await connect(emulator, name, token)
            assert emulator.records[-1].reason == "user_not_iam_enabled"
            assert not await conn.fetchval(member, name)
            emulator.enable_iam_user(name)
            (await connect(emulator, name, token)).terminate()
            assert emulator.records[-1].accepted
        assert not await conn.fetchval(member, name)
    finally:
        await conn.close()


# -- ports: the signed host drops :443 ----------------------------------------------------------


@pytest.mark.parametrize("port", [5432, 443, 80, 3306, 1])
async def test_botocore_and_our_tokens_log_in_for_every_port(
    postgres_server: PostgresServer, rds_access_key: AccessKey, port: int
) -> None:
    """Tokens signed for any endpoint port (443 included) by botocore and by us are accepted."""
    async with RDSIAMEmulator(
        backend_host=postgres_server.host,
        backend_port=postgres_server.port,
        backend_password=postgres_server.password,
        endpoint_port=port,
        iam_users=[postgres_server.user],
    ) as emulator:
        key = rds_access_key
        emulator.register_key(key.access_key, key.secret_key)
        theirs = botocore_token(
            key, host=emulator.endpoint, port=port, user="postgres", region=emulator.region
        )
        ours = build_auth_token(
            host=emulator.endpoint,
            port=port,
            user="postgres",
            region=emulator.region,
            credentials=Credentials(key.access_key, key.secret_key),
            now=dt.datetime.now(dt.timezone.utc),
        )
        assert theirs.startswith(f"{emulator.endpoint}:{port}/?")
        for token in (theirs, ours):
            conn = await connect(emulator, "postgres", token)
            assert await conn.fetchval("SELECT 1") == 1
            await conn.close()
        assert [r.reason for r in emulator.records] == ["ok", "ok"]
        # A token for another port is still refused: the port is checked, only not signed.
        other = botocore_token(
            key, host=emulator.endpoint, port=port + 1, user="postgres", region=emulator.region
        )
        with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError):
            await connect(emulator, "postgres", other)
        assert emulator.records[-1].reason == "wrong_port"


@pytest.mark.parametrize("port", [5432, 443, 80, 3306, 1])
def test_verifier_table_of_ports(rds_access_key: AccessKey, port: int) -> None:
    """The verifier accepts botocore's token for each port and no token re-labelled to 443."""
    key = rds_access_key
    host, region = "db.abc.us-east-1.rds.amazonaws.com", "us-east-1"
    keys = {key.access_key: RegisteredKey(key.access_key, key.secret_key)}
    token = botocore_token(key, host=host, port=port, user="u", region=region)
    now = dt.datetime.now(dt.timezone.utc)
    options: dict[str, Any] = {"user": "u", "endpoint": host, "region": region, "keys": keys}
    assert verify_token(token, port=port, now=now, **options).reason == "ok"
    if port != 443:
        # Signed with :port in the host header; relabelled as 443 it must not verify.
        relabelled = token.replace(f":{port}/?", ":443/?", 1)
        assert verify_token(relabelled, port=443, now=now, **options).reason == (
            "signature_mismatch"
        )


# -- password logins when the emulator cannot read the role's password --------------------------


async def test_password_backend_checks_passwords_the_emulator_cannot_read() -> None:
    """With a non-superuser backend_user, a scram backend checks a password login itself."""
    with PostgresCluster() as cluster:
        conn = await asyncpg.connect(cluster.dsn, ssl=False)
        await conn.execute(
            "SET password_encryption = 'scram-sha-256'; CREATE ROLE emu_admin LOGIN; "
            "CREATE ROLE carol LOGIN PASSWORD 'carol-pw'"
        )
        (cluster.data_dir / "pg_hba.conf").write_text(
            "local all all trust\nhost all postgres 127.0.0.1/32 trust\n"
            "host all emu_admin 127.0.0.1/32 trust\nhost all all 127.0.0.1/32 scram-sha-256\n"
        )
        await conn.execute("SELECT pg_reload_conf()")
        await conn.close()
        async with RDSIAMEmulator(
            backend_host=cluster.host, backend_port=cluster.port, backend_user="emu_admin"
        ) as emulator:
            carol = await connect(emulator, "carol", "carol-pw")
            assert await carol.fetchval("SELECT current_user") == "carol"
            await carol.close()
            with pytest.raises(asyncpg.InvalidPasswordError) as wrong:
                await connect(emulator, "carol", "not-carol-pw")
            assert str(wrong.value) == 'password authentication failed for user "carol"'
            assert emulator.records[-1].reason == "backend_error"


async def test_trusting_backend_never_accepts_an_unchecked_password(
    postgres_server: PostgresServer, sql_user: tuple[str, str]
) -> None:
    """A trusting backend and an unreadable verifier: the password login is refused."""
    if postgres_server.kind != "local":
        pytest.skip("needs a backend that trusts its clients (the local throwaway cluster)")
    name, password = sql_user
    conn = await admin(postgres_server)
    await conn.execute("DROP ROLE IF EXISTS emu_reader; CREATE ROLE emu_reader LOGIN")
    try:
        async with RDSIAMEmulator(
            backend_host=postgres_server.host,
            backend_port=postgres_server.port,
            backend_user="emu_reader",
        ) as emulator:
            with pytest.raises(asyncpg.InvalidPasswordError):
                await connect(emulator, name, password)
            assert emulator.records[-1].reason == "password_unchecked"
    finally:
        await conn.execute("DROP ROLE emu_reader")
        await conn.close()
