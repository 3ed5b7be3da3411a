"""RDS Proxy: sessions pinned by what each client sends on its own, through the proxy mode.

One emulator in RDS Proxy mode (`asyncpg_iam.testing`, AWS's pinning conditions for
PostgreSQL applied to every relayed Query and Parse message) in front of the environment's
PostgreSQL. Each client runs the same workload on defaults: queries with parameters, a
transaction, JSON (``jsonb`` with a codec) and a custom codec on a composite type, an enum
(both need type introspection), over several acquires and releases. The clients:

- ``ours``: ``asyncpg_iam.create_pool`` for the proxy endpoint;
- ``asyncpg``: a plain ``asyncpg.Pool`` with a token as password;
- ``sqlalchemy_ours``: ``asyncpg_iam.sqlalchemy.create_async_engine``;
- ``sqlalchemy``: SQLAlchemy's own ``postgresql+asyncpg`` engine with a token as password;
- ``starlette``: a Starlette app on ``asyncpg_iam.starlette.lifespan``, called through
  httpx's ASGI transport.

A pin's cause is ``library`` when the pinning statement is one a driver sends on its own
(asyncpg's reset query, the ``set_config('jit', ...)`` around its type introspection), else
``user``. It counts; it does not time.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg

import asyncpg_iam
from asyncpg_iam import IAMAuth, build_auth_token
from asyncpg_iam.testing import DEFAULT_PROXY_ENDPOINT, RDSIAMEmulator

from ._harness import CaseResult, Environment

NAME = "proxy"
TITLE = "11. RDS Proxy: sessions pinned by what the client sends on its own (counts)"
NEEDS_ENVIRONMENT = True

POOL_SIZE = 4
_TYPES = (
    "DROP TYPE IF EXISTS proxy_bench_mood; DROP TYPE IF EXISTS proxy_bench_pair;"
    "CREATE TYPE proxy_bench_mood AS ENUM ('ok', 'sad');"
    "CREATE TYPE proxy_bench_pair AS (a int, b text);"
    "CREATE TABLE IF NOT EXISTS proxy_bench_items (id serial PRIMARY KEY, note jsonb)"
)
_DROP = "DROP TABLE IF EXISTS proxy_bench_items; DROP TYPE proxy_bench_mood, proxy_bench_pair"


async def _asyncpg_session(con: Any) -> None:
    """One acquire's worth of the workload on an asyncpg connection."""
    await con.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")
    await con.set_type_codec(
        "proxy_bench_pair", encoder=lambda v: v, decoder=lambda v: v, format="tuple"
    )
    assert await con.fetchval("SELECT $1::int + 1", 41) == 42
    async with con.transaction():
        await con.execute("INSERT INTO proxy_bench_items (note) VALUES ($1)", {"a": 1})
    assert await con.fetchval("SELECT note FROM proxy_bench_items LIMIT 1") == {"a": 1}
    assert await con.fetchval("SELECT 'ok'::proxy_bench_mood") == "ok"
    assert await con.fetchval("SELECT (1, 'x')::proxy_bench_pair") == (1, "x")


async def _concurrently(acquires: int, one: Callable[[], Awaitable[None]]) -> None:
    """Run `acquires` calls of `one` on POOL_SIZE workers at once (so every connection serves)."""

    async def worker(count: int) -> None:
        for _ in range(count):
            await one()

    share, extra = divmod(acquires, POOL_SIZE)
    await asyncio.gather(*(worker(share + (n < extra)) for n in range(POOL_SIZE)))


async def _pool_workload(pool: Any, acquires: int) -> None:
    async def one() -> None:
        async with pool.acquire() as con:
            await _asyncpg_session(con)

    await _concurrently(acquires, one)


async def _engine_workload(engine: Any, acquires: int) -> None:
    from sqlalchemy import text

    async def one() -> None:
        async with engine.begin() as conn:
            await conn.execute(text("SELECT CAST(:n AS int) + 1"), {"n": 41})
            await conn.execute(
                text("INSERT INTO proxy_bench_items (note) VALUES (CAST(:note AS jsonb))"),
                {"note": json.dumps({"a": 1})},
            )
            await conn.execute(text("SELECT note FROM proxy_bench_items LIMIT 1"))
            await conn.execute(text("SELECT 'ok'::proxy_bench_mood"))
            await conn.execute(text("SELECT (1, 'x')::proxy_bench_pair"))

    await _concurrently(acquires, one)


def _token_for(env: Environment, emulator: RDSIAMEmulator) -> Callable[[], str]:
    def token() -> str:
        return build_auth_token(
            host=emulator.endpoint,
            port=emulator.port,
            user=env.user,
            region=emulator.region,
            credentials=env.credentials,
        )

    return token


async def _ours(env: Environment, emulator: RDSIAMEmulator, acquires: int) -> None:
    kwargs = emulator.pool_kwargs(
        user=env.user,
        database=env.database,
        iam=IAMAuth(signing_host=emulator.endpoint, credentials=env.credentials),
        min_size=1,
        max_size=POOL_SIZE,
    )
    async with asyncpg_iam.create_pool(**kwargs) as pool:
        await _pool_workload(pool, acquires)


async def _plain_asyncpg(env: Environment, emulator: RDSIAMEmulator, acquires: int) -> None:
    kwargs = emulator.connect_kwargs(user=env.user, database=env.database)
    async with asyncpg.create_pool(
        **kwargs, password=_token_for(env, emulator), min_size=1, max_size=POOL_SIZE
    ) as pool:
        await _pool_workload(pool, acquires)


async def _engine_run(
    create_async_engine: Callable[..., Any],
    env: Environment,
    emulator: RDSIAMEmulator,
    acquires: int,
    *,
    connect_args: dict[str, Any],
    **options: Any,
) -> None:
    """Run the engine workload on an engine `create_async_engine` makes for the emulator."""
    kwargs = emulator.connect_kwargs(user=env.user, database=env.database)
    url = f"postgresql+asyncpg://{env.user}@{kwargs['host']}:{kwargs['port']}/{env.database}"
    engine = create_async_engine(
        url, connect_args={"ssl": kwargs["ssl"], **connect_args}, pool_size=POOL_SIZE, **options
    )
    try:
        await _engine_workload(engine, acquires)
    finally:
        await engine.dispose()


async def _sqlalchemy_ours(env: Environment, emulator: RDSIAMEmulator, acquires: int) -> None:
    from asyncpg_iam.sqlalchemy import create_async_engine

    iam = IAMAuth(signing_host=emulator.endpoint, credentials=env.credentials)
    await _engine_run(create_async_engine, env, emulator, acquires, connect_args={}, iam=iam)


async def _sqlalchemy(env: Environment, emulator: RDSIAMEmulator, acquires: int) -> None:
    from sqlalchemy.ext.asyncio import create_async_engine

    password = _token_for(env, emulator)
    await _engine_run(
        create_async_engine, env, emulator, acquires, connect_args={"password": password}
    )


async def _starlette(env: Environment, emulator: RDSIAMEmulator, acquires: int) -> None:
    import httpx
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    import asyncpg_iam.starlette

    async def item(request: Request) -> JSONResponse:
        async with asyncpg_iam.starlette.get_pool(request).acquire() as con:
            await _asyncpg_session(con)
        return JSONResponse({"ok": True})

    lifespan = asyncpg_iam.starlette.lifespan(
        **emulator.pool_kwargs(
            user=env.user,
            database=env.database,
            iam=IAMAuth(signing_host=emulator.endpoint, credentials=env.credentials),
            min_size=1,
            max_size=POOL_SIZE,
        )
    )
    app = Starlette(routes=[Route("/item", item)], lifespan=lifespan)
    async with lifespan(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:

            async def one() -> None:
                response = await client.get("/item")
                response.raise_for_status()

            await _concurrently(acquires, one)


CLIENTS: dict[str, tuple[str, Callable[[Environment, RDSIAMEmulator, int], Awaitable[None]]]] = {
    "ours": ("asyncpg_iam.create_pool (defaults)", _ours),
    "asyncpg": ("asyncpg.create_pool", _plain_asyncpg),
    "sqlalchemy_ours": ("asyncpg_iam.sqlalchemy engine", _sqlalchemy_ours),
    "sqlalchemy": ("SQLAlchemy's postgresql+asyncpg engine", _sqlalchemy),
    "starlette": ("Starlette app on asyncpg_iam.starlette", _starlette),
}


async def run(env: Environment, quick: bool) -> CaseResult:
    """Run the workload through the proxy mode with each client; count pinned sessions."""
    acquires = 6 if quick else 40
    emulator = await env.sandbox.add_emulator(endpoint=DEFAULT_PROXY_ENDPOINT)
    admin = await asyncpg.connect(**env.direct_kwargs())
    await admin.execute(_TYPES)
    figures: dict[str, Any] = {"acquires": acquires, "pool_size": POOL_SIZE, "clients": {}}
    result = CaseResult(NAME, TITLE)
    try:
        for name, (label, client) in CLIENTS.items():
            emulator.reset_proxy_counts()
            await client(env, emulator, acquires)
            report = emulator.proxy_report()
            by_cause = report.pinned_by_cause
            figures["clients"][name] = {
                "label": label,
                "sessions": report.sessions,
                "pinned": report.pinned_sessions,
                "pinned_by_cause": by_cause,
                "pinned_by_rule": report.pinned_by_rule,
                "reasons": sorted({event.reason for event in report.events}),
            }
            library, user = by_cause.get("library", 0), by_cause.get("user", 0)
            own = name in ("ours", "sqlalchemy_ours", "starlette")
            result.add(
                f"{label}: sessions pinned by the library/asyncpg (by the user's SQL)",
                f"{library} of {report.sessions} ({user})",
                "0" if own else "",
                library == 0 if own else None,
            )
    finally:
        await admin.execute(_DROP)
        await admin.close()
    result.figures = figures
    result.notes.append(
        "Workload per acquire: a parameterised query, a transaction with an INSERT, jsonb "
        "with a codec, a custom codec on a composite type, an enum. Pins are counted by the "
        "emulator's RDS Proxy mode (asyncpg_iam.testing, PinRules defaults: protocol-level "
        "prepared statements do not pin)."
    )
    return result
