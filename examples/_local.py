"""How the examples run with one command: serving a web app, and the self-contained mode.

Without ``ASYNCPG_IAM_EXAMPLE_DSN`` the examples start `asyncpg_iam.testing.Sandbox`: a throwaway
PostgreSQL with the RDS IAM emulator in front (`local_rds`; needs the PostgreSQL server binaries
and the ``testing`` extra), signing with stand-in keys that only the emulator trusts.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from asyncpg_iam.testing import Sandbox


def local_rds() -> Sandbox:
    """Return a sandbox to start: PostgreSQL, the RDS IAM emulator and a credential endpoint.

    Inside ``async with`` the default AWS chain finds keys that only this emulator trusts.
    """
    from asyncpg_iam.testing import Sandbox

    return Sandbox()


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
