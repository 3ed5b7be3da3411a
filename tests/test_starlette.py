"""The Starlette lifespan served by uvicorn on loopback, through the emulator."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

pytest.importorskip("starlette")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from starlette.applications import Starlette  # noqa: E402
from starlette.requests import Request  # noqa: E402
from starlette.responses import JSONResponse  # noqa: E402
from starlette.routing import Route  # noqa: E402

import asyncpg_iam  # noqa: E402
import asyncpg_iam.starlette  # noqa: E402
from asyncpg_iam import (  # noqa: E402
    ConfigurationError,
    CredentialsError,
    IAMAuthenticationError,
)
from asyncpg_iam.testing import CredentialServer, PostgresServer, RDSIAMEmulator  # noqa: E402
from asyncpg_iam.testing._aws_fixtures import isolate_aws_environment  # noqa: E402
from tests._support import pool_kwargs, wait_for  # noqa: E402


async def query(request: Request) -> JSONResponse:
    """Run one query on the pool from the lifespan state."""
    n = int(request.query_params["n"])
    pool = request.state.pool
    pid, value = await pool.fetchrow("SELECT pg_backend_pid(), $1::int", n)
    return JSONResponse({"pid": pid, "n": value})


def make_app(lifespan: Any, *extra: Route) -> Starlette:
    """Return a Starlette app with the /query route and `extra` routes."""
    return Starlette(routes=[Route("/query", query), *extra], lifespan=lifespan)


@contextlib.asynccontextmanager
async def served(app: Any, **config: Any) -> AsyncIterator[tuple[str, Any]]:
    """Serve `app` with uvicorn on a free loopback port; yield its base URL and the server."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(app, lifespan="on", log_level="warning", access_log=False, **config)
    )
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        # uvicorn exposes only a flag for "started", no event to wait on.
        while not server.started and not task.done():  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        yield f"http://127.0.0.1:{port}", server
    finally:
        server.should_exit = True
        await task
        sock.close()


@pytest.mark.slow
async def test_requests_survive_rotations_and_lifetimes(
    rds_emulator: RDSIAMEmulator,
    postgres_server: PostgresServer,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """8 HTTP clients across two credential rotations and 1.5 s lifetimes: no failed request."""
    isolate_aws_environment(monkeypatch, tmp_path_factory)
    with CredentialServer(lifetime=8.0, rotate_every=4.0) as creds:
        creds.add_emulator(rds_emulator)
        for name, value in creds.env().items():
            monkeypatch.setenv(name, value)
        kwargs = pool_kwargs(rds_emulator, postgres_server, max_lifetime=1.5)
        app = make_app(asyncpg_iam.starlette.lifespan(**kwargs))
        failures: list[str] = []
        pids: list[int] = []
        async with served(app) as (url, _server):
            pool: asyncpg_iam.Pool = app.state.pool
            give_up_at = time.monotonic() + 40.0

            def keys_used() -> int:
                return len({r.access_key for r in rds_emulator.records if r.accepted})

            async def client(n: int) -> None:
                # Run until logins have used three keys (two rotations: ~12 s, since the
                # credential cache refreshes at most every 5 s) and more than 500 requests were
                # served (a slow machine serves fewer in 12 s), or give up.
                async with httpx.AsyncClient(base_url=url, timeout=30) as http:
                    while (keys_used() < 3 or len(pids) <= 500) and time.monotonic() < give_up_at:
                        try:
                            response = await http.get("/query", params={"n": n})
                            if response.status_code != 200 or response.json()["n"] != n:
                                failures.append(f"{response.status_code}: {response.text}")
                            else:
                                pids.append(response.json()["pid"])
                        except httpx.HTTPError as exc:
                            failures.append(repr(exc))
                        await asyncio.sleep(0.005)

            await asyncio.gather(*(client(n) for n in range(8)))
            stats = pool.stats()
        issued = len(creds.issued)

    print(f"{len(pids)} requests, {len(failures)} failed, {issued} keys issued, {stats}")
    assert failures == []
    assert len(pids) > 500
    assert issued >= 3, "credentials rotated at least twice"
    accepted = [r for r in rds_emulator.records if r.accepted]
    assert rds_emulator.logins_rejected == 0
    assert len(accepted) == stats.connections_opened
    assert len({r.access_key for r in accepted}) >= 3, "logins used the rotated keys"
    assert stats.connections_closed.get("max_lifetime", 0) >= 10, stats
    assert len(set(pids)) >= 10, "requests were served by many successive connections"


async def test_startup_fails_without_credentials(
    rds_emulator: RDSIAMEmulator,
    postgres_server: PostgresServer,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path_factory: pytest.TempPathFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With no AWS credentials anywhere, uvicorn refuses to start and logs CredentialsError."""
    isolate_aws_environment(monkeypatch, tmp_path_factory)
    kwargs = pool_kwargs(rds_emulator, postgres_server, min_size=0)
    app = make_app(asyncpg_iam.starlette.lifespan(**kwargs))
    caplog.set_level(logging.ERROR)
    server = uvicorn.Server(uvicorn.Config(app, lifespan="on", log_level="warning"))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        with pytest.raises(SystemExit) as exited:
            await server.serve(sockets=[sock])
    assert exited.value.code == 3  # uvicorn's STARTUP_FAILURE
    assert not server.started
    assert "CredentialsError" in caplog.text
    assert not hasattr(app.state, "pool")
    assert rds_emulator.logins_accepted == 0
    assert rds_emulator.open_connections == 0


async def test_startup_raises_the_library_error(
    iam_emulator: RDSIAMEmulator,
    postgres_server: PostgresServer,
    credential_server: CredentialServer,
) -> None:
    """A refused login or credential endpoint failure fail the lifespan's startup, typed."""
    kwargs = pool_kwargs(iam_emulator, postgres_server, min_size=0)
    app = make_app(None)
    # The credential endpoint answers 500: CredentialsError.
    credential_server.fail_status = 500
    with pytest.raises(CredentialsError):
        async with asyncpg_iam.starlette.lifespan(**kwargs)(app):
            pass
    credential_server.fail_status = None
    # The user is not enabled for IAM: IAMAuthenticationError with its hints.
    iam_emulator.disable_iam_user(postgres_server.user)
    with pytest.raises(IAMAuthenticationError) as refused:
        async with asyncpg_iam.starlette.lifespan(**kwargs)(app):
            pass
    assert any("rds_iam" in hint for hint in refused.value.hints)
    # Settings that would send the token in clear: ConfigurationError.
    with pytest.raises(ConfigurationError):
        async with asyncpg_iam.starlette.lifespan(**{**kwargs, "ssl": "prefer"})(app):
            pass
    assert not hasattr(app.state, "pool")
    await wait_for(lambda: iam_emulator.open_connections == 0)


async def test_shutdown_finishes_in_flight_requests(
    iam_emulator: RDSIAMEmulator,
    postgres_server: PostgresServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Shutdown while 4 requests hold connections lets them all answer, then closes the pool."""
    started = asyncio.Semaphore(0)

    async def slow(request: Request) -> JSONResponse:
        async with request.state.pool.acquire() as con:
            started.release()
            await con.execute("SELECT pg_sleep(1)")
            return JSONResponse({"pid": con.get_server_pid()})

    kwargs = pool_kwargs(iam_emulator, postgres_server)
    app = make_app(asyncpg_iam.starlette.lifespan(close_timeout=30, **kwargs), Route("/slow", slow))
    caplog.set_level(logging.INFO, logger="asyncpg_iam.starlette")
    async with served(app) as (url, server):
        pool: asyncpg_iam.Pool = app.state.pool
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            requests = [asyncio.create_task(http.get("/slow")) for _ in range(4)]
            for _ in range(4):
                await started.acquire()
            server.should_exit = True
            responses = await asyncio.gather(*requests)
    assert [r.status_code for r in responses] == [200] * 4
    assert len({r.json()["pid"] for r in responses}) == 4
    assert pool.is_closing()
    assert f"pool {pool.name}: closed" in caplog.text
    assert "terminated" not in caplog.text
    assert not hasattr(app.state, "pool")
    await wait_for(lambda: iam_emulator.open_connections == 0)


async def test_shutdown_terminates_what_outlives_the_timeout(
    iam_emulator: RDSIAMEmulator,
    postgres_server: PostgresServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A connection still in use after close_timeout is terminated and shutdown completes."""
    app = make_app(None)
    lifespan = asyncpg_iam.starlette.lifespan(
        close_timeout=0.5, **pool_kwargs(iam_emulator, postgres_server)
    )
    caplog.set_level(logging.INFO, logger="asyncpg_iam.starlette")
    held: list[asyncpg.Connection] = []

    async def stuck(pool: asyncpg_iam.Pool) -> None:
        async with pool.acquire() as con:
            held.append(con)
            await con.execute("SELECT pg_sleep(60)")

    async with lifespan(app) as state:
        task = asyncio.create_task(stuck(state["pool"]))
        await wait_for(lambda: bool(held))
    with pytest.raises((asyncpg.PostgresConnectionError, asyncpg.InterfaceError)):
        await task
    assert "terminated them" in caplog.text
    assert state["pool"].is_closing()
    await wait_for(lambda: iam_emulator.open_connections == 0)


async def test_app_lifespan_composes(
    iam_emulator: RDSIAMEmulator,
    postgres_server: PostgresServer,
) -> None:
    """The app's own lifespan runs inside: it sees the pool, and its state reaches handlers."""
    events: list[str] = []

    @contextlib.asynccontextmanager
    async def app_lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        await app.state.pool.execute("CREATE TEMP TABLE IF NOT EXISTS t (x int)")
        events.append("app started")
        yield {"greeting": await app.state.pool.fetchval("SELECT 'hello'")}
        events.append(f"app stopping, pool usable: {await app.state.pool.fetchval('SELECT 1')}")

    async def greet(request: Request) -> JSONResponse:
        return JSONResponse(
            {
                "greeting": request.state.greeting,
                "pool": request.state.pool is request.app.state.pool,
            }
        )

    lifespan = asyncpg_iam.starlette.lifespan(
        app_lifespan=app_lifespan, **pool_kwargs(iam_emulator, postgres_server)
    )
    app = make_app(lifespan, Route("/greet", greet))
    async with served(app) as (url, _server), httpx.AsyncClient(base_url=url) as http:
        response = await http.get("/greet")
    assert response.json() == {"greeting": "hello", "pool": True}
    assert events == ["app started", "app stopping, pool usable: 1"]


async def test_connection_dependency_without_lifespan_is_explained(
    credential_server: CredentialServer,
) -> None:
    """A handler asking for a connection in an app without the lifespan gets a clear error."""

    async def handler(request: Request) -> JSONResponse:
        try:
            async for _con in asyncpg_iam.starlette.connection(request):
                pass
        except ConfigurationError as exc:
            return JSONResponse({"error": str(exc)})
        return JSONResponse({"error": None})

    app = Starlette(routes=[Route("/", handler)])
    async with served(app) as (url, _server), httpx.AsyncClient(base_url=url) as http:
        response = await http.get("/")
    assert "lifespan=asyncpg_iam.starlette.lifespan" in response.json()["error"]


def test_close_timeout_is_validated() -> None:
    """A negative close_timeout is refused when the lifespan is built."""
    with pytest.raises(ConfigurationError, match="close_timeout"):
        asyncpg_iam.starlette.lifespan(close_timeout=-1)
