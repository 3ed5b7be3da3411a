"""Aurora DSQL through the emulator in DSQL mode: logins, limits, the transaction retry helper."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import random
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import asyncpg
import botocore.session
import pytest
import pytest_asyncio

import asyncpg_iam
from asyncpg_iam import (
    CommitOutcomeUnknownError,
    ConfigurationError,
    Credentials,
    IAMAuth,
    IAMAuthenticationError,
)
from asyncpg_iam._dsql import DEFAULT_CONNECT_RATE, DEFAULT_MAX_LIFETIME
from asyncpg_iam._lifetime import FIRST_LIFETIME_SPREAD
from asyncpg_iam._retry import backoff_delay
from asyncpg_iam.testing import (
    DEFAULT_DSQL_ENDPOINT,
    AccessKey,
    CredentialServer,
    MotoSTS,
    PostgresServer,
    RDSIAMEmulator,
)
from tests._support import run_cli


@pytest_asyncio.fixture
async def dsql_emulator(
    postgres_server: PostgresServer, rds_access_key: AccessKey
) -> AsyncIterator[RDSIAMEmulator]:
    """An emulator in DSQL mode in front of the test server; role admin exists there."""
    emulator = RDSIAMEmulator(
        backend_host=postgres_server.host,
        backend_port=postgres_server.port,
        backend_user=postgres_server.user,
        backend_password=postgres_server.password,
        endpoint=DEFAULT_DSQL_ENDPOINT,
        iam_users=[postgres_server.user],
    )
    emulator.register_key(
        rds_access_key.access_key, rds_access_key.secret_key, rds_access_key.session_token
    )
    async with emulator:
        await emulator.ensure_role("admin")
        yield emulator


def _iam(key: AccessKey, **overrides: Any) -> IAMAuth:
    settings: dict[str, Any] = {
        "signing_host": DEFAULT_DSQL_ENDPOINT,
        "credentials": Credentials(key.access_key, key.secret_key, key.session_token),
        **overrides,
    }
    return IAMAuth(**settings)


def _pool_kwargs(
    emulator: RDSIAMEmulator, key: AccessKey, user: str, **overrides: Any
) -> dict[str, Any]:
    kwargs = emulator.pool_kwargs(user=user, iam=_iam(key), min_size=1, max_size=4)
    del kwargs["database"]  # the DSQL default (postgres) applies
    kwargs.update(overrides)
    return kwargs


@pytest_asyncio.fixture
async def table(postgres_server: PostgresServer) -> AsyncIterator[str]:
    """A fresh table `dsql_items(id int primary key, note text)` on the backend."""
    conn = await _direct(postgres_server)
    try:
        await conn.execute(
            "DROP TABLE IF EXISTS dsql_items; "
            "CREATE TABLE dsql_items (id int PRIMARY KEY, note text)"
        )
        yield "dsql_items"
    finally:
        await conn.execute("DROP TABLE IF EXISTS dsql_items")
        await conn.close()


async def _direct(server: PostgresServer) -> asyncpg.Connection:
    """A plain connection to the backend itself, past the emulator."""
    return await asyncpg.connect(server.dsn, database="postgres", ssl=False)


@functools.lru_cache(maxsize=4)
def _dsql_client(access_key: str, secret_key: str, session_token: str | None) -> Any:
    return botocore.session.get_session().create_client(
        "dsql",
        region_name="us-east-1",
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        aws_session_token=session_token,
    )


# -- logins ---------------------------------------------------------------------------------


@pytest.mark.parametrize("user", ["admin", "postgres"])
async def test_pool_logs_in_to_dsql(
    dsql_emulator: RDSIAMEmulator, rds_access_key: AccessKey, user: str
) -> None:
    """A real pool logs in to DSQL as admin (DbConnectAdmin) and as another role (DbConnect)."""
    async with asyncpg_iam.create_pool(**_pool_kwargs(dsql_emulator, rds_access_key, user)) as pool:
        assert await pool.fetchval("SELECT current_user") == user
        assert await pool.fetchval("SELECT current_database()") == "postgres"
        assert pool.stats().tokens_signed >= 1
    assert dsql_emulator.logins_accepted >= 1
    assert {r.reason for r in dsql_emulator.records} == {"ok"}


async def test_botocore_dsql_tokens_pass_the_emulator(
    dsql_emulator: RDSIAMEmulator, rds_access_key: AccessKey
) -> None:
    """The emulator's own verifier accepts botocore's DSQL tokens, admin and not."""
    key = rds_access_key
    client = _dsql_client(key.access_key, key.secret_key, key.session_token)
    for user, sign in (
        ("admin", client.generate_db_connect_admin_auth_token),
        ("postgres", client.generate_db_connect_auth_token),
    ):
        token = sign(DEFAULT_DSQL_ENDPOINT, "us-east-1", ExpiresIn=3600)
        conn = await asyncpg.connect(password=token, **dsql_emulator.connect_kwargs(user=user))
        assert await conn.fetchval("SELECT current_user") == user
        await conn.close()


@pytest.mark.parametrize(
    ("user", "dsql_admin"), [("postgres", True), ("admin", False)], ids=["admin-action", "connect"]
)
async def test_wrong_action_is_refused(
    dsql_emulator: RDSIAMEmulator, rds_access_key: AccessKey, user: str, dsql_admin: bool
) -> None:
    """DbConnectAdmin for a non-admin role, or DbConnect for admin, is refused (28000)."""
    kwargs = _pool_kwargs(
        dsql_emulator, rds_access_key, user, iam=_iam(rds_access_key, dsql_admin=dsql_admin)
    )
    with pytest.raises(IAMAuthenticationError) as info:
        await asyncpg_iam.create_pool(**kwargs)
    assert info.value.sqlstate == "28000"
    assert dsql_emulator.records[-1].reason == "wrong_action"
    assert dsql_emulator.backend_connections_total == 0
    # The hints speak DSQL (dsql:DbConnect[Admin] on the cluster ARN), not RDS's rds_iam.
    hints = " ".join(info.value.hints)
    assert "rds_iam" not in hints
    assert "rds-db:connect" not in hints
    action = "dsql:DbConnectAdmin" if user == "admin" else "dsql:DbConnect on"
    assert action in hints
    assert "cluster/abcdefghijklmnopqrstuvwxyz" in hints


async def test_rds_token_is_refused_by_dsql(
    dsql_emulator: RDSIAMEmulator, rds_access_key: AccessKey
) -> None:
    """A pool that signs RDS tokens (service='rds') cannot log in to DSQL."""
    kwargs = _pool_kwargs(
        dsql_emulator, rds_access_key, "admin", iam=_iam(rds_access_key, service="rds")
    )
    with pytest.raises(IAMAuthenticationError):
        await asyncpg_iam.create_pool(**kwargs)
    assert dsql_emulator.records[-1].reason == "wrong_action"  # Action=connect is RDS's


async def test_login_throttle_is_53400(
    dsql_emulator: RDSIAMEmulator, rds_access_key: AccessKey
) -> None:
    """A throttled DSQL login fails with SQLSTATE 53400, not an authentication error."""
    dsql_emulator.throttle_next(1)
    with pytest.raises(asyncpg.ConfigurationLimitExceededError) as info:
        await asyncpg_iam.create_pool(**_pool_kwargs(dsql_emulator, rds_access_key, "admin"))
    assert not isinstance(info.value, IAMAuthenticationError)
    assert dsql_emulator.records[-1].reason == "throttled"


# -- DSQL limits in a running pool ------------------------------------------------------------


async def test_lifetime_is_capped_below_an_hour(
    dsql_emulator: RDSIAMEmulator, rds_access_key: AccessKey
) -> None:
    """Each DSQL connection is due within the default 3300 s, never at DSQL's hour."""
    async with asyncpg_iam.create_pool(
        **_pool_kwargs(dsql_emulator, rds_access_key, "admin", min_size=3)
    ) as pool:
        now = asyncio.get_running_loop().time()
        deadlines = [pool._recycler.deadline(h._con) for h in pool._holders if h._con]
        assert len(deadlines) == 3
        for deadline in deadlines:
            assert deadline is not None
            # A pool's first connections get first lifetimes (spread over the last 75 %).
            shortest = DEFAULT_MAX_LIFETIME * (1 - FIRST_LIFETIME_SPREAD)
            assert shortest - 60 < deadline - now <= DEFAULT_MAX_LIFETIME
    with pytest.raises(ConfigurationError, match="at most 3600 s"):
        asyncpg_iam.create_pool(
            **_pool_kwargs(dsql_emulator, rds_access_key, "admin", max_lifetime=3601)
        )


async def test_connect_rate_is_limited_by_default(
    dsql_emulator: RDSIAMEmulator, rds_access_key: AccessKey
) -> None:
    """Opening 8 connections at once waits on the default DSQL connect rate (under 100/s)."""
    async with asyncpg_iam.create_pool(
        **_pool_kwargs(dsql_emulator, rds_access_key, "admin", min_size=8, max_size=8)
    ) as pool:
        stats = pool.stats()
    assert DEFAULT_CONNECT_RATE < 100
    assert stats.connections_opened == 8
    # asyncpg opens the first connection alone, then the other 7 at once; the bucket holds one
    # slot (burst 1), so at least 6 of those 7 waited.
    assert stats.connects_rate_limited >= 6
    assert dsql_emulator.max_login_attempts_in_one_second <= DEFAULT_CONNECT_RATE


# -- run_transaction --------------------------------------------------------------------------


async def _count(pool: asyncpg_iam.Pool, table: str) -> int:
    return int(await pool.fetchval(f"SELECT count(*) FROM {table}"))


class _Insert:
    """A transaction body inserting row 1 (twice: a unique violation), counting its attempts."""

    def __init__(self, table: str, *, twice: bool = False) -> None:
        self.table = table
        self.twice = twice
        self.calls = 0

    async def __call__(self, conn: asyncpg.Connection) -> str:
        self.calls += 1
        await conn.execute(f"INSERT INTO {self.table} VALUES (1, 'x')")
        if self.twice:
            await conn.execute(f"INSERT INTO {self.table} VALUES (1, 'y')")
        return "done"


@pytest_asyncio.fixture
async def dsql_pool(
    dsql_emulator: RDSIAMEmulator, rds_access_key: AccessKey
) -> AsyncIterator[asyncpg_iam.Pool]:
    """A pool logged in to the DSQL emulator as postgres."""
    async with asyncpg_iam.create_pool(
        **_pool_kwargs(dsql_emulator, rds_access_key, "postgres")
    ) as pool:
        yield pool


async def test_retries_conflicts_at_commit_and_commits_once(
    dsql_emulator: RDSIAMEmulator, dsql_pool: asyncpg_iam.Pool, table: str
) -> None:
    """Two 40001s at COMMIT: the third attempt commits, and the row is there once."""
    insert = _Insert(table)
    dsql_emulator.fail_next_commits(2)
    assert await dsql_pool.run_transaction(insert, retries=3, backoff=0.001) == "done"
    assert (insert.calls, dsql_emulator.commits_failed) == (3, 2)
    assert await _count(dsql_pool, table) == 1


async def test_gives_up_after_the_retry_limit(
    dsql_emulator: RDSIAMEmulator, dsql_pool: asyncpg_iam.Pool, table: str
) -> None:
    """With every COMMIT conflicting, retries=2 makes 3 attempts and raises the 40001."""
    insert = _Insert(table)
    dsql_emulator.fail_next_commits(10)
    with pytest.raises(asyncpg.SerializationError, match="OC000"):
        await dsql_pool.run_transaction(insert, retries=2, backoff=0.001)
    assert (insert.calls, dsql_emulator.commits_failed) == (3, 3)
    assert await _count(dsql_pool, table) == 0


async def test_no_retry_on_other_errors(dsql_pool: asyncpg_iam.Pool, table: str) -> None:
    """A unique violation is raised at once: one attempt, nothing committed twice."""
    insert_twice = _Insert(table, twice=True)
    with pytest.raises(asyncpg.UniqueViolationError):
        await dsql_pool.run_transaction(insert_twice, retries=5, backoff=0.001)
    assert insert_twice.calls == 1
    assert await _count(dsql_pool, table) == 0


async def test_no_retry_when_the_commit_outcome_is_unknown(
    dsql_emulator: RDSIAMEmulator, dsql_pool: asyncpg_iam.Pool, table: str
) -> None:
    """Connection lost during COMMIT: CommitOutcomeUnknownError, no retry, the row exists once."""
    insert = _Insert(table)
    dsql_emulator.drop_next_commits(1)
    with pytest.raises(CommitOutcomeUnknownError) as info:
        await dsql_pool.run_transaction(insert, retries=5, backoff=0.001)
    assert isinstance(info.value.__cause__, asyncpg.ConnectionDoesNotExistError)
    assert (insert.calls, dsql_emulator.commits_dropped) == (1, 1)
    # The server did commit: a retry would have inserted a second time (or failed).
    assert await _count(dsql_pool, table) == 1


async def test_retries_a_throttled_connect(
    dsql_emulator: RDSIAMEmulator, rds_access_key: AccessKey, table: str
) -> None:
    """53400 while the pool opens a connection is retried; the transaction then runs once."""

    async def insert(conn: asyncpg.Connection) -> None:
        await conn.execute(f"INSERT INTO {table} VALUES (1, 'x')")

    async with asyncpg_iam.create_pool(
        **_pool_kwargs(dsql_emulator, rds_access_key, "postgres", min_size=0)
    ) as pool:
        dsql_emulator.throttle_next(2)
        await pool.run_transaction(insert, retries=3, backoff=0.001)
        assert [r.reason for r in dsql_emulator.records] == ["throttled", "throttled", "ok"]
        assert await _count(pool, table) == 1


async def test_throttled_connect_beyond_the_limit_raises(
    dsql_emulator: RDSIAMEmulator, rds_access_key: AccessKey
) -> None:
    """More 53400s than retries: the last one is raised."""

    async def noop(conn: asyncpg.Connection) -> None:
        await conn.execute("SELECT 1")

    async with asyncpg_iam.create_pool(
        **_pool_kwargs(dsql_emulator, rds_access_key, "postgres", min_size=0)
    ) as pool:
        dsql_emulator.throttle_next(5)
        with pytest.raises(asyncpg.ConfigurationLimitExceededError):
            await pool.run_transaction(noop, retries=1, backoff=0.001)
        assert len(dsql_emulator.records) == 2


# -- run_transaction on PostgreSQL itself (the RDS case) --------------------------------------


async def test_retries_a_real_serialization_failure(
    postgres_server: PostgresServer, table: str
) -> None:
    """A REPEATABLE READ update that loses to a concurrent one (40001) is run again."""
    conn = await _direct(postgres_server)
    other = await _direct(postgres_server)
    try:
        await conn.execute(f"INSERT INTO {table} VALUES (1, 'start')")
        calls = 0

        async def bump(c: asyncpg.Connection) -> str:
            nonlocal calls
            calls += 1
            note = await c.fetchval(f"SELECT note FROM {table} WHERE id = 1")
            if calls == 1:
                await other.execute(f"UPDATE {table} SET note = 'other' WHERE id = 1")
            await c.execute(f"UPDATE {table} SET note = $1 WHERE id = 1", f"{note}+mine")
            return str(note)

        seen = await asyncpg_iam.run_transaction(
            conn, bump, isolation="repeatable_read", backoff=0.001
        )
        assert (calls, seen) == (2, "other")
        assert await conn.fetchval(f"SELECT note FROM {table} WHERE id = 1") == "other+mine"
    finally:
        await conn.close()
        await other.close()


class _RecordingClock:
    """A fake clock whose sleeps return at once and are written down."""

    def __init__(self) -> None:
        self.sleeps: list[float] = []

    def now(self) -> Any:
        raise AssertionError("run_transaction reads no wall time")

    def monotonic(self) -> float:
        return 0.0

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)


async def test_backoff_waits_on_the_clock_with_capped_jitter(
    postgres_server: PostgresServer,
) -> None:
    """Each retry waits on the given clock, within [0, min(max_backoff, backoff * 2**(n-1))]."""
    conn = await _direct(postgres_server)
    clock = _RecordingClock()
    calls = 0

    async def conflict(c: asyncpg.Connection) -> None:
        nonlocal calls
        calls += 1
        await c.execute("DO $$BEGIN RAISE EXCEPTION 'conflict' USING ERRCODE = '40001'; END$$")

    try:
        with pytest.raises(asyncpg.SerializationError):
            await asyncpg_iam.run_transaction(
                conn, conflict, retries=6, backoff=0.5, max_backoff=4.0, clock=clock
            )
        assert not conn.is_in_transaction()
    finally:
        await conn.close()
    assert calls == 7
    assert len(clock.sleeps) == 6
    for n, slept in enumerate(clock.sleeps, start=1):
        assert 0 <= slept <= min(4.0, 0.5 * 2 ** (n - 1))


def test_backoff_delay_grows_and_is_capped() -> None:
    """The jitter ceiling doubles per retry up to max_backoff; draws spread under it."""
    rng = random.Random(7)
    draws = [backoff_delay(5, backoff=0.1, max_backoff=1.0, rng=rng) for _ in range(2000)]
    assert max(draws) <= 1.0
    assert min(draws) >= 0
    assert max(draws) > 0.9
    assert min(draws) < 0.1
    assert backoff_delay(1, backoff=0.1, max_backoff=1.0, rng=random.Random(1)) <= 0.1


async def test_connection_in_a_transaction_is_refused(postgres_server: PostgresServer) -> None:
    """run_transaction on a connection already in a transaction is a ConfigurationError."""
    conn = await _direct(postgres_server)
    try:
        async with conn.transaction():
            with pytest.raises(ConfigurationError, match="outside a transaction"):
                await asyncpg_iam.run_transaction(conn, lambda c: c.execute("SELECT 1"))
    finally:
        await conn.close()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"retries": -1}, "retries must be"),
        ({"retries": 1.5}, "retries must be"),
        ({"backoff": -0.1}, "backoff must be"),
        ({"max_backoff": float("inf")}, "max_backoff must be"),
        ({"isolation": "snapshot"}, "isolation must be"),
    ],
)
async def test_run_transaction_arguments_are_validated(
    postgres_server: PostgresServer, kwargs: dict[str, Any], message: str
) -> None:
    """Bad retry settings raise ConfigurationError before anything runs."""
    conn = await _direct(postgres_server)
    try:
        with pytest.raises(ConfigurationError, match=message):
            await asyncpg_iam.run_transaction(conn, lambda c: c.execute("SELECT 1"), **kwargs)
    finally:
        await conn.close()


# -- the emulator's DSQL verifier on its own --------------------------------------------------


def _verify(token: str, *, user: str = "admin", at: Any = None) -> str:
    import datetime as dt

    from asyncpg_iam.testing._emu_verify import RegisteredKey, verify_dsql_token

    now = at or dt.datetime.now(dt.timezone.utc)
    keys = {"AKIDEXAMPLE": RegisteredKey("AKIDEXAMPLE", "secret")}
    verdict = verify_dsql_token(
        token, user=user, endpoint=DEFAULT_DSQL_ENDPOINT, region="us-east-1", keys=keys, now=now
    )
    return verdict.reason


def test_dsql_verifier_reasons() -> None:
    """The DSQL verifier accepts botocore's token and names each way a token can be wrong."""
    import datetime as dt

    client = _dsql_client("AKIDEXAMPLE", "secret", None)
    token = client.generate_db_connect_admin_auth_token(DEFAULT_DSQL_ENDPOINT, "us-east-1")
    assert _verify(token) == "ok"
    assert _verify(token, user="app") == "wrong_action"
    other_host = client.generate_db_connect_admin_auth_token("x.dsql.us-east-1.on.aws", "us-east-1")
    assert _verify(other_host) == "wrong_host"
    other_region = client.generate_db_connect_admin_auth_token(DEFAULT_DSQL_ENDPOINT, "eu-west-1")
    assert _verify(other_region) == "wrong_region"
    assert _verify(token.replace("Signature=", "Signature=0")) in {
        "signature_mismatch",
        "malformed_token",
    }
    later = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=1000)
    assert _verify(token, at=later) == "expired"  # 900 s by default
    long_lived = client.generate_db_connect_admin_auth_token(
        DEFAULT_DSQL_ENDPOINT, "us-east-1", ExpiresIn=7200
    )
    assert _verify(long_lived, at=later) == "ok"  # X-Amz-Expires decides
    with_port = token.replace(DEFAULT_DSQL_ENDPOINT, f"{DEFAULT_DSQL_ENDPOINT}:5432", 1)
    assert _verify(with_port) == "wrong_host"


# -- the command line -------------------------------------------------------------------------


async def test_cli_token_for_a_dsql_endpoint_logs_in(
    dsql_emulator: RDSIAMEmulator, credential_server: CredentialServer
) -> None:
    """`token` signs a DSQL admin token for a DSQL endpoint name, and it logs in."""
    credential_server.add_emulator(dsql_emulator)
    code, out, err = await run_cli(
        "token",
        "--host",
        dsql_emulator.host,
        "--port",
        str(dsql_emulator.port),
        "--user",
        "admin",
        "--signing-host",
        DEFAULT_DSQL_ENDPOINT,
    )
    assert code == 0, err
    token = out.strip()
    assert token.startswith(f"{DEFAULT_DSQL_ENDPOINT}/?Action=DbConnectAdmin&")
    assert token not in err
    conn = await asyncpg.connect(password=token, **dsql_emulator.connect_kwargs(user="admin"))
    try:
        assert await conn.fetchval("SELECT current_user") == "admin"
    finally:
        await conn.close()


async def test_cli_token_dsql_flag_and_expiry(credential_server: CredentialServer) -> None:
    """`token --dsql --expires-in` signs a DbConnect token for a CNAME, without a port."""
    code, out, err = await run_cli(
        "token",
        "--dsql",
        "--host",
        "db.internal",
        "--user",
        "app",
        "--region",
        "eu-west-1",
        "--expires-in",
        "3600",
    )
    assert code == 0, err
    token = out.strip()
    assert token.startswith("db.internal/?Action=DbConnect&X-Amz-Algorithm=")
    assert "%2Feu-west-1%2Fdsql%2Faws4_request" in token
    assert "&X-Amz-Expires=3600&" in token


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--host", "mydb.abcdefghijkl.us-east-1.rds.amazonaws.com"], "DSQL tokens only"),
        (["--dsql", "--host", "x.dsql.us-east-1.on.aws", "--expires-in", "0"], "1 to 604800"),
    ],
)
async def test_cli_token_expiry_is_checked(
    credential_server: CredentialServer, args: list[str], message: str
) -> None:
    """--expires-in on an RDS host, or outside 1..604800, exits 2 with the rule."""
    if "--expires-in" not in args:
        args = [*args, "--expires-in", "3600"]
    code, out, err = await run_cli("token", "--user", "app", *args)
    assert code == 2
    assert out == ""
    assert message in err


async def test_doctor_checks_a_dsql_endpoint(
    dsql_emulator: RDSIAMEmulator,
    postgres_server: PostgresServer,
    credential_server: CredentialServer,
    moto_sts: MotoSTS,
) -> None:
    """`doctor` passes every check against DSQL: a DbConnectAdmin token, database postgres."""
    from tests.test_cli_doctor import Setup

    credential_server.add_emulator(dsql_emulator)
    setup = Setup(dsql_emulator, postgres_server, credential_server, moto_sts)
    code, checks, output = await setup.doctor(user="admin", dbname=None)
    assert code == 0, output
    assert {check["status"] for check in checks.values()} == {"pass"}
    assert "Aurora DSQL DbConnectAdmin token" in checks["token"]["detail"]
    assert "database postgres" in checks["login"]["detail"]
    assert dsql_emulator.records[-1].reason == "ok"


# -- run_transaction's isolation outside DSQL (issue 27, class 10) ----------------------------


async def _increment_four_times(target_for: Any, table: str) -> tuple[int, int]:
    """Run 4 concurrent read-then-write increments; return (final count, attempts made).

    Every first attempt reads before any writes (a barrier), the case READ COMMITTED loses.
    """
    barrier = asyncio.Barrier(4)
    attempts = 0

    async def increment(c: asyncpg.Connection) -> None:
        nonlocal attempts
        attempts += 1
        first = attempts <= 4  # the four first attempts come before any retry
        n = await c.fetchval(f"SELECT note::int FROM {table} WHERE id = 1")
        if first:
            with contextlib.suppress(asyncio.TimeoutError, asyncio.BrokenBarrierError):
                await asyncio.wait_for(barrier.wait(), 10)
        await c.execute(f"UPDATE {table} SET note = $1 WHERE id = 1", str(n + 1))

    await asyncio.gather(
        *(asyncpg_iam.run_transaction(target_for(i), increment, backoff=0.01) for i in range(4))
    )
    final = await target_for(0).fetchval(f"SELECT note::int FROM {table} WHERE id = 1")
    return int(final), attempts


@pytest.mark.parametrize("through", ["connections", "asyncpg pool", "IAM pool"])
async def test_concurrent_increments_lose_no_update(
    through: str, postgres_server: PostgresServer, table: str, sandbox: Any
) -> None:
    """Four concurrent read-then-write increments through run_transaction with no isolation
    given end at 4 on PostgreSQL (serializable by default; READ COMMITTED ended at 1)."""
    setup = await _direct(postgres_server)
    await setup.execute(f"INSERT INTO {table} VALUES (1, '0')")
    await setup.close()
    if through == "connections":
        conns = [await _direct(postgres_server) for _ in range(4)]
        try:
            final, attempts = await _increment_four_times(lambda i: conns[i], table)
        finally:
            for conn in conns:
                await conn.close()
    elif through == "asyncpg pool":
        async with asyncpg.create_pool(
            postgres_server.dsn, database="postgres", ssl=False, min_size=4, max_size=4
        ) as pool:
            final, attempts = await _increment_four_times(lambda i: pool, table)
    else:
        async with asyncpg_iam.create_pool(**sandbox.pool_kwargs(min_size=0, max_size=4)) as pool:
            final, attempts = await _increment_four_times(lambda i: pool, table)
    assert final == 4
    assert attempts > 4, "the conflicts were retried"


async def test_a_hot_standby_runs_repeatable_read() -> None:
    """With no isolation given, run_transaction runs SERIALIZABLE on a primary and REPEATABLE
    READ on a real hot standby (which refuses SERIALIZABLE); an explicit serializable on the
    standby gets the server's refusal."""
    from asyncpg_iam.testing._failover import FailoverCluster

    def level(c: asyncpg.Connection) -> Awaitable[str]:
        return c.fetchval("SHOW transaction_isolation")  # type: ignore[no-any-return]

    async with FailoverCluster() as cluster:
        primary, standby = cluster.servers
        for server, expected in ((primary, "serializable"), (standby, "repeatable read")):
            conn = await asyncpg.connect(server.dsn, ssl=False)
            try:
                assert await asyncpg_iam.run_transaction(conn, level) == expected
                if server is standby:
                    with pytest.raises(asyncpg.PostgresError, match="hot standby"):
                        await asyncpg_iam.run_transaction(conn, level, isolation="serializable")
            finally:
                await conn.close()
