"""A FastAPI app on an IAM pool: ``python examples/fastapi_app.py``.

Against RDS, set ``ASYNCPG_IAM_EXAMPLE_DSN=postgresql://app@<endpoint>:5432/app`` (credentials
come from the default AWS chain). Without it the example starts a throwaway PostgreSQL and the
local RDS IAM emulator in front of it (``asyncpg_iam.testing``; needs the PostgreSQL server
binaries and the ``testing`` extra) and signs with a key the emulator trusts.

Then open http://127.0.0.1:8000/items/7 or /stats. ``--check`` makes a few requests to
itself, prints the answers and exits.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Annotated, Any

import asyncpg
from fastapi import Depends, FastAPI, Request

import asyncpg_iam
import asyncpg_iam.starlette

#: A handler parameter of this type gets a pooled connection for the request.
Connection = Annotated[asyncpg.Connection, Depends(asyncpg_iam.starlette.connection)]


def create_app(dsn: str | None = None, **pool_kwargs: Any) -> FastAPI:
    """Return the app; the pool is created at startup with these create_pool arguments."""
    app = FastAPI(
        lifespan=asyncpg_iam.starlette.lifespan(
            dsn, min_size=1, max_size=10, max_lifetime=300, **pool_kwargs
        ),
    )

    @app.get("/items/{n}")
    async def item(n: int, con: Connection) -> dict[str, Any]:
        row = await con.fetchrow(
            "SELECT $1::int * 2 AS doubled, current_user AS user, pg_backend_pid() AS pid", n
        )
        return dict(row)

    @app.get("/stats")
    async def stats(request: Request) -> dict[str, Any]:
        pool: asyncpg_iam.Pool = request.state.pool
        s = pool.stats()
        return {
            "pool": pool.name,
            "connections_opened": s.connections_opened,
            "tokens_signed": s.tokens_signed,
            "open_connections": s.open_connections,
        }

    return app


async def main(check: bool, port: int) -> None:
    """Serve the app until Ctrl-C (or, with `check`, make a few requests and stop)."""
    from _local import serve  # beside this file

    await serve(
        create_app,
        check=check,
        port=port,
        paths=["/items/7", "/items/21", "/stats"],
        banner="serving on {url}: try {url}/items/7 and {url}/stats (Ctrl-C stops)",
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="make a few requests and exit")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    asyncio.run(main(args.check, args.port))
