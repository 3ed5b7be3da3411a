"""Bad input: generated arguments and byte streams give a clean error, never a crash or a hang."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import ssl
import struct
from collections.abc import Callable, Iterator
from typing import Any

import asyncpg
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import asyncpg_iam
from asyncpg_iam import ConfigurationError, Credentials, IAMAuth
from asyncpg_iam.testing import AccessKey, PostgresServer, RDSIAMEmulator
from asyncpg_iam.testing._aws_fixtures import isolate_aws_environment
from asyncpg_iam.testing._leak_guard import LeakGuard
from tests._support import wait_for

from .conftest import no_hang

pytestmark = pytest.mark.reliability

#: A slow example counts as a hang: hypothesis fails it (and re-runs it to be sure).
HANG = dt.timedelta(seconds=5)
FUZZ = settings(
    max_examples=300,
    deadline=HANG,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
TRIED: dict[str, int] = {}


def _count(name: str) -> None:
    TRIED[name] = TRIED.get(name, 0) + 1


@pytest.fixture
def aws_env(
    monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[None]:
    """No host AWS configuration; AWS_REGION=us-east-1."""
    isolate_aws_environment(monkeypatch, tmp_path_factory)
    return


def assert_helpful(exc: ConfigurationError) -> None:
    """A ConfigurationError message says what is wrong and what is allowed."""
    message = str(exc)
    assert len(message) >= 25, message
    assert any(
        word in message
        for word in ("must", "is not", "not an", "invalid", "cannot", "only", "pass ", "Use ")
    ), message


# -- create_pool and IAMAuth ----------------------------------------------------------------

_weird = st.text(max_size=30)
_numbers: st.SearchStrategy[Any] = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-(2**40), max_value=2**40),
    st.booleans(),
    st.none(),
    st.text(max_size=6),
    st.sampled_from([0, 0.0, -1, 1e-9, 840, 840.0001, 900, 43200, 65535, 65536]),
)
_hosts: st.SearchStrategy[Any] = st.one_of(
    st.sampled_from(
        [
            "mydb.abcdefghijkl.us-east-1.rds.amazonaws.com",
            "app.cluster-abc.eu-west-2.rds.amazonaws.com",
            "db.abc.rds.cn-north-1.amazonaws.com.cn",
            "127.0.0.1",
            "::1",
            "[::1]",
            "localhost",
            "",
            " ",
            "host:5432",
            "a/b",
            "a b",
            "user@host",
            "x" * 300,
            "h1,h2",
            "münchen.example",
            "/tmp/socket-dir",
        ]
    ),
    _weird,
    st.none(),
    st.integers(),
    st.lists(st.sampled_from(["127.0.0.1", "localhost", "", "h:1"]), max_size=3),
)
_ports: st.SearchStrategy[Any] = st.one_of(
    _numbers, st.lists(st.integers(min_value=-1, max_value=70000), max_size=3)
)
_regions: st.SearchStrategy[Any] = st.one_of(
    st.sampled_from(
        ["us-east-1", "eu-west-2", "cn-north-1", "us-gov-west-1", "US-EAST-1", "us-east", "", "x"]
    ),
    _weird,
    st.none(),
    st.integers(),
)
_iam_kwargs = st.fixed_dictionaries(
    {},
    optional={
        "region": _regions,
        "profile": st.one_of(st.none(), st.sampled_from(["", "nope", "default"]), st.integers()),
        "role_arn": st.one_of(
            st.none(),
            st.sampled_from(["arn:aws:iam::123456789012:role/app", "arn:aws:iam::1:role/x", ""]),
            _weird,
        ),
        "role_session_name": st.one_of(st.none(), _weird),
        "external_id": st.one_of(st.none(), _weird, st.integers()),
        "role_duration": _numbers,
        "credentials": st.one_of(
            st.none(),
            st.just(Credentials("AKIAFUZZFUZZFUZZFUZZ", "fuzz-secret-key-" + "k" * 24)),
            st.sampled_from(["AKIA:secret", 42]),
        ),
        "signing_host": _hosts,
        "signing_port": _ports,
        "token_reuse": _numbers,
    },
)
_SSL_CONTEXT = ssl.create_default_context()
_pool_kwargs = st.fixed_dictionaries(
    {},
    optional={
        "host": _hosts,
        "port": _ports,
        "user": st.one_of(_weird, st.none(), st.integers()),
        "database": st.one_of(_weird, st.none()),
        "ssl": st.sampled_from(
            [
                "disable",
                "allow",
                "prefer",
                "require",
                "verify-ca",
                "verify-full",
                "bogus",
                True,
                False,
                None,
                _SSL_CONTEXT,
                3,
            ]
        ),
        "max_lifetime": _numbers,
        "max_lifetime_jitter": _numbers,
        "max_connect_rate": _numbers,
        "min_size": st.one_of(st.integers(min_value=-3, max_value=40), st.text(max_size=3)),
        "max_size": st.one_of(st.integers(min_value=-3, max_value=40), st.none()),
        "password": st.one_of(st.none(), st.just("static-password")),
        "timeout": _numbers,
    },
)
_dsns = st.one_of(
    st.none(),
    st.sampled_from(
        [
            "postgresql://app@mydb.abcdefghijkl.us-east-1.rds.amazonaws.com:5432/app",
            "postgresql://app@h:5432/app?sslmode=prefer",
            "postgresql://app@h:5432/app?sslmode=require",
            "postgres://[::1",
            "postgresql://h:99999/",
            "postgresql://a@h1:1,h2:2/db",
            "mysql://x",
            "",
        ]
    ),
    _weird,
)


@FUZZ
@given(kwargs=_iam_kwargs)
@example(kwargs={"region": 0})  # regression: was a TypeError
def test_iam_auth_arguments_construct_or_raise_configuration_error(
    aws_env: None, kwargs: dict[str, Any]
) -> None:
    """Any IAMAuth arguments either construct or raise ConfigurationError with a helpful message."""
    _count("IAMAuth")
    try:
        IAMAuth(**kwargs)
    except ConfigurationError as exc:
        assert_helpful(exc)


@FUZZ
@given(
    dsn=_dsns,
    kwargs=_pool_kwargs,
    iam=st.one_of(st.booleans(), _iam_kwargs.map(lambda kw: kw), st.sampled_from(["yes", 1])),
)
# Regressions: each raised ValueError, AttributeError or TypeError instead.
@example(dsn="postgres://[::1", kwargs={}, iam={})
@example(dsn=None, kwargs={"host": 1}, iam=False)
@example(dsn=None, kwargs={"min_size": ""}, iam=False)
def test_create_pool_arguments_construct_or_raise_configuration_error(
    aws_env: None, dsn: Any, kwargs: dict[str, Any], iam: Any
) -> None:
    """Any create_pool arguments build a pool (no I/O) or raise a helpful ConfigurationError."""
    _count("create_pool")
    try:
        if isinstance(iam, dict):
            iam = IAMAuth(**iam)

        async def build() -> asyncpg_iam.Pool:
            # Pools are made inside a running loop, as applications make them.
            return asyncpg_iam.create_pool(dsn, iam=iam, **kwargs)

        pool = asyncio.run(build())
    except ConfigurationError as exc:
        assert_helpful(exc)
    else:
        assert isinstance(pool, asyncpg_iam.Pool)
        assert pool.get_size() == 0, "creating the pool object opens no connection"


# -- the command line -----------------------------------------------------------------------

_CLI_WORDS = [
    "--host",
    "--port",
    "--user",
    "--region",
    "--signing-host",
    "--signing-port",
    "--profile",
    "--role-arn",
    "--role-session-name",
    "--external-id",
    "--duration",
    "--help",
    "--",
    "-",
    "mydb.abcdefghijkl.us-east-1.rds.amazonaws.com",
    "127.0.0.1",
    "app",
    "5432",
    "0",
    "-1",
    "65536",
    "us-east-1",
    "not-a-region",
    "arn:nope",
    "",
]


@pytest.fixture
def static_env(aws_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Static credentials in the environment, and an STS endpoint nobody listens on."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIACLIFUZZ000000001")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "cli-fuzz-secret-" + "c" * 24)
    monkeypatch.setenv("AWS_ENDPOINT_URL_STS", "http://127.0.0.1:9")


@settings(
    max_examples=150,
    deadline=HANG,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(argv=st.lists(st.one_of(st.sampled_from(_CLI_WORDS), st.text(max_size=12)), max_size=8))
def test_cli_token_arguments_exit_0_or_2_without_traceback(
    static_env: None, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    """`asyncpg-iam token ARGS` exits 0 or 2 for any ARGS, never with a traceback."""
    cli = pytest.importorskip("asyncpg_iam.cli")
    _count("cli token")
    try:
        code = cli.main(["token", *argv])
    except SystemExit as exc:  # argparse's own usage errors and --help
        code = exc.code
    _out, err = capsys.readouterr()  # consumed here: the output holds the signed token
    assert code in (0, 2), (argv, code, err[-500:])
    assert "Traceback" not in err


# -- the emulator's front -------------------------------------------------------------------

_SSL_REQUEST = struct.pack("!ii", 8, 80877103)
_CANCEL = 80877102


def _packet(code: int, body: bytes) -> bytes:
    return struct.pack("!iI", len(body) + 8, code) + body


def _startup(params: dict[str, str]) -> bytes:
    body = b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in params.items()) + b"\0"
    return _packet(196608, body)


_payloads = st.one_of(
    st.binary(max_size=300),
    st.builds(
        _packet,
        st.one_of(
            st.integers(min_value=0, max_value=2**32 - 1),
            st.sampled_from([196608, 80877103, 80877104, 131072, 196609]),
        ).filter(lambda code: code != _CANCEL),
        st.binary(max_size=120),
    ),
    st.builds(
        _startup,
        st.dictionaries(
            st.sampled_from(["user", "database", "options", "application_name", "x"]),
            st.text(max_size=12).filter(lambda t: "\0" not in t),
            max_size=4,
        ),
    ),
)
_password_messages = st.one_of(
    st.binary(max_size=200),
    st.binary(max_size=200).map(lambda b: b"p" + struct.pack("!i", len(b) + 4) + b),
    st.integers(min_value=-(2**31), max_value=2**31 - 1).map(lambda n: b"p" + struct.pack("!i", n)),
)


async def _send(emulator: RDSIAMEmulator, mode: str, data: bytes, user: str) -> None:
    reader, writer = await asyncio.open_connection(emulator.host, emulator.port)
    try:
        if mode == "plain":
            writer.write(data)
            await writer.drain()
            writer.write_eof()
            await reader.read()  # until the emulator closes
            return
        writer.write(_SSL_REQUEST)
        await writer.drain()
        assert await reader.readexactly(1) == b"S"
        await writer.start_tls(emulator.client_ssl_context(), server_hostname="127.0.0.1")
        if mode == "tls-login":
            writer.write(_startup({"user": user, "database": user}))
            await writer.drain()
            assert await reader.readexactly(9) == b"R" + struct.pack("!ii", 8, 3)
        writer.write(data)
        await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        pass  # the emulator may close first: that is an answer too
    finally:
        writer.close()


@pytest.fixture
def sign(
    rds_emulator: RDSIAMEmulator, rds_access_key: AccessKey, postgres_server: PostgresServer
) -> Callable[[], str]:
    """Sign a valid token for the emulator.

    Hypothesis prints a failing example's arguments with its own printer, which shows dataclass
    fields declared repr=False: the key must not be an argument of a @given test.
    """
    credentials = Credentials(rds_access_key.access_key, rds_access_key.secret_key)

    def sign() -> str:
        return asyncpg_iam.build_auth_token(
            host=rds_emulator.endpoint,
            port=rds_emulator.endpoint_port,
            user=postgres_server.user,
            region=rds_emulator.region,
            credentials=credentials,
        )

    return sign


@settings(
    max_examples=200,
    deadline=None,  # each step below is bounded by no_hang instead
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    mode=st.sampled_from(["plain", "tls", "tls-login"]),
    data=st.one_of(_payloads, _password_messages),
)
async def test_emulator_front_survives_fuzzed_bytes(
    rds_emulator: RDSIAMEmulator,
    sign: Callable[[], str],
    postgres_server: PostgresServer,
    secret_leak_guard: LeakGuard,
    mode: str,
    data: bytes,
) -> None:
    """Fuzzed bytes (plain, after TLS, as a password) open no backend; a real login still works."""
    _count("emulator bytes")
    emulator = rds_emulator
    user = postgres_server.user
    backends = emulator.backend_connections_total
    await no_hang(_send(emulator, mode, data, user), limit=15)
    await wait_for(lambda: emulator.open_connections == 0, timeout=15)
    assert emulator.backend_connections_total == backends, "invalid input reached the backend"

    con = await no_hang(asyncpg.connect(**emulator.connect_kwargs(user=user), password=sign()))
    try:
        assert await con.fetchval("SELECT 1") == 1
    finally:
        await con.close()
    # The emulator logs a handler that failed at WARNING; asyncio logs lost task errors at ERROR.
    crashes = [
        r
        for r in secret_leak_guard.handler.records
        if (r.levelno >= logging.WARNING and r.name.startswith("asyncpg_iam.testing"))
        or (r.levelno >= logging.ERROR and r.name.startswith("asyncio"))
    ]
    assert crashes == [], [r.getMessage() for r in crashes]
