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
import dataclasses
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

from ._support import run_cli, wait_for
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
    if mode == "verify-ca":
        # verify-ca needs a CA file (the system store is refused: see below).
        monkeypatch.setenv("ASYNCPG_IAM_CA_BUNDLE", _other_ca(tmp_path))
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
    trap: Trap, mode: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The engine refuses what the pool refuses and sends no token to the trap."""
    from asyncpg_iam.sqlalchemy import create_async_engine

    monkeypatch.setenv("ASYNCPG_IAM_CA_BUNDLE", _other_ca(tmp_path))

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


async def _doctor_refusing(tmp_path: Path, sslmode: str) -> str:
    """Run the doctor with PGSSLMODE=`sslmode` at a TLS server; check it failed and sent no
    password; return its output."""
    async with Trap(tls=untrusted_server_context()) as trap:
        code, out, _err = await _cli(
            "doctor", trap.port, tmp_path, "--timeout", "5", PGSSLMODE=sslmode
        )
    assert code == 1
    assert trap.passwords == []
    return out


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
    psql = _psql_or_skip()
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


def _psql_or_skip() -> str:
    psql = shutil.which("psql")
    if psql is None:
        pytest.skip("psql is not installed")
    return psql


@pytest.mark.parametrize(
    "extra",
    [
        ["-h", "127.0.0.1", "-p", "{elsewhere}"],
        ["--host=127.0.0.1", "--port={elsewhere}"],
        ["--dbn=postgresql://app@127.0.0.1:{elsewhere}/app?sslmode=disable"],
        ["--dbn=postgresql://app@127.0.0.1:{port}/app?sslmode=disable"],
        ["--db", "host=127.0.0.1 port={port} dbname=app user=app sslmode=disable"],
        ["-d", "service=evil"],
        ["postgresql://app@127.0.0.1:{port}/app?sslmode=disable"],
        ["-d", "sslmode=disable host=127.0.0.1 port={port}", "-c"],
        ["-U", "other", "-d", "sslmode=allow"],
    ],
    ids=[
        "-h -p",
        "--host --port",
        "--dbn elsewhere",
        "--dbn plaintext",
        "--db conninfo",
        "service",
        "positional URI",
        "trailing -c",
        "-U and allow",
    ],
)
async def test_psql_arguments_cannot_choose_the_server_or_lower_tls(
    trap: Trap, extra: list[str], tmp_path: Path
) -> None:
    """Whatever psql's arguments say (prefixes of long options included), psql connects
    where the plan says with verified TLS; no other server and no plaintext gets the token."""
    psql = _psql_or_skip()
    async with _service_pointing_at_plaintext(tmp_path, "disable") as (elsewhere, variables):
        arguments = [a.format(port=trap.port, elsewhere=elsewhere.port) for a in extra]
        code, out, err = await _cli(
            "psql",
            trap.port,
            tmp_path,
            "--ca",
            _other_ca(tmp_path),
            "--psql",
            psql,
            "--",
            *arguments,
            PGSERVICEFILE=variables["PGSERVICEFILE"],
            POSIXLY_CORRECT="1",
        )
    assert code != 0, out + err
    assert elsewhere.passwords == [], "another server received the token"
    _assert_nothing_sent(trap)


async def test_psql_refuses_a_double_dash(tmp_path: Path) -> None:
    """A `--` among psql's arguments is refused: it would turn the connection string into a name."""
    code, _out, err = await _cli(
        "psql", 5432, tmp_path, "--ca", _other_ca(tmp_path), "--psql", "/bin/true", "--", "--", "x"
    )
    assert code == 2
    assert "'--'" in err


async def test_psql_gets_the_token_only_through_a_scoped_password_file(tmp_path: Path) -> None:
    """psql's environment carries no PGPASSWORD; a password file names one host, port,
    database and user, and is gone once psql exits."""
    script = tmp_path / "fake-psql"
    seen = tmp_path / "seen"
    script.write_text(
        "#!/bin/sh\n"
        f"env > {seen}.env\n"
        f'printf "%s\\n" "$@" > {seen}.argv\n'
        'pass=$(printf "%s\\n" "$@" | sed -n "s/.*passfile=\'\\([^\']*\\)\'.*/\\1/p" | head -1)\n'
        f'cp "$pass" {seen}.pgpass\n'
    )
    script.chmod(0o755)
    code, out, err = await _cli(
        "psql", 5432, tmp_path, "--ca", _other_ca(tmp_path), "--psql", str(script), "--", "-X"
    )
    assert code == 0, out + err
    environment = (tmp_path / "seen.env").read_text()
    assert "PGPASSWORD" not in environment
    argv = (tmp_path / "seen.argv").read_text().splitlines()
    assert argv[0] == "-X"
    assert argv[1] == argv[2]
    assert argv[1].startswith("--dbname=")
    assert "sslmode='verify-full'" in argv[1]
    line = (tmp_path / "seen.pgpass").read_text().strip()
    assert line.startswith("127.0.0.1:5432:app:app:")
    assert "X-Amz-Signature" in line
    passfile = argv[1].split("passfile='")[1].split("'")[0]
    assert not await asyncio.to_thread(Path(passfile).exists), "the password file outlived psql"


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
    out = await _doctor_refusing(tmp_path, "require")
    assert "PGSSLMODE=require in the environment" in out


# -- every libpq TLS parameter, from every source (issue 27, class 1) -------------------------

# A value of each parameter that cannot be applied: each must be refused, naming it and where
# it came from. (sslmode has its own tests above.)
UNUSABLE = {
    "sslrootcert": "/nonexistent/root.pem",
    "sslcert": "/nonexistent/client.pem",
    "sslkey": "/nonexistent/client.key",
    "sslpassword": "key-password",
    "sslcrl": "/nonexistent/revoked.pem",
    "sslcrldir": "/nonexistent/crls",
    "sslsni": "0",
    "ssl_min_protocol_version": "SSLv3",
    "ssl_max_protocol_version": "TLSv9",
    "sslnegotiation": "sideways",
    "sslcertmode": "require",
}
TLS_SOURCES = ["argument", "dsn", "service", "environment"]


def _tls_parameter(
    source: str,
    name: str,
    value: str,
    port: int,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    **more: str,
) -> tuple[str | None, dict[str, Any], str]:
    """Return (dsn, kwargs, the source as a message names it) that set `name` from `source`
    (and `more` parameters from the same source)."""
    from asyncpg_iam._tls import TLS_PARAMETERS

    settings = {name: value, **more}
    target: dict[str, Any] = {"host": "127.0.0.1", "port": port}
    if source == "argument":
        return None, {**target, **settings}, f"{name}="
    if source == "dsn":
        query = "&".join(f"{k}={v}" for k, v in settings.items())
        return f"postgresql://app@127.0.0.1:{port}/app?{query}", {}, f"{name}="
    if source == "service":
        services = tmp_path / "pg_service.conf"
        services.write_text("[trap]\n" + "".join(f"{k}={v}\n" for k, v in settings.items()))
        monkeypatch.setenv("PGSERVICEFILE", str(services))
        monkeypatch.setenv("PGSERVICE", "trap")
        return None, target, "in service 'trap'"
    variables = {k: TLS_PARAMETERS[k] for k in settings}
    if variables[name] is None:
        pytest.skip(f"libpq reads no environment variable for {name}")
    for key, variable in variables.items():
        if variable is not None:
            monkeypatch.setenv(variable, settings[key])
    return None, target, f"{variables[name]}="


def _expected_source(source: str, name: str) -> str:
    return {
        "argument": f"{name}=",
        "dsn": "in the DSN",
        "service": "in service 'trap'",
        "environment": "in the environment",
    }[source]


def _named_by(entry: str, text: str) -> str:
    """How `entry`'s messages name a source: the engine's DSN is its URL."""
    return text.replace("in the DSN", "in the URL") if entry == "engine" else text


async def _plan_through(entry: str, dsn: str | None, kwargs: dict[str, Any]) -> None:
    """Make a connect plan from `dsn` and `kwargs` through one entry point."""
    arguments = {"user": "app", "iam": _auth(), "timeout": 5, **kwargs}
    if entry == "pool":
        pool = asyncpg_iam.create_pool(dsn, min_size=0, **arguments)
        await pool.close()
    elif entry == "set_connect_args":
        port = kwargs.get("port", 5432)
        async with asyncpg_iam.create_pool(
            host="127.0.0.1", port=port, user="app", iam=_auth(), min_size=0
        ) as pool:
            arguments.pop("iam")
            pool.set_connect_args(dsn, **arguments)
    elif entry == "engine":
        from asyncpg_iam.sqlalchemy import create_async_engine

        # The DSN's query goes in the URL: the plan reads both alike.
        if dsn is not None:
            url = dsn.replace("postgresql://", "postgresql+asyncpg://", 1)
        else:
            url = f"postgresql+asyncpg://app@{kwargs['host']}:{kwargs['port']}/app"
        connect_args = {k: v for k, v in kwargs.items() if k not in ("host", "port")}
        engine = create_async_engine(url, iam=_auth(), connect_args=connect_args)
        await engine.dispose()
    else:
        from asyncpg_iam.starlette import lifespan

        with contextlib.suppress(*CONNECT_ERRORS):
            async with lifespan(dsn, min_size=0, **arguments)(object()):
                pass


ENTRIES = ["pool", "set_connect_args", "engine", "Starlette"]


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("source", TLS_SOURCES)
@pytest.mark.parametrize("name", sorted(UNUSABLE))
async def test_every_tls_parameter_is_applied_or_refused(
    entry: str, source: str, name: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A TLS parameter that cannot be applied is refused, naming it and its source."""
    async with Trap() as trap:
        dsn, kwargs, named = _tls_parameter(
            source, name, UNUSABLE[name], trap.port, monkeypatch, tmp_path
        )
        with pytest.raises(ConfigurationError) as caught:
            await _plan_through(entry, dsn, kwargs)
    message = str(caught.value)
    assert named in message
    assert _named_by(entry, _expected_source(source, name)) in message
    assert "key-password" not in message, "a key's password is never shown"
    assert trap.passwords == []


@pytest.mark.parametrize("entry", ["doctor", "psql"])
@pytest.mark.parametrize("source", ["service", "environment"])
@pytest.mark.parametrize("name", ["sslcrl", "sslsni", "ssl_min_protocol_version", "sslcertmode"])
async def test_the_command_line_refuses_what_the_pool_refuses(
    entry: str, source: str, name: str, tmp_path: Path
) -> None:
    """doctor and psql report the pool's refusal of a TLS parameter, naming its source."""
    from asyncpg_iam._tls import TLS_PARAMETERS

    variables: dict[str, str] = {}
    if source == "service":
        services = tmp_path / "pg_service.conf"
        services.write_text(f"[trap]\n{name}={UNUSABLE[name]}\n")
        variables.update(PGSERVICEFILE=str(services), PGSERVICE="trap")
        named = f"{name}={UNUSABLE[name]} in service 'trap'"
    else:
        variable = TLS_PARAMETERS[name]
        assert variable is not None
        variables[variable] = UNUSABLE[name]
        named = f"{variable}={UNUSABLE[name]} in the environment"
    async with Trap() as trap:
        options = ["--ca", _other_ca(tmp_path)]
        if entry == "psql":
            options += ["--psql", "/bin/true"]
        else:
            options += ["--timeout", "5"]
        code, out, err = await _cli(entry, trap.port, tmp_path, *options, **variables)
    assert code != 0
    assert named in out + err
    assert trap.passwords == []


@dataclasses.dataclass
class _TrustedServer:
    """A TLS server context for 127.0.0.1 from a CA in `ca_path`, and a CRL revoking it."""

    context: ssl.SSLContext
    ca_path: str
    crl_path: str
    crl_dir: str


def _trusted_server(tmp_path: Path, *, tls13_only: bool = False) -> _TrustedServer:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization

    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    leaf.configure_cert(context)
    if tls13_only:
        context.minimum_version = ssl.TLSVersion.TLSv1_3
    ca_path = tmp_path / "trusted-ca.pem"
    ca_path.write_bytes(ca.cert_pem.bytes())
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem.bytes())
    leaf_cert = x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes())
    key = serialization.load_pem_private_key(ca.private_key_pem.bytes(), password=None)
    now = datetime.datetime.now(datetime.timezone.utc)
    revoked = (
        x509.RevokedCertificateBuilder()
        .serial_number(leaf_cert.serial_number)
        .revocation_date(now - datetime.timedelta(hours=1))
        .build()
    )
    crl = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now - datetime.timedelta(hours=1))
        .next_update(now + datetime.timedelta(days=1))
        .add_revoked_certificate(revoked)
        .sign(key, hashes.SHA256())  # type: ignore[arg-type]
    )
    crl_pem = crl.public_bytes(serialization.Encoding.PEM)
    crl_path = tmp_path / "revoked.pem"
    crl_path.write_bytes(crl_pem)
    crl_dir = tmp_path / "crls"
    crl_dir.mkdir()
    # OpenSSL's hashed-directory name for a CRL: <subject hash>.r0.
    (crl_dir / f"{_subject_hash(ca_path)}.r0").write_bytes(crl_pem)
    return _TrustedServer(context, str(ca_path), str(crl_path), str(crl_dir))


def _subject_hash(ca_path: Path) -> str:
    import subprocess

    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is needed to name a hashed CRL directory")
    out = subprocess.run(
        [openssl, "x509", "-noout", "-subject_hash", "-in", str(ca_path)],
        check=True,
        capture_output=True,
        text=True,
    )
    return out.stdout.strip()


@pytest.mark.parametrize(
    ("name", "server"),
    [
        ("sslcrl", "revoked"),
        ("sslcrldir", "revoked"),
        ("ssl_max_protocol_version", "tls13"),
        (None, "revoked"),
    ],
    ids=["sslcrl", "sslcrldir", "ssl_max_protocol_version", "control"],
)
@pytest.mark.parametrize("source", TLS_SOURCES)
async def test_tls_parameters_are_honoured(
    name: str | None,
    server: str,
    source: str,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """A revocation list or a TLS version cap from any source keeps the token from a server
    it rules out; without it (control) the same trusted server receives the token."""
    trusted = _trusted_server(tmp_path, tls13_only=server == "tls13")
    values = {
        "sslcrl": trusted.crl_path,
        "sslcrldir": trusted.crl_dir,
        "ssl_max_protocol_version": "TLSv1.2",
    }
    async with Trap(tls=trusted.context) as trap:
        if name is None:
            dsn, kwargs, _ = _tls_parameter(
                source, "sslrootcert", trusted.ca_path, trap.port, monkeypatch, tmp_path
            )
        else:
            dsn, kwargs, _ = _tls_parameter(
                source,
                name,
                values[name],
                trap.port,
                monkeypatch,
                tmp_path,
                sslrootcert=trusted.ca_path,
            )
        async with asyncpg_iam.create_pool(
            dsn, user="app", iam=_auth(), min_size=0, timeout=5, **kwargs
        ) as pool:
            with pytest.raises(CONNECT_ERRORS):
                await pool.fetchval("SELECT 1")
    if name is None:
        assert len(trap.passwords) == 1, "the trusted server does receive the token"
    else:
        assert trap.passwords == [], f"{name} was not honoured: {trap.summary()}"


async def test_doctor_honours_a_revocation_list(tmp_path: Path) -> None:
    """The doctor's TLS check fails on a revoked certificate (PGSSLCRL) and sends no token."""
    trusted = _trusted_server(tmp_path)
    async with Trap(tls=trusted.context) as trap:
        code, out, _err = await _cli(
            "doctor",
            trap.port,
            tmp_path,
            "--ca",
            trusted.ca_path,
            "--timeout",
            "5",
            PGSSLCRL=trusted.crl_path,
        )
    assert code == 1
    assert "[FAIL] tls" in out
    assert "revoked" in out
    assert trap.passwords == []


# -- verify-ca against the system store is refused (class 1) ----------------------------------

DSQL_ENDPOINT = "abcdefghijklmnopqrstuvwxyz.dsql.us-east-1.on.aws"


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("store", ["no bundle cached", "sslrootcert=system", "dsql"])
@pytest.mark.parametrize("source", SOURCES)
async def test_verify_ca_with_the_system_store_is_refused(
    entry: str, store: str, source: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """verify-ca with the system store (which trusts any public certificate for any name)
    is refused, from every source and entry point, naming the sslmode's source."""
    async with Trap() as trap:
        dsn, kwargs, named = _mode_settings(source, "verify-ca", trap.port, monkeypatch, tmp_path)
        if source == "argument":
            kwargs["ssl"] = "verify-ca"
        if store == "sslrootcert=system":
            if dsn is not None:
                dsn += "&sslrootcert=system"
            else:
                kwargs["sslrootcert"] = "system"
        if store == "dsql":
            monkeypatch.setattr(
                "tests.test_security_routes._auth",
                lambda **kw: IAMAuth(region="us-east-1", credentials=KEY, service="dsql", **kw),
            )
            if dsn is not None:
                dsn = dsn.replace("127.0.0.1", DSQL_ENDPOINT)
            else:
                kwargs["host"] = DSQL_ENDPOINT
        with pytest.raises(ConfigurationError) as caught:
            await _plan_through(entry, dsn, kwargs)
    message = str(caught.value)
    assert "'verify-ca'" in message
    assert "system store" in message
    assert _named_by(entry, named) in message
    assert trap.connections == 0


async def test_verify_ca_with_a_ca_file_is_accepted(tmp_path: Path) -> None:
    """Control: verify-ca with a CA file verifies the chain (the trap's is not in it)."""
    async with (
        Trap(tls=untrusted_server_context()) as trap,
        asyncpg_iam.create_pool(
            host="127.0.0.1",
            port=trap.port,
            user="app",
            iam=_auth(),
            ssl="verify-ca",
            sslrootcert=_other_ca(tmp_path),
            min_size=0,
            timeout=5,
        ) as pool,
    ):
        assert pool.settings.tls_mode == "verify-ca"
        with pytest.raises(CONNECT_ERRORS):
            await pool.fetchval("SELECT 1")
    _assert_nothing_sent(trap)


async def test_doctor_refuses_verify_ca_with_the_system_store(tmp_path: Path) -> None:
    """The doctor reports the pool's refusal of verify-ca with no RDS bundle cached."""
    out = await _doctor_refusing(tmp_path, "verify-ca")
    assert "system store" in out
    assert "PGSSLMODE=verify-ca in the environment" in out


# -- a caller's context cannot change under the pool (class 2) ---------------------------------


def _weaken(context: ssl.SSLContext, how: str) -> None:
    context.check_hostname = False
    if how == "CERT_NONE":
        context.verify_mode = ssl.CERT_NONE


@pytest.mark.parametrize("how", ["CERT_NONE", "check_hostname"])
@pytest.mark.parametrize("entry", ["pool", "set_connect_args", "engine"])
async def test_a_context_changed_after_the_decision_is_refused(entry: str, how: str) -> None:
    """A verifying context switched to CERT_NONE (or to no host name check) after the plan
    was made is refused at the next connect; the untrusted server receives nothing."""
    context = ssl.create_default_context()
    async with Trap(tls=untrusted_server_context()) as trap:
        target = {"host": "127.0.0.1", "port": trap.port, "user": "app"}
        if entry in ("pool", "set_connect_args"):
            first = {"ssl": context} if entry == "pool" else {}
            async with asyncpg_iam.create_pool(
                **target, **first, iam=_auth(insecure_unverified_tls=True), min_size=0, timeout=5
            ) as pool:
                if entry == "set_connect_args":
                    pool.set_connect_args(**target, ssl=context, timeout=5)
                _weaken(context, how)
                with pytest.raises(ConfigurationError, match="changed after the TLS decision"):
                    await pool.fetchval("SELECT 1")
                assert pool.settings.tls_mode == "verify-full"
        else:
            from sqlalchemy.exc import DBAPIError

            from asyncpg_iam.sqlalchemy import create_async_engine

            engine = create_async_engine(
                f"postgresql+asyncpg://app@127.0.0.1:{trap.port}/app",
                iam=_auth(insecure_unverified_tls=True),
                connect_args={"ssl": context, "timeout": 5},
            )
            _weaken(context, how)
            try:
                with pytest.raises((ConfigurationError, DBAPIError)) as caught:
                    async with engine.connect():
                        pass
            finally:
                await engine.dispose()
            assert "changed after the TLS decision" in str(caught.value)
    assert trap.passwords == [], trap.summary()


@pytest.mark.parametrize("source", TLS_SOURCES)
async def test_tls_parameters_beside_a_context(
    source: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Beside an ssl.SSLContext, a TLS parameter given for this connection (argument, DSN)
    is refused; a service's or the environment's is outranked by the context, as in libpq."""
    async with Trap(tls=untrusted_server_context()) as trap:
        dsn, kwargs, _named = _tls_parameter(
            source, "sslcrl", _other_ca(tmp_path), trap.port, monkeypatch, tmp_path
        )
        kwargs["ssl"] = ssl.create_default_context()
        if source in ("argument", "dsn"):
            with pytest.raises(
                ConfigurationError, match=r"cannot be applied to the ssl\.SSLContext"
            ):
                await _plan_through("pool", dsn, kwargs)
            return
        async with asyncpg_iam.create_pool(
            dsn, user="app", iam=_auth(), min_size=0, timeout=5, **kwargs
        ) as pool:
            assert pool.settings.ca_source == "the caller's ssl.SSLContext"
            with pytest.raises(CONNECT_ERRORS):
                await pool.fetchval("SELECT 1")
    _assert_nothing_sent(trap)


# -- the caller's AWS session is the identity (class 8) ---------------------------------------


@pytest.mark.parametrize("when", ["before IAMAuth", "after create_pool"])
async def test_a_sessions_own_credentials_sign(
    when: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """IAMAuth(session=s) signs with the keys set by s.set_credentials(...), not with the
    environment's, whether they were set before the IAMAuth or after the pool was made."""
    from aiobotocore.session import AioSession

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAENVIRONMENTKEY01")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "environment-secret-" + "e" * 21)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    session = AioSession()
    if when == "before IAMAuth":
        session.set_credentials(KEY.access_key, KEY.secret_key)
    auth = IAMAuth(region="us-east-1", signing_host=ENDPOINT, session=session)
    async with asyncpg_iam.create_pool(
        host="127.0.0.1", port=5432, user="app", iam=auth, min_size=0
    ) as pool:
        if when == "after create_pool":
            session.set_credentials(KEY.access_key, KEY.secret_key)
        token = await pool._connector.sign()
    assert f"X-Amz-Credential={KEY.access_key}%2F" in token


# -- timeouts are budgets (class 7) --------------------------------------------------------------


@dataclasses.dataclass
class _SilentPort:
    """A port that accepts TCP and never answers (the diagnosis's probe waits on it too); it
    counts the connections it accepted and those the client closed."""

    port: int = 0
    accepted: int = 0
    closed: int = 0


@contextlib.asynccontextmanager
async def _silent_port() -> AsyncIterator[_SilentPort]:
    """Serve a `_SilentPort` on 127.0.0.1 for the block."""
    silent_port = _SilentPort()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        silent_port.accepted += 1
        with contextlib.suppress(asyncio.CancelledError, OSError):
            while await reader.read(4096):  # read and never answer, until the client closes
                pass
            silent_port.closed += 1
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    silent_port.port = int(server.sockets[0].getsockname()[1])
    try:
        yield silent_port
    finally:
        server.close()


async def _connect_once(entry: str, port: int, timeout: float) -> None:
    """Connect once through `entry` to 127.0.0.1:`port`."""
    target = {"host": "127.0.0.1", "port": port, "user": "app"}
    context = ssl.create_default_context()
    if entry in ("pool", "no IAM"):
        auth: Any = False if entry == "no IAM" else _auth()
        extra = {"password": "x", "ssl": "prefer"} if entry == "no IAM" else {"ssl": context}
        async with asyncpg_iam.create_pool(
            **target, **extra, iam=auth, min_size=0, timeout=timeout
        ) as pool:
            await pool.fetchval("SELECT 1")
    elif entry == "set_connect_args":
        async with asyncpg_iam.create_pool(
            host="127.0.0.1", port=1, user="app", iam=_auth(), min_size=0
        ) as pool:
            pool.set_connect_args(**target, ssl=context, timeout=timeout)
            await pool.fetchval("SELECT 1")
    elif entry == "engine":
        from asyncpg_iam.sqlalchemy import create_async_engine

        engine = create_async_engine(
            f"postgresql+asyncpg://app@127.0.0.1:{port}/app",
            iam=_auth(),
            connect_args={"ssl": context, "timeout": timeout},
        )
        try:
            async with engine.connect():
                pass
        finally:
            await engine.dispose()
    else:
        from asyncpg_iam.starlette import lifespan

        async with lifespan(**target, iam=_auth(), ssl=context, timeout=timeout)(object()):
            pass


@pytest.mark.parametrize("entry", ["pool", "set_connect_args", "engine", "Starlette", "no IAM"])
async def test_a_connect_and_its_diagnosis_end_with_the_call(entry: str) -> None:
    """A connect to a silent port fails naming its timeout, and its failure diagnosis ran
    inside the call: when the call returns, every connection it made (the connect's and the
    probe's) is closed and none is made after (how long it takes: the failover benchmark)."""
    async with _silent_port() as silent:
        with pytest.raises(Exception) as caught:  # noqa: PT011 - each entry wraps it its way
            await _connect_once(entry, silent.port, 3.0)
        accepted = silent.accepted
        # A few turns of the loop for the server to read the client's FIN; a probe still
        # running would hold its connection open for up to its own 3 s.
        for _ in range(50):
            if silent.closed == silent.accepted:
                break
            await asyncio.sleep(0.01)
        closed = silent.closed
    assert "within 3 s" in str(caught.value)
    assert accepted >= 2, "the connect and the diagnosis's probe"
    assert (silent.accepted, closed) == (accepted, accepted)


# -- ca-bundle: https on every hop, what is stored is checked (class 4) ---------------------------


class _Web:
    """An HTTP(S) server on 127.0.0.1: each path answers a body, or a redirect to a URL."""

    def __init__(self, routes: dict[str, bytes | tuple[int, str]], tls: trustme.CA | None) -> None:
        import http.server
        import threading

        self.routes = routes

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                answer = routes.get(self.path, (404, ""))
                if isinstance(answer, bytes):
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(answer)))
                    self.end_headers()
                    self.wfile.write(answer)
                    return
                status, location = answer
                self.send_response(status)
                self.send_header("Location", location)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        scheme = "http"
        if tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            tls.issue_cert("127.0.0.1").configure_cert(context)
            self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
            scheme = "https"
        self.base = f"{scheme}://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _download_ca(tmp_path: Path) -> tuple[trustme.CA, Path]:
    """A CA for the HTTPS servers, and the file that makes ca-bundle trust it."""
    ca = trustme.CA()
    ca_file = tmp_path / "download-ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    return ca, ca_file


async def _ca_bundle(url: str, ca_file: Path, output: Path, tmp_path: Path) -> tuple[int, str, str]:
    """Run ``ca-bundle --url URL`` trusting `ca_file`, writing `output`."""
    return await run_cli(
        "ca-bundle",
        "--url",
        url,
        "--cafile",
        str(ca_file),
        "--output",
        str(output),
        env=_cli_env(tmp_path),
    )


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
@pytest.mark.parametrize("hops", ["https->http", "https->https->http"])
async def test_ca_bundle_refuses_a_hop_that_is_not_https(
    status: int, hops: str, tmp_path: Path
) -> None:
    """A redirect to http (directly or after an https hop) is refused; the cached bundle
    stays as it was and nothing claims the download came from https."""
    ca, ca_file = _download_ca(tmp_path)
    old = trustme.CA().cert_pem.bytes()
    served = trustme.CA().cert_pem.bytes() + trustme.CA().cert_pem.bytes()
    plain = _Web({"/bundle.pem": served}, tls=None)
    secure = _Web({}, tls=ca)
    secure.routes["/start"] = (
        (status, f"{plain.base}/bundle.pem")
        if hops == "https->http"
        else (status, f"{secure.base}/next")
    )
    secure.routes["/next"] = (status, f"{plain.base}/bundle.pem")
    output = tmp_path / "bundle.pem"
    output.write_bytes(old)
    try:
        code, out, err = await _ca_bundle(f"{secure.base}/start", ca_file, output, tmp_path)
    finally:
        plain.close()
        secure.close()
    assert code == 1, out + err
    assert "not https" in err
    assert output.read_bytes() == old
    assert out == ""


async def test_ca_bundle_follows_https_redirects_and_names_the_source(tmp_path: Path) -> None:
    """Control: an https-to-https redirect is followed; the message names the final URL."""
    ca, ca_file = _download_ca(tmp_path)
    served = trustme.CA().cert_pem.bytes()
    secure = _Web({"/bundle.pem": served}, tls=ca)
    secure.routes["/start"] = (302, f"{secure.base}/bundle.pem")
    output = tmp_path / "bundle.pem"
    try:
        code, _out, err = await _ca_bundle(f"{secure.base}/start", ca_file, output, tmp_path)
    finally:
        secure.close()
    assert code == 0, err
    assert f"from {secure.base}/bundle.pem" in err
    assert output.read_bytes() == served


# -- the engine's URL is planned like the pool's arguments (class 9) --------------------------


@pytest.mark.parametrize("mode", MODES)
async def test_an_engine_url_sslmode_is_planned_like_the_pool(
    trap: Trap, mode: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """?sslmode= in a SQLAlchemy URL is refused or applied at engine creation, as the pool's
    sslmode is (it was a TypeError at the first connect, even verify-full)."""
    from sqlalchemy.exc import DBAPIError

    from asyncpg_iam.sqlalchemy import create_async_engine

    monkeypatch.setenv("ASYNCPG_IAM_CA_BUNDLE", _other_ca(tmp_path))
    url = f"postgresql+asyncpg://app@127.0.0.1:{trap.port}/app?sslmode={mode}"
    if mode in REFUSED:
        with pytest.raises(ConfigurationError, match=f"'{mode}'"):
            create_async_engine(url, iam=_auth())
        assert trap.connections == 0
        return
    engine = create_async_engine(url, iam=_auth(), connect_args={"timeout": 5})
    try:
        with pytest.raises((DBAPIError, *CONNECT_ERRORS)) as caught:
            async with engine.connect():
                pass
        assert not isinstance(caught.value.__cause__, TypeError)
    finally:
        await engine.dispose()
    _assert_nothing_sent(trap)


@pytest.mark.parametrize(
    ("query", "named"),
    [("sslcrl=/nonexistent/crl.pem", "sslcrl="), ("sslsni=0", "sslsni="), ("bogus=1", "bogus")],
)
def test_an_engine_url_tls_parameter_is_applied_or_refused(query: str, named: str) -> None:
    """A TLS parameter (or an unknown one) in the engine's URL is refused at creation."""
    from asyncpg_iam.sqlalchemy import create_async_engine

    with pytest.raises(ConfigurationError, match=named):
        create_async_engine(f"postgresql+asyncpg://app@127.0.0.1:5432/app?{query}", iam=_auth())


# -- nothing outlives close (class 5) -------------------------------------------------------------


@pytest.mark.parametrize("how", ["close", "terminate"])
async def test_no_connect_attempt_starts_after_close(how: str) -> None:
    """Callers waiting for the connect rate limit get "pool is closing" as soon as the pool
    closes, and no connect attempt starts afterwards (main kept dialling one per slot)."""
    async with Trap() as trap:
        pool = asyncpg_iam.create_pool(
            host="127.0.0.1",
            port=trap.port,
            user="app",
            iam=_auth(),
            min_size=0,
            max_size=6,
            timeout=60,
            max_connect_rate=0.2,
        )
        await pool
        callers = [asyncio.ensure_future(pool.fetchval("SELECT 1")) for _ in range(5)]
        await wait_for(lambda: trap.connections >= 1)
        attempts = pool._connector.counters.attempts
        if how == "close":
            await asyncio.wait_for(pool.close(), 30)
        else:
            pool.terminate()
        results = await asyncio.wait_for(asyncio.gather(*callers, return_exceptions=True), 10)
        dialled = trap.connections
        await asyncio.sleep(6)  # one slot of the rate limit and more
    closing = [r for r in results if isinstance(r, asyncpg.InterfaceError)]
    assert len(closing) >= 4, results
    assert all("pool is closing" in str(r) for r in closing)
    assert trap.connections == dialled, "a connect started after close"
    assert pool._connector.counters.attempts <= attempts + 1


async def test_a_context_changed_under_a_starlette_pool_is_refused(sandbox: Any) -> None:
    """The Starlette lifespan's pool re-checks the context too: weakened after start-up, the
    next new connection is refused and the emulator sees no further login."""
    from asyncpg_iam.starlette import lifespan

    context = sandbox.emulator.client_ssl_context()
    kwargs = sandbox.pool_kwargs(ssl=context, min_size=0, timeout=10)
    async with lifespan(**kwargs)(object()) as state:
        pool = state["pool"]
        assert await pool.fetchval("SELECT 1") == 1
        logins = sandbox.emulator.logins_accepted
        _weaken(context, "CERT_NONE")
        await pool.expire_connections()
        with pytest.raises(ConfigurationError, match="changed after the TLS decision"):
            await pool.fetchval("SELECT 1")
        assert sandbox.emulator.logins_accepted == logins


@pytest.mark.parametrize("revoked", [True, False], ids=["PGSSLCRL", "control"])
async def test_psql_honours_a_revocation_list(revoked: bool, tmp_path: Path) -> None:
    """psql gets the plan's revocation list: a revoked server certificate receives no token;
    without the list (control) the same trusted server receives it from the password file."""
    psql = _psql_or_skip()
    trusted = _trusted_server(tmp_path)
    variables = {"PGSSLCRL": trusted.crl_path} if revoked else {}
    async with Trap(tls=trusted.context) as trap:
        code, out, err = await _cli(
            "psql",
            trap.port,
            tmp_path,
            "--ca",
            trusted.ca_path,
            "--psql",
            psql,
            "--",
            "-c",
            "SELECT 1",
            **variables,
        )
    assert code != 0, out + err
    assert trap.connections >= 1, err
    if revoked:
        assert trap.passwords == [], trap.summary()
    else:
        assert len(trap.passwords) == 1, trap.summary()


@pytest.mark.parametrize("name", sorted(UNUSABLE))
def test_tls_keywords_without_iam_in_a_mode_asyncpg_negotiates(name: str) -> None:
    """Without IAM, in sslmode prefer (which asyncpg negotiates itself, taking no TLS
    keyword), a TLS parameter given as a keyword is refused rather than dropped."""
    with pytest.raises(ConfigurationError, match=f"{name}="):
        asyncpg_iam.create_pool(
            host="127.0.0.1", user="app", password="x", iam=False, **{name: UNUSABLE[name]}
        )
