"""RDS Proxy: the emulator's proxy mode (pinning rules, ``options``) and the pool's defaults."""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
import pytest_asyncio
import trustme

import asyncpg_iam
from asyncpg_iam import ConfigurationError, Credentials, IAMAuth, TLSVerificationError
from asyncpg_iam._connect import plan_connect
from asyncpg_iam._proxy import is_proxy_host
from asyncpg_iam.testing import (
    DEFAULT_PROXY_ENDPOINT,
    AccessKey,
    PinRules,
    PostgresServer,
    RDSIAMEmulator,
)
from asyncpg_iam.testing._proxy import classify

PROXY = DEFAULT_PROXY_ENDPOINT


# -- the pinning rules ----------------------------------------------------------------------------

PINS = [
    ("SET search_path = app", "set"),
    ("set application_name to 'x'", "set"),
    ("SET SESSION statement_timeout = 5", "set"),
    ("SET SESSION AUTHORIZATION app", "set"),
    ("RESET ALL", "set"),
    ("SELECT set_config('search_path', 'app', false)", "settings"),
    ("SELECT set_config($1, $2, $3)", "settings"),
    ("PREPARE q AS SELECT 1", "prepare"),
    ("EXECUTE q", "prepare"),
    ("DEALLOCATE q", "prepare"),
    ("CREATE TEMP TABLE t (x int)", "temporary"),
    ("CREATE TEMPORARY SEQUENCE s", "temporary"),
    ("CREATE OR REPLACE TEMP VIEW v AS SELECT 1", "temporary"),
    ("CREATE GLOBAL TEMPORARY TABLE t (x int)", "temporary"),
    ("SELECT 1 AS x INTO TEMP t", "temporary"),
    ("DECLARE c CURSOR WITH HOLD FOR SELECT 1", "cursor"),
    ("DECLARE c CURSOR FOR SELECT 1", "cursor"),
    ("DISCARD ALL", "discard"),
    ("LISTEN jobs", "listen"),
    ("LOAD 'auto_explain'", "load"),
    ("SELECT nextval('s')", "sequence"),
    ("SELECT pg_catalog.setval('s', 5)", "sequence"),
    ("SELECT currval('s')", "sequence"),
    ("SELECT pg_advisory_lock(1)", "advisory_lock"),
    ("SELECT pg_try_advisory_lock(1)", "advisory_lock"),
    ("SELECT pg_advisory_unlock_all()", "advisory_lock"),
    ("SELECT 1; SET work_mem = '64MB'", "set"),
]
NO_PINS = [
    "SELECT 1",
    "SET LOCAL search_path = app",
    "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
    "SET CONSTRAINTS ALL DEFERRED",
    "SELECT set_config('search_path', 'app', true)",
    "SELECT pg_advisory_xact_lock(1)",
    "SELECT pg_try_advisory_xact_lock(1)",
    "UNLISTEN *",
    "CLOSE ALL",
    "CREATE TABLE temp (x int)",
    "SELECT 'SET search_path = x', \"nextval\" FROM t",
    "SELECT $$ LISTEN x $$",
    "-- SET x = 1\nSELECT 1",
    "/* DISCARD ALL */ SELECT 1",
    "INSERT INTO settings (name) VALUES ('set')",
    "BEGIN; SELECT 1; COMMIT",
]


@pytest.mark.parametrize(("sql", "rule"), PINS)
def test_each_documented_condition_pins(sql: str, rule: str) -> None:
    """Each condition of AWS's PostgreSQL pinning list is recognised under its rule."""
    assert classify(sql) == rule


@pytest.mark.parametrize("sql", NO_PINS)
def test_transaction_scoped_state_and_literals_do_not_pin(sql: str) -> None:
    """Transaction-scoped state, state removal, and keywords inside literals or comments do
    not pin."""
    assert classify(sql) is None


def test_rule_switches_change_the_documented_gaps() -> None:
    """The switches choose the rules where AWS's page is silent (cursors without HOLD, RESET)."""
    with_hold_only = PinRules(cursors="with_hold", reset_pins=False)
    assert classify("DECLARE c CURSOR FOR SELECT 1", with_hold_only) is None
    assert classify("DECLARE c CURSOR WITH HOLD FOR SELECT 1", with_hold_only) == "cursor"
    assert classify("RESET ALL", with_hold_only) is None


def test_proxy_endpoint_names() -> None:
    """Proxy endpoints are told from instance, cluster and look-alike names."""
    assert is_proxy_host(PROXY)
    assert is_proxy_host("app.proxy-abc.cn-north-1.rds.amazonaws.com.cn")
    assert is_proxy_host("app-ro.endpoint.proxy-abc.us-east-1.rds.amazonaws.com") is False
    assert not is_proxy_host("mydb.cluster-abc.us-east-1.rds.amazonaws.com")
    assert not is_proxy_host("app.proxy-abc.us-east-1.rds.example.com")


# -- through the emulator in proxy mode ------------------------------------------------------------


def _credentials(key: AccessKey) -> Credentials:
    return Credentials(key.access_key, key.secret_key, key.session_token)


def _proxy_pool_kwargs(
    emulator: RDSIAMEmulator, server: PostgresServer, key: AccessKey, **overrides: Any
) -> dict[str, Any]:
    iam = IAMAuth(signing_host=emulator.endpoint, credentials=_credentials(key))
    return emulator.pool_kwargs(
        user=server.user,
        database=server.database,
        iam=iam,
        **{"min_size": 1, "max_size": 2, **overrides},
    )


def _token(emulator: RDSIAMEmulator, server: PostgresServer, key: AccessKey) -> str:
    return asyncpg_iam.build_auth_token(
        host=emulator.endpoint,
        port=emulator.port,
        user=server.user,
        region=emulator.region,
        credentials=_credentials(key),
    )


@pytest_asyncio.fixture
async def mood(postgres_server: PostgresServer) -> AsyncIterator[str]:
    """An enum type and a composite type on the backend (their codecs need introspection)."""
    name = f"mood_{uuid.uuid4().hex[:8]}"
    con = await asyncpg.connect(postgres_server.dsn)
    try:
        await con.execute(f"CREATE TYPE {name} AS ENUM ('ok', 'sad')")
        await con.execute(f"CREATE TYPE {name}_pair AS (a int, b text)")
        yield name
    finally:
        await con.execute(f"DROP TYPE IF EXISTS {name}_pair; DROP TYPE IF EXISTS {name}")
        await con.close()


async def _workload(pool: Any, mood: str) -> None:
    """Queries, a transaction, JSON and custom codecs, an enum, and releases (resets)."""
    for _ in range(3):
        async with pool.acquire() as con:
            await con.set_type_codec(
                "json", encoder=lambda v: v, decoder=lambda v: v, schema="pg_catalog"
            )
            await con.set_type_codec(
                f"{mood}_pair", encoder=lambda v: v, decoder=lambda v: v, format="tuple"
            )
            assert await con.fetchval("SELECT $1::int + 1", 41) == 42
            async with con.transaction():
                await con.execute("SELECT 1")
            assert await con.fetchval(f"SELECT 'ok'::{mood}") == "ok"
            assert await con.fetchval(f"SELECT (1, 'x')::{mood}_pair") == (1, "x")
            assert await con.fetchval("SELECT '{\"a\": 1}'::json") == '{"a": 1}'


async def test_pool_on_defaults_never_pins(
    rds_proxy_emulator: RDSIAMEmulator,
    postgres_server: PostgresServer,
    rds_access_key: AccessKey,
    mood: str,
) -> None:
    """On a proxy endpoint the pool's defaults send nothing that pins: reset, introspection
    (enum, composite), codecs, transactions."""
    kwargs = _proxy_pool_kwargs(rds_proxy_emulator, postgres_server, rds_access_key)
    async with asyncpg_iam.create_pool(**kwargs) as pool:
        await _workload(pool, mood)
    report = rds_proxy_emulator.proxy_report()
    assert report.sessions >= 1
    assert report.pinned_sessions == 0, report.events


async def test_plain_asyncpg_pool_pins_by_its_reset_and_jit(
    rds_proxy_emulator: RDSIAMEmulator,
    postgres_server: PostgresServer,
    rds_access_key: AccessKey,
    mood: str,
) -> None:
    """asyncpg's own pool pins every session through what it sends by itself (the emulator
    attributes it to the library)."""
    kwargs = rds_proxy_emulator.connect_kwargs(
        user=postgres_server.user, database=postgres_server.database
    )
    token = _token(rds_proxy_emulator, postgres_server, rds_access_key)
    async with asyncpg.create_pool(**kwargs, password=token, min_size=1, max_size=2) as pool:
        await _workload(pool, mood)
    report = rds_proxy_emulator.proxy_report()
    assert report.pinned_sessions == report.sessions >= 1
    assert report.pinned_by_cause == {"library": report.sessions}
    assert set(report.pinned_by_rule) <= {"settings", "advisory_lock"}


async def test_user_sql_pins_are_counted_as_the_users(
    rds_proxy_emulator: RDSIAMEmulator,
    postgres_server: PostgresServer,
    rds_access_key: AccessKey,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A user's SET pins its session, counted under the user and logged as the proxy logs."""
    kwargs = _proxy_pool_kwargs(rds_proxy_emulator, postgres_server, rds_access_key)
    with caplog.at_level(logging.WARNING, logger="asyncpg_iam.testing.proxy"):
        async with asyncpg_iam.create_pool(**kwargs) as pool, pool.acquire() as con:
            await con.execute("SET search_path = public")
            await con.execute("SELECT pg_advisory_lock(7); SELECT pg_advisory_unlock(7)")
    report = rds_proxy_emulator.proxy_report()
    assert report.pinned_sessions == 1  # pinned once, at the first condition
    assert report.pinned_by_cause == {"user": 1}
    assert report.pinned_by_rule == {"set": 1}
    assert "Reason: A SET statement was detected." in caplog.text


async def test_parse_pins_only_with_the_former_rule(
    postgres_server: PostgresServer, rds_access_key: AccessKey
) -> None:
    """Protocol-level prepared statements are multiplexed now; `parse_pins` restores the old
    "A parse message was detected" rule."""
    for rules, pinned in ((PinRules(), 0), (PinRules(parse_pins=True), 1)):
        emulator = RDSIAMEmulator(
            backend_host=postgres_server.host,
            backend_port=postgres_server.port,
            backend_user=postgres_server.user,
            backend_password=postgres_server.password,
            endpoint=PROXY,
            proxy=rules,
            iam_users=[postgres_server.user],
        )
        emulator.register_key(rds_access_key.access_key, rds_access_key.secret_key)
        async with emulator:
            con = await asyncpg.connect(
                **emulator.connect_kwargs(
                    user=postgres_server.user, database=postgres_server.database
                ),
                password=_token(emulator, postgres_server, rds_access_key),
            )
            try:
                assert await con.fetchval("SELECT $1::int", 5) == 5
            finally:
                await con.close()
            assert emulator.proxy_report().pinned_sessions == pinned


async def test_options_startup_parameter_is_refused(
    rds_proxy_emulator: RDSIAMEmulator, postgres_server: PostgresServer, rds_access_key: AccessKey
) -> None:
    """The proxy mode refuses `options` with RDS Proxy's message; the pool refuses it before
    connecting."""
    kwargs = rds_proxy_emulator.connect_kwargs(
        user=postgres_server.user, database=postgres_server.database
    )
    with pytest.raises(asyncpg.FeatureNotSupportedError, match="command-line options"):
        await asyncpg.connect(
            **kwargs,
            password=_token(rds_proxy_emulator, postgres_server, rds_access_key),
            server_settings={"options": "-c statement_timeout=5s"},
        )
    assert rds_proxy_emulator.proxy_report().options_refused == 1
    assert rds_proxy_emulator.password_messages == 0
    pool_kwargs = _proxy_pool_kwargs(
        rds_proxy_emulator,
        postgres_server,
        rds_access_key,
        server_settings={"options": "-c statement_timeout=5s"},
    )
    with pytest.raises(ConfigurationError, match="server_settings="):
        asyncpg_iam.create_pool(**pool_kwargs)


async def test_server_settings_travel_in_the_startup_packet(
    rds_proxy_emulator: RDSIAMEmulator, postgres_server: PostgresServer, rds_access_key: AccessKey
) -> None:
    """server_settings reach the session without pinning it (startup parameters, no SET)."""
    kwargs = _proxy_pool_kwargs(
        rds_proxy_emulator,
        postgres_server,
        rds_access_key,
        server_settings={"statement_timeout": "7s", "jit": "off"},
    )
    async with asyncpg_iam.create_pool(**kwargs) as pool:
        assert await pool.fetchval("SHOW statement_timeout") == "7s"
    assert rds_proxy_emulator.proxy_report().pinned_sessions == 0


async def test_pool_hooks_warn_once_at_creation(
    rds_proxy_emulator: RDSIAMEmulator,
    postgres_server: PostgresServer,
    rds_access_key: AccessKey,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """init and setup on a proxy endpoint are named once, at creation, as places that pin."""

    async def init(con: Any) -> None:
        await con.execute("SET search_path = public")

    kwargs = _proxy_pool_kwargs(
        rds_proxy_emulator, postgres_server, rds_access_key, init=init, min_size=2
    )
    with caplog.at_level(logging.WARNING, logger="asyncpg_iam.pool"):
        async with asyncpg_iam.create_pool(**kwargs) as pool:
            await pool.fetchval("SELECT 1")
    warnings = [r for r in caplog.records if "RDS Proxy endpoint" in r.getMessage()]
    assert len(warnings) == 1
    assert "init runs your code on every new connection" in warnings[0].getMessage()
    assert rds_proxy_emulator.proxy_report().pinned_by_cause == {"user": 2}


def test_explicit_setting_and_plain_endpoints() -> None:
    """rds_proxy=True marks any endpoint a proxy; without it an instance endpoint is not one."""
    auth = IAMAuth(region="us-east-1", credentials=Credentials("AKIDEXAMPLE", "secret"))
    plain = plan_connect(
        None, {"host": "10.0.0.1", "user": "app", "sslrootcert": "system"}, auth=auth
    )
    marked = plan_connect(None, {"host": "10.0.0.1", "user": "app", "rds_proxy": True}, auth=auth)
    named = plan_connect(None, {"host": PROXY, "user": "app"}, auth=auth)
    assert (plain.rds_proxy, marked.rds_proxy, named.rds_proxy) == (False, True, True)
    assert marked.tls.mode == named.tls.mode == "verify-full"
    assert "system store" in named.tls.ca_source
    with pytest.raises(ConfigurationError, match="rds_proxy must be"):
        plan_connect(None, {"host": PROXY, "user": "app", "rds_proxy": "yes"}, auth=auth)


async def test_proxy_verifies_against_the_system_store(
    rds_proxy_emulator: RDSIAMEmulator,
    postgres_server: PostgresServer,
    rds_access_key: AccessKey,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Any,
) -> None:
    """A proxy endpoint verifies verify-full against the system store (a trustme CA stands in
    for it), not the RDS bundle; a store without the proxy's CA refuses before any token."""
    kwargs = _proxy_pool_kwargs(rds_proxy_emulator, postgres_server, rds_access_key)
    del kwargs["ssl"]  # the proxy's defaults decide
    rds_bundle = tmp_path / "rds-bundle.pem"
    trustme.CA().cert_pem.write_to_path(str(rds_bundle))
    monkeypatch.setenv("ASYNCPG_IAM_CA_BUNDLE", str(rds_bundle))  # the RDS bundle: not used
    monkeypatch.setenv("SSL_CERT_FILE", rds_proxy_emulator.ca_path)
    async with asyncpg_iam.create_pool(**kwargs) as pool:
        assert pool.settings.tls_mode == "verify-full"
        assert "system store" in pool.settings.ca_source
        assert await pool.fetchval("SELECT 1") == 1
    other = tmp_path / "other.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    monkeypatch.setenv("SSL_CERT_FILE", str(other))
    before = rds_proxy_emulator.password_messages
    with pytest.raises(TLSVerificationError):
        await asyncpg_iam.create_pool(**{**kwargs, "min_size": 1})
    assert rds_proxy_emulator.password_messages == before


async def test_options_in_the_dsn_and_a_reset_hook_on_a_proxy(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A DSN's options is refused, naming the DSN; a reset hook is named once as a place that
    runs on every release."""
    auth = IAMAuth(region="us-east-1", credentials=Credentials("AKIDEXAMPLE", "secret"))
    dsn = f"postgresql://app@{PROXY}/app?options=-c%20statement_timeout%3D5s"
    with pytest.raises(ConfigurationError, match="from the DSN"):
        asyncpg_iam.create_pool(dsn, iam=auth)

    async def reset(con: Any) -> None:
        await con.execute("RESET ALL")

    with caplog.at_level(logging.WARNING, logger="asyncpg_iam.pool"):
        asyncpg_iam.create_pool(host=PROXY, user="app", iam=auth, reset=reset)
    (warning,) = [r.getMessage() for r in caplog.records if "RDS Proxy endpoint" in r.getMessage()]
    assert "reset runs your code on every release" in warning
