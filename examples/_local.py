"""How the examples run with one command: serving a web app, and the self-contained mode.

Without ``ASYNCPG_IAM_EXAMPLE_DSN`` the examples start a throwaway PostgreSQL with the RDS IAM
emulator in front (`local_rds`; needs the PostgreSQL server binaries and the ``testing`` extra)
and sign with a stand-in key that only the emulator trusts.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import asyncpg_iam

if TYPE_CHECKING:
    from asyncpg_iam.testing import PostgresServer, RDSIAMEmulator


@dataclass
class LocalRDS:
    """A running local stand-in for RDS, and how to sign for it."""

    server: PostgresServer
    emulator: RDSIAMEmulator
    iam: asyncpg_iam.IAMAuth

    def pool_kwargs(self) -> dict[str, Any]:
        """Return create_pool arguments for it."""
        return self.emulator.pool_kwargs(
            user=self.server.user, database=self.server.database, iam=self.iam
        )


@contextlib.asynccontextmanager
async def local_rds() -> AsyncIterator[LocalRDS]:
    """Start PostgreSQL and the RDS IAM emulator; stop both on exit."""
    from asyncpg_iam.testing import PostgresCluster, RDSIAMEmulator

    with PostgresCluster() as cluster:
        server = cluster.server
        emulator = RDSIAMEmulator(
            backend_host=server.host,
            backend_port=server.port,
            backend_password=server.password,
            iam_users=[server.user],
        )
        # Stand-in AWS credentials that only this emulator trusts.
        key = asyncpg_iam.Credentials(
            access_key="AKIAEXAMPLE" + secrets.token_hex(5).upper(),
            secret_key=secrets.token_urlsafe(30),
        )
        emulator.register_key(key.access_key, key.secret_key, None)
        async with emulator:
            iam = asyncpg_iam.IAMAuth(signing_host=emulator.endpoint, credentials=key)
            yield LocalRDS(server, emulator, iam)


async def serve(
    create_app: Callable[..., Any], *, check: bool, port: int, paths: Sequence[str], banner: str
) -> None:
    """Serve ``create_app(dsn, **pool_kwargs)`` until Ctrl-C, printing `banner` (with ``{url}``).

    The pool goes to ``ASYNCPG_IAM_EXAMPLE_DSN`` when it is set, else to `local_rds`. With
    `check`, GET each of `paths` instead, print the answers and stop.
    """
    import httpx
    import uvicorn

    dsn = os.environ.get("ASYNCPG_IAM_EXAMPLE_DSN")
    async with contextlib.AsyncExitStack() as stack:
        kwargs: dict[str, Any] = {}
        if not dsn:
            kwargs = (await stack.enter_async_context(local_rds())).pool_kwargs()
        app = create_app(dsn, **kwargs)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0 if check else port))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        server = uvicorn.Server(uvicorn.Config(app, log_level="info"))
        serving = asyncio.create_task(server.serve(sockets=[sock]))
        if not check:
            print(banner.format(url=url))
            await serving
            return
        while not server.started and not serving.done():  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        async with httpx.AsyncClient(base_url=url) as http:
            for path in paths:
                response = await http.get(path)
                response.raise_for_status()
                print(path, response.json())
        server.should_exit = True
        await serving
