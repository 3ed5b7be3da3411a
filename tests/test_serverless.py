"""Serverless: a cold start without aiobotocore, freeze and thaw, the Lambda pattern."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import secrets
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

import asyncpg_iam
import asyncpg_iam.starlette
from asyncpg_iam import Credentials, IAMAuth
from asyncpg_iam.testing import AccessKey, ManualClock, PostgresServer, RDSIAMEmulator, Sandbox
from asyncpg_iam.testing._isolation import lambda_environment
from tests._support import wait_for

# -- cold start -----------------------------------------------------------------------------------

# What a cold start (import, create_pool on an RDS instance endpoint, one query) must not import:
# aiobotocore and what only failures, diagnosis and `__version__` need, and the package's own
# modules that only other settings use (an observer's wait and use times, an Aurora cluster
# name, `run_transaction`, `stats()`, `settings`, a blue/green deployment found, the
# integrations, the command line, the test beds), and `dataclasses` (the settings classes are
# plain, see `_record`). Each costs import time in every new process, so loading one of them
# eagerly again fails here.
_COLD_START_UNUSED = (
    "dataclasses",
    "aiobotocore",
    "botocore",
    "boto3",
    "importlib.metadata",
    "email.utils",
    "difflib",
    "asyncpg_iam._acquire_times",
    "asyncpg_iam._topology",
    "asyncpg_iam._retry",
    "asyncpg_iam._pool_stats",
    "asyncpg_iam._refusal",
    "asyncpg_iam._switchover",
    "asyncpg_iam.otel",
    "asyncpg_iam.sqlalchemy",
    "asyncpg_iam.starlette",
    "asyncpg_iam.cli",
    "asyncpg_iam.testing",
)

_COLD_START = f"""
import asyncio, json, os, sys
import asyncpg_iam

async def main():
    pool = await asyncpg_iam.create_pool(
        host="127.0.0.1", port=int(os.environ["EMU_PORT"]), user=os.environ["EMU_USER"],
        database=os.environ["EMU_DATABASE"], sslrootcert=os.environ["EMU_CA"],
        iam=asyncpg_iam.IAMAuth(signing_host=os.environ["EMU_ENDPOINT"]), min_size=1,
    )
    value = await pool.fetchval("SELECT 41 + 1")
    await pool.close()
    loaded = sorted(m for m in {_COLD_START_UNUSED!r} if m in sys.modules)
    print(json.dumps({{"value": value, "loaded": loaded}}))

asyncio.run(main())
"""

_IMPORT_AND_CONFIGURE = f"""
import json, sys
import asyncpg_iam
pool = asyncpg_iam.Pool(
    host="127.0.0.1", port=5432, user="app", database="app",
    iam=asyncpg_iam.IAMAuth(signing_host="app.abcdefghijkl.us-east-1.rds.amazonaws.com"),
    min_size=1,
)
loaded = sorted(m for m in {_COLD_START_UNUSED!r} if m in sys.modules)
print(json.dumps({{"loaded": loaded}}))
"""


async def test_importing_and_configuring_a_pool_loads_only_what_the_cold_start_runs(
    tmp_path: Path,
) -> None:
    """Importing the package and creating a pool (Lambda's variables, an RDS instance name, no
    connect yet) imports none of the modules a cold start does not run."""
    key = AccessKey("ASIALAMBDAEXAMPLE02", secrets.token_urlsafe(30), secrets.token_urlsafe(40))
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _IMPORT_AND_CONFIGURE,
        env=lambda_environment(key, region="us-east-1", home=tmp_path),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, err.decode()
    assert json.loads(out) == {"loaded": []}


async def test_cold_start_with_keys_in_the_environment_never_imports_aiobotocore(
    rds_emulator: RDSIAMEmulator, postgres_server: PostgresServer, tmp_path: Path
) -> None:
    """A new process with Lambda's variables signs, logs in and queries without importing
    aiobotocore, botocore, what only failures, diagnosis and `__version__` need, or the
    package's modules for other settings."""
    key = AccessKey("ASIALAMBDAEXAMPLE01", secrets.token_urlsafe(30), secrets.token_urlsafe(40))
    rds_emulator.register_key(key.access_key, key.secret_key, key.session_token)
    env = lambda_environment(key, region=rds_emulator.region, home=tmp_path)
    env.update(
        EMU_PORT=str(rds_emulator.port),
        EMU_USER=postgres_server.user,
        EMU_DATABASE=postgres_server.database,
        EMU_CA=rds_emulator.ca_path,
        EMU_ENDPOINT=rds_emulator.endpoint,
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _COLD_START,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, err.decode()
    assert json.loads(out) == {"value": 42, "loaded": []}
    assert rds_emulator.records[-1].access_key == key.access_key


async def test_environment_keys_are_read_as_the_chain_reads_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The default chain's first source gives the environment's keys, session token and
    expiration; without keys it falls through to aiobotocore's chain."""
    from asyncpg_iam._auth import credential_cache_for

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "ASIAENVEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.setenv("AWS_SECURITY_TOKEN", "legacy-token")
    monkeypatch.setenv("AWS_CREDENTIAL_EXPIRATION", "2030-01-01T00:00:00Z")
    cache = credential_cache_for()
    try:
        found = await cache.get()
    finally:
        await cache.aclose()
    assert (found.access_key, found.token) == ("ASIAENVEXAMPLE", "legacy-token")
    assert found.expiry is not None
    assert found.expiry.year == 2030
    assert "environment" in cache.source


async def test_partial_environment_keys_fall_through_to_the_chain(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """An access key without its secret is not taken: aiobotocore's chain reports it as it
    always did."""
    from asyncpg_iam import CredentialsError
    from asyncpg_iam._auth import credential_cache_for

    for name, value in lambda_environment(
        AccessKey("AKIAPARTIALEXAMPLE1", "unused"), region="us-east-1", home=tmp_path
    ).items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.delenv("AWS_SESSION_TOKEN")
    cache = credential_cache_for()
    try:
        with pytest.raises(CredentialsError, match="AWS_SECRET_ACCESS_KEY"):
            await cache.get()
    finally:
        await cache.aclose()


# -- freeze and thaw ------------------------------------------------------------------------------

RATE = 2.0


@contextlib.asynccontextmanager
async def _driving(clock: ManualClock, step: float = 0.05) -> AsyncIterator[None]:
    """Move `clock` on by `step` every few real milliseconds while the block runs."""
    stop = asyncio.Event()

    async def drive() -> None:
        while not stop.is_set():
            await clock.advance(step)
            await asyncio.sleep(0.002)

    task = asyncio.create_task(drive())
    try:
        yield
    finally:
        stop.set()
        await task


@pytest_asyncio.fixture
async def frozen_stack(
    postgres_server: PostgresServer,
) -> AsyncIterator[tuple[RDSIAMEmulator, ManualClock, dict[str, Any]]]:
    """An emulator and the arguments of an IAM pool that share one ManualClock (3 connections,
    900 s lifetime, 2 connects a second)."""
    clock = ManualClock()
    key = AccessKey("AKIAFREEZEEXAMPLE01", secrets.token_urlsafe(30))
    sandbox = Sandbox(
        server=postgres_server,
        access_key=key,
        credential_server=False,
        isolate_environment=False,
        clock=clock,
    )
    async with sandbox:
        emulator = sandbox.emulator
        iam = IAMAuth(
            signing_host=emulator.endpoint, credentials=Credentials(key.access_key, key.secret_key)
        )
        kwargs = sandbox.pool_kwargs(
            iam=iam,
            clock=clock,
            min_size=3,
            max_size=3,
            max_lifetime=900.0,
            max_connect_rate=RATE,
        )
        yield emulator, clock, kwargs


async def _thaw_and_query(
    emulator: RDSIAMEmulator, clock: ManualClock, kwargs: dict[str, Any], cut: str
) -> asyncpg_iam.Pool:
    """Fill a pool, freeze it 20 minutes with its sockets cut (`cut`), and query after thaw."""
    async with _driving(clock):
        pool = await asyncpg_iam.create_pool(**kwargs)
        assert await pool.fetchval("SELECT 1") == 1
    frozen_at = clock.now()
    if cut == "drop":
        assert emulator.drop_all_connections() == 3
    else:
        assert emulator.silence_all_connections() == 3
    await clock.jump(20 * 60)
    async with _driving(clock):
        # The first query after the thaw; a silenced connection would hang it until the
        # timeout.
        assert await asyncio.wait_for(pool.fetchval("SELECT 2"), 60) == 2
        await wait_for(lambda: pool.get_size() == 3, 60)
    after = [r.at for r in emulator.records if r.accepted and r.at > frozen_at]
    assert len(after) >= 3
    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(after)]
    # Paced, not a burst: logins 1/RATE apart by the bucket (a burst lands within one clock
    # step); the emulator stamps each when its password arrives, after a handshake during which
    # the driven clock moves on, hence the margin.
    assert min(gaps) >= 0.4 / RATE, gaps
    assert pool.stats().connects_rate_limited >= 2
    return pool


@pytest.mark.parametrize("cut", ["drop", "silence"])
async def test_after_a_freeze_no_expired_or_dead_connection_is_handed_out(
    frozen_stack: tuple[RDSIAMEmulator, ManualClock, dict[str, Any]], cut: str
) -> None:
    """After a 20-minute freeze with its sockets reset or silently dropped (no FIN), the pool
    retires every connection past max_lifetime, reconnects within the rate limit, and the
    first query succeeds; nothing counts the late timers as a failure."""
    emulator, clock, kwargs = frozen_stack
    pool = await _thaw_and_query(emulator, clock, kwargs, cut)
    try:
        stats = pool.stats()
        assert stats.handed_out_due == 0
        assert stats.connect_failures == 0
        assert stats.auth_failures == 0
        assert stats.failover_events == 0
        assert stats.connections_closed.get("max_lifetime", 0) >= (3 if cut == "silence" else 0)
        assert stats.connections_opened >= 6
    finally:
        pool.terminate()


# -- the Lambda pattern ---------------------------------------------------------------------------


async def test_module_scope_pool_is_reused_across_invocations(
    iam_emulator: RDSIAMEmulator, postgres_server: PostgresServer
) -> None:
    """One event loop for the process and a pool made on the first invocation: later
    invocations log in no more (the runtime calls the handler from its own thread here)."""
    kwargs = iam_emulator.pool_kwargs(
        user=postgres_server.user, database=postgres_server.database, min_size=1
    )

    def lambda_runtime() -> list[int]:
        loop = asyncio.new_event_loop()  # module scope in a real function
        pool: asyncpg_iam.Pool | None = None

        async def handle(event: int) -> int:
            nonlocal pool
            if pool is None:
                pool = await asyncpg_iam.create_pool(**kwargs)
            return int(await pool.fetchval("SELECT $1::int", event))

        def handler(event: int, _context: object = None) -> int:
            return loop.run_until_complete(handle(event))

        try:
            return [handler(n) for n in range(5)]
        finally:
            if pool is not None:
                loop.run_until_complete(pool.close())
            loop.close()

    assert await asyncio.to_thread(lambda_runtime) == list(range(5))
    assert iam_emulator.logins_accepted == 1


async def _invoke(app: Any, lifespan: Any) -> int:
    """One Mangum-style invocation: the lifespan's startup, a query, its shutdown."""
    async with lifespan(app) as state:
        return int(await state["pool"].fetchval("SELECT 7"))


class _App:
    def __init__(self) -> None:
        self.state = type("State", (), {})()


@pytest.fixture
def on_lambda(monkeypatch: pytest.MonkeyPatch) -> None:
    """The variable AWS Lambda sets in every function's environment."""
    monkeypatch.setenv("AWS_LAMBDA_FUNCTION_NAME", "app")


async def test_lifespan_per_invocation_reuses_the_pool_on_lambda(
    iam_emulator: RDSIAMEmulator, postgres_server: PostgresServer, on_lambda: None
) -> None:
    """On Lambda a lifespan run around every invocation (Mangum) opens one pool, not one per
    call; elsewhere each startup opens its own."""
    kwargs = iam_emulator.pool_kwargs(
        user=postgres_server.user, database=postgres_server.database, min_size=1
    )
    app = _App()
    kept = asyncpg_iam.starlette.lifespan(**kwargs)
    assert [await _invoke(app, kept) for _ in range(4)] == [7] * 4
    assert iam_emulator.logins_accepted == 1
    pool = app.state.__dict__.get("pool")
    assert pool is None  # unpublished between invocations, still open in the lifespan
    fresh = asyncpg_iam.starlette.lifespan(keep_pool=False, **kwargs)
    for _ in range(2):
        await _invoke(app, fresh)
    assert iam_emulator.logins_accepted == 3
    # The kept pool ends with the process; close it here through one last startup.
    async with kept(app) as state:
        await state["pool"].close()


async def test_a_pool_kept_from_a_finished_loop_is_not_reused(
    iam_emulator: RDSIAMEmulator,
    postgres_server: PostgresServer,
    on_lambda: None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """asyncio.run() per invocation ends the loop the pool belongs to: the next startup opens
    a new pool and says why."""
    kwargs = iam_emulator.pool_kwargs(
        user=postgres_server.user, database=postgres_server.database, min_size=1
    )
    app = _App()
    lifespan = asyncpg_iam.starlette.lifespan(**kwargs)

    def invoke_in_new_loop() -> int:
        return asyncio.run(_invoke(app, lifespan))

    assert await asyncio.to_thread(invoke_in_new_loop) == 7
    with caplog.at_level(logging.WARNING, logger="asyncpg_iam.starlette"):
        async with lifespan(app) as state:
            assert await state["pool"].fetchval("SELECT 1") == 1
            await state["pool"].close()
    assert "asyncio.run() per invocation" in caplog.text
    assert iam_emulator.logins_accepted == 2
