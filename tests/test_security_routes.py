"""No route hands a token to a plaintext or unverified server, whatever the settings say.

Every public route (create_pool, min_size fill, `set_connect_args`, the SQLAlchemy engine, the
Starlette lifespan, ``asyncpg-iam psql`` and ``doctor``) is pointed at two listeners that stand
where an attacker would: one answers "N" to SSLRequest, one speaks TLS with a certificate that
nothing trusts. Both ask for a cleartext password and record what they get: it must be nothing,
for every sslmode from every source (argument, DSN, PGSSLMODE, a PGSERVICE service) and every
later change of the environment. Refused settings raise `ConfigurationError` naming the setting
and where it came from.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import trustme

import asyncpg_iam
from asyncpg_iam import ConfigurationError, Credentials, IAMAuth

from ._support import run_cli
from ._traps import Trap, untrusted_server_context

ENDPOINT = "mydb.abcdefghijkl.us-east-1.rds.amazonaws.com"
KEY = Credentials("AKIATRAPROUTES000001", "trap-routes-secret-" + "r" * 21)
MODES = ["disable", "allow", "prefer", "require", "verify-ca", "verify-full"]
REFUSED = {"disable", "allow", "prefer", "require"}
SOURCES = ["argument", "dsn", "PGSSLMODE", "PGSERVICE"]
# Anything a connect to a trap may raise: the point is what the trap received.
CONNECT_ERRORS = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, asyncio.TimeoutError)


def _auth(**kwargs: Any) -> IAMAuth:
    return IAMAuth(region="us-east-1", signing_host=ENDPOINT, credentials=KEY, **kwargs)


@pytest.fixture(autouse=True)
def _clean_libpq_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(os.environ):
        if name.startswith("PG"):
            monkeypatch.delenv(name)
    # No RDS bundle cached: verify modes use the system store, which trusts no trap.
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("ASYNCPG_IAM_CA_BUNDLE", raising=False)


@pytest.fixture(params=["plaintext", "untrusted-tls"])
async def trap(request: pytest.FixtureRequest) -> AsyncIterator[Trap]:
    """A listener that declines TLS, or one whose certificate nothing trusts."""
    tls = untrusted_server_context() if request.param == "untrusted-tls" else None
    async with Trap(tls=tls) as listener:
        yield listener


def _assert_nothing_sent(trap: Trap) -> None:
    assert trap.connections >= 1, f"the route never reached the trap: {trap.summary()}"
    assert trap.passwords == [], f"a password reached the trap: {trap.summary()}"
    if trap.tls is None:
        assert trap.startups == 0, "not even the startup message went in clear"


def _mode_settings(
    source: str, mode: str, port: int, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> tuple[str | None, dict[str, Any], str]:
    """Return (dsn, kwargs, how the error names the source) that choose `mode` from `source`."""
    if source == "argument":
        return None, {"host": "127.0.0.1", "port": port}, f"ssl='{mode}'"
    if source == "dsn":
        return f"postgresql://app@127.0.0.1:{port}/app?sslmode={mode}", {}, "in the DSN"
    if source == "PGSSLMODE":
        monkeypatch.setenv("PGSSLMODE", mode)
        return None, {"host": "127.0.0.1", "port": port}, f"PGSSLMODE={mode} in the environment"
    services = tmp_path / "pg_service.conf"
    services.write_text(f"[trap]\nsslmode={mode}\n")
    monkeypatch.setenv("PGSERVICEFILE", str(services))
    monkeypatch.setenv("PGSERVICE", "trap")
    return None, {"host": "127.0.0.1", "port": port}, "in service 'trap'"


# -- create_pool, min_size fill -------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("source", SOURCES)
async def test_create_pool_by_mode_and_source(
    trap: Trap, mode: str, source: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A refused sslmode names its source; an accepted one sends no token to the trap."""
    dsn, kwargs, named = _mode_settings(source, mode, trap.port, monkeypatch, tmp_path)
    if source == "argument":
        kwargs["ssl"] = mode
    arguments = {"user": "app", "database": "app", "iam": _auth(), "min_size": 0, "timeout": 5}
    if mode in REFUSED:
        with pytest.raises(ConfigurationError) as caught:
            asyncpg_iam.create_pool(dsn, **arguments, **kwargs)
        assert named in str(caught.value)
        assert f"'{mode}'" in str(caught.value)
        assert trap.connections == 0
        return
    async with asyncpg_iam.create_pool(dsn, **arguments, **kwargs) as pool:
        with pytest.raises(CONNECT_ERRORS):
            await pool.fetchval("SELECT 1")
    _assert_nothing_sent(trap)


async def test_min_size_fill_sends_no_token(trap: Trap) -> None:
    """The connections that fill min_size at creation go through the same TLS policy."""
    pool = asyncpg_iam.create_pool(
        host="127.0.0.1", port=trap.port, user="app", iam=_auth(), min_size=2, timeout=5
    )
    with pytest.raises(CONNECT_ERRORS):
        await pool
    _assert_nothing_sent(trap)


async def test_a_context_that_does_not_verify_is_refused(trap: Trap) -> None:
    """An ssl.SSLContext with CERT_NONE counts as sslmode require: refused without the opt-in."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with pytest.raises(ConfigurationError, match=r"'require' \(from ssl=<ssl.SSLContext>\)"):
        asyncpg_iam.create_pool(
            host="127.0.0.1", port=trap.port, user="app", iam=_auth(), ssl=context
        )


async def test_unverified_tls_opt_in_is_what_it_says(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Control: with the opt-in, sslmode require hands the token to an untrusted server."""
    caplog.set_level(logging.WARNING, logger="asyncpg_iam.connect")
    async with Trap(tls=untrusted_server_context()) as trap:
        auth = _auth(insecure_unverified_tls=True)
        async with asyncpg_iam.create_pool(
            host="127.0.0.1",
            port=trap.port,
            user="app",
            iam=auth,
            ssl="require",
            min_size=0,
            timeout=5,
        ) as pool:
            with pytest.raises(CONNECT_ERRORS):
                await pool.fetchval("SELECT 1")
    assert len(trap.passwords) == 1, "the trap does catch a token sent without verification"
    warnings = [r for r in caplog.records if "without certificate verification" in r.message]
    assert len(warnings) == 1


# -- later changes: set_connect_args and the environment ---------------------------------------


@pytest.mark.parametrize(
    ("dsn", "kwargs", "named"),
    [
        (None, {"ssl": False}, "ssl=False"),
        (None, {"ssl": "prefer"}, "ssl='prefer'"),
        (None, {"ssl": "require"}, "ssl='require'"),
        ("postgresql://app@127.0.0.1:1/app?sslmode=disable", {}, "sslmode=disable in the DSN"),
        (None, {"password": "x"}, "password cannot be combined"),
    ],
)
async def test_set_connect_args_is_planned_like_create_pool(
    trap: Trap, dsn: str | None, kwargs: dict[str, Any], named: str
) -> None:
    """A refused set_connect_args raises before anything is sent and keeps the old arguments."""
    async with asyncpg_iam.create_pool(
        host="127.0.0.1", port=trap.port, user="app", iam=_auth(), min_size=0, timeout=5
    ) as pool:
        before = pool._connector.plan
        arguments = {"host": "127.0.0.1", "port": trap.port, "user": "app", **kwargs}
        if dsn is not None:
            arguments = {}
        with pytest.raises(ConfigurationError, match=named):
            pool.set_connect_args(dsn, **arguments)
        assert pool._connector.plan is before
        with pytest.raises(CONNECT_ERRORS):
            await pool.fetchval("SELECT 1")
    _assert_nothing_sent(trap)


async def test_asyncpg_set_connect_args_on_the_pool_changes_nothing(trap: Trap) -> None:
    """asyncpg's own set_connect_args, called on our pool, cannot turn TLS off."""
    async with asyncpg_iam.create_pool(
        host="127.0.0.1", port=trap.port, user="app", iam=_auth(), min_size=0, timeout=5
    ) as pool:
        asyncpg.Pool.set_connect_args(pool, host="127.0.0.1", port=trap.port, ssl=False)
        with pytest.raises(CONNECT_ERRORS):
            await pool.fetchval("SELECT 1")
    _assert_nothing_sent(trap)


async def test_set_connect_args_signs_for_the_new_host() -> None:
    """An accepted set_connect_args dials and signs for the new host; no ssl means verify-full."""
    async with (
        Trap() as old,
        Trap() as new,
        asyncpg_iam.create_pool(
            host="127.0.0.1",
            port=old.port,
            user="app",
            iam=IAMAuth(region="us-east-1", credentials=KEY),
            min_size=0,
            timeout=5,
        ) as pool,
    ):
        pool.set_connect_args(host="localhost", port=new.port, user="app")
        target = pool.settings.signing_targets[0]
        assert (target.host, target.port, target.signing_host) == (
            "localhost",
            new.port,
            "localhost",
        )
        assert pool.settings.tls_mode == "verify-full"
        with pytest.raises(CONNECT_ERRORS):
            await pool.fetchval("SELECT 1")
    assert old.connections == 0
    _assert_nothing_sent(new)


@pytest.mark.parametrize("later", ["disable", "prefer", "allow"])
async def test_environment_changed_after_creation_changes_nothing(
    trap: Trap, later: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """PGSSLMODE, PGSSLROOTCERT, PGHOST and PGSERVICE set after creation are never read."""
    monkeypatch.setenv("PGSSLMODE", "require")
    async with asyncpg_iam.create_pool(
        host="127.0.0.1",
        port=trap.port,
        user="app",
        min_size=0,
        timeout=5,
        iam=_auth(insecure_unverified_tls=True),
    ) as pool:
        async with Trap() as elsewhere:
            services = tmp_path / "pg_service.conf"
            services.write_text(f"[evil]\nsslmode=disable\nport={elsewhere.port}\n")
            monkeypatch.setenv("PGSSLMODE", later)
            monkeypatch.setenv("PGSERVICEFILE", str(services))
            monkeypatch.setenv("PGSERVICE", "evil")
            monkeypatch.setenv("PGHOST", "127.0.0.1")
            monkeypatch.setenv("PGPORT", str(elsewhere.port))
            with pytest.raises(CONNECT_ERRORS):
                await pool.fetchval("SELECT 1")
        assert elsewhere.connections == 0
    assert trap.ssl_requests >= 1
    if trap.tls is None:
        _assert_nothing_sent(trap)  # TLS or nothing: never the plaintext PGSSLMODE=later


# -- integrations -------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
async def test_sqlalchemy_engine_by_mode(
    trap: Trap, mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The engine refuses what the pool refuses and sends no token to the trap."""
    from asyncpg_iam.sqlalchemy import create_async_engine

    url = f"postgresql+asyncpg://app@127.0.0.1:{trap.port}/app"
    if mode in REFUSED:
        with pytest.raises(ConfigurationError, match=f"'{mode}'"):
            create_async_engine(url, iam=_auth(), connect_args={"ssl": mode})
        monkeypatch.setenv("PGSSLMODE", mode)
        with pytest.raises(ConfigurationError, match=f"PGSSLMODE={mode} in the environment"):
            create_async_engine(url, iam=_auth())
        return
    engine = create_async_engine(url, iam=_auth(), connect_args={"ssl": mode, "timeout": 5})
    monkeypatch.setenv("PGSSLMODE", "disable")  # read late by asyncpg; never by the engine
    try:
        from sqlalchemy.exc import DBAPIError

        # SQLAlchemy wraps the driver's error (a connect error, never a ConfigurationError).
        with pytest.raises((DBAPIError, *CONNECT_ERRORS)):
            async with engine.connect():
                pass
    finally:
        await engine.dispose()
    _assert_nothing_sent(trap)


async def test_starlette_lifespan_sends_no_token(trap: Trap) -> None:
    """The lifespan's startup connect fails against the trap without sending a token."""
    from asyncpg_iam.starlette import lifespan

    run = lifespan(host="127.0.0.1", port=trap.port, user="app", iam=_auth(), timeout=5)
    with pytest.raises(CONNECT_ERRORS):
        async with run(object()):
            pass
    _assert_nothing_sent(trap)
    with pytest.raises(ConfigurationError, match="'prefer'"):
        async with lifespan(
            host="127.0.0.1", port=trap.port, user="app", iam=_auth(), ssl="prefer"
        )(object()):
            pass


# -- the command line ---------------------------------------------------------------------------


def _cli_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "AWS_"))}
    env.update(
        AWS_ACCESS_KEY_ID=KEY.access_key,
        AWS_SECRET_ACCESS_KEY=KEY.secret_key,
        AWS_CONFIG_FILE=str(tmp_path / "no-config"),
        AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "no-credentials"),
        AWS_EC2_METADATA_DISABLED="true",
        XDG_CACHE_HOME=str(tmp_path / "cache"),
        **extra,
    )
    return env


async def _cli(
    command: str, port: int, tmp_path: Path, *options: str, **variables: str
) -> tuple[int, str, str]:
    """Run `command` for user app at 127.0.0.1:`port`, signing in us-east-1 with a test key."""
    target = ("--host", "127.0.0.1", "--port", str(port), "--user", "app", "--region", "us-east-1")
    return await run_cli(command, *target, *options, env=_cli_env(tmp_path, **variables))


def _other_ca(tmp_path: Path) -> str:
    path = tmp_path / "other-ca.pem"
    path.write_bytes(trustme.CA().cert_pem.bytes())
    return str(path)


@contextlib.asynccontextmanager
async def _service_pointing_at_plaintext(
    tmp_path: Path, sslmode: str | None
) -> AsyncIterator[tuple[Trap, dict[str, str]]]:
    async with Trap() as elsewhere:
        services = tmp_path / "pg_service.conf"
        entry = f"[evil]\nhost=127.0.0.1\nhostaddr=127.0.0.1\nport={elsewhere.port}\n"
        services.write_text(entry + (f"sslmode={sslmode}\n" if sslmode else ""))
        variables = {
            "PGSERVICEFILE": str(services),
            "PGSERVICE": "evil",
            "PGHOSTADDR": "127.0.0.1",
            "PGREQUIRESSL": "0",
            "PGSSLNEGOTIATION": "postgres",
            "PGPASSFILE": str(tmp_path / "pgpass"),
        }
        yield elsewhere, variables


async def test_psql_connects_only_where_the_plan_says(trap: Trap, tmp_path: Path) -> None:
    """psql gets verify-full and the plan's CA; PGSERVICE, PGHOSTADDR & co. are dropped."""
    psql = shutil.which("psql")
    if psql is None:
        pytest.skip("psql is not installed")
    async with _service_pointing_at_plaintext(tmp_path, None) as (elsewhere, variables):
        code, out, err = await _cli(
            "psql",
            trap.port,
            tmp_path,
            "--signing-host",
            ENDPOINT,
            "--ca",
            _other_ca(tmp_path),
            "--psql",
            psql,
            "--",
            "-c",
            "SELECT 1",
            **variables,
        )
    assert code != 0, out + err
    assert elsewhere.connections == 0, "the service entry was never dialled"
    assert trap.connections >= 1, err
    _assert_nothing_sent(trap)


@pytest.mark.parametrize(
    ("variables", "named"),
    [
        ({"PGSSLMODE": "require"}, "PGSSLMODE=require in the environment"),
        ({"PGSSLMODE": "disable"}, "PGSSLMODE=disable in the environment"),
        ({"PGSERVICE": "evil"}, "sslmode=disable in service 'evil'"),
    ],
)
async def test_psql_refuses_weak_tls_from_the_environment(
    tmp_path: Path, variables: dict[str, str], named: str
) -> None:
    """psql refuses, before signing, an sslmode the pool would refuse, naming its source."""
    async with _service_pointing_at_plaintext(tmp_path, "disable") as (elsewhere, service):
        variables = {**variables, "PGSERVICEFILE": service["PGSERVICEFILE"]}
        code, _out, err = await _cli(
            "psql",
            elsewhere.port,
            tmp_path,
            "--ca",
            _other_ca(tmp_path),
            "--psql",
            "/bin/true",
            **variables,
        )
    assert code == 2
    assert named in err
    assert elsewhere.connections == 0


@pytest.mark.parametrize(
    "extra", [["-h", "evil"], ["--host=evil"], ["-p5433"], ["postgresql://evil/db"], ["-U", "x"]]
)
async def test_psql_refuses_arguments_that_choose_the_server(
    tmp_path: Path, extra: list[str]
) -> None:
    """psql arguments that pick another server, user or database are refused."""
    code, _out, err = await _cli(
        "psql", 5432, tmp_path, "--ca", _other_ca(tmp_path), "--psql", "/bin/true", "--", *extra
    )
    assert code == 2
    assert "would choose the server" in err


async def test_doctor_sends_no_token_to_the_trap(trap: Trap, tmp_path: Path) -> None:
    """The doctor's login goes through the pool's plan: no verified TLS, no token."""
    code, out, _err = await _cli(
        "doctor",
        trap.port,
        tmp_path,
        "--signing-host",
        ENDPOINT,
        "--timeout",
        "5",
        PGSSLMODE="verify-ca",
    )
    assert code == 1
    assert "[FAIL] tls" in out
    assert "[SKIP] login" in out
    _assert_nothing_sent(trap)


async def test_doctor_reports_a_refused_sslmode(tmp_path: Path) -> None:
    """PGSSLMODE=require makes the doctor's TLS check fail with the pool's own refusal."""
    async with Trap(tls=untrusted_server_context()) as trap:
        code, out, _err = await _cli(
            "doctor", trap.port, tmp_path, "--timeout", "5", PGSSLMODE="require"
        )
    assert code == 1
    assert "PGSSLMODE=require in the environment" in out
    assert trap.passwords == []
