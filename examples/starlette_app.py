"""A Starlette app on an IAM pool: ``python examples/starlette_app.py``.

Against RDS, set ``ASYNCPG_IAM_EXAMPLE_DSN=postgresql://app@<endpoint>:5432/app`` (credentials
come from the default AWS chain). Without it the example starts a throwaway PostgreSQL and the
local RDS IAM emulator in front of it (``asyncpg_iam.testing``; needs the PostgreSQL server
binaries and the ``testing`` extra) and signs with a key the emulator trusts.

Then open http://127.0.0.1:8000/ . ``--check`` makes a few requests to itself, prints the
answers and exits.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

import asyncpg_iam
import asyncpg_iam.starlette


async def homepage(request: Request) -> JSONResponse:
    """Answer with who the database thinks we are and how the pool is doing."""
    pool: asyncpg_iam.Pool = request.state.pool  # published by the lifespan
    async with pool.acquire() as con:
        user, pid = await con.fetchrow("SELECT current_user, pg_backend_pid()")
    stats = pool.stats()
    return JSONResponse(
        {"user": user, "pid": pid, "tokens_signed": stats.tokens_signed, "pool": pool.name}
    )


@contextlib.asynccontextmanager
async def app_lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
    """The application's own lifespan: runs once the pool is up, and can use it."""
    version = await app.state.pool.fetchval("SHOW server_version")
    print(f"connected to PostgreSQL {version}")
    yield {"version": version}


def create_app(dsn: str | None = None, **pool_kwargs: Any) -> Starlette:
    """Return the app; the pool is created at startup with these create_pool arguments."""
    lifespan = asyncpg_iam.starlette.lifespan(
        dsn,
        min_size=1,
        max_size=10,
        max_lifetime=300,
        close_timeout=10,
        app_lifespan=app_lifespan,
        **pool_kwargs,
    )
    return Starlette(routes=[Route("/", homepage)], lifespan=lifespan)


async def main(check: bool, port: int) -> None:
    """Serve the app until Ctrl-C (or, with `check`, make a few requests and stop)."""
    from _local import serve  # beside this file

    await serve(
        create_app,
        check=check,
        port=port,
        paths=["/"] * 3,
        banner="serving on {url}/ (Ctrl-C stops)",
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="make a few requests and exit")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    asyncio.run(main(args.check, args.port))
