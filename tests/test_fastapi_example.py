"""examples/fastapi_app.py: its routes through the emulator, and its one-command run."""

from __future__ import annotations

import asyncio
import importlib.util
import socket
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from asyncpg_iam.testing import (  # noqa: E402
    PostgresNotFoundError,
    PostgresServer,
    RDSIAMEmulator,
    find_postgres_bin,
)

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "fastapi_app.py"


def load_example() -> ModuleType:
    """Import examples/fastapi_app.py as a module."""
    spec = importlib.util.spec_from_file_location("fastapi_app_example", EXAMPLE)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def test_fastapi_example_serves_through_the_emulator(
    iam_emulator: RDSIAMEmulator, postgres_server: PostgresServer
) -> None:
    """The example's routes answer through uvicorn, with Depends(connection) on IAM logins."""
    example = load_example()
    app = example.create_app(
        **iam_emulator.pool_kwargs(user=postgres_server.user, database=postgres_server.database)
    )
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        serving = asyncio.create_task(server.serve(sockets=[sock]))
        try:
            while not server.started and not serving.done():  # noqa: ASYNC110
                await asyncio.sleep(0.01)
            async with httpx.AsyncClient(base_url=url) as http:
                items = await asyncio.gather(*(http.get(f"/items/{n}") for n in range(12)))
                stats = (await http.get("/stats")).json()
        finally:
            server.should_exit = True
            await serving
    assert [r.status_code for r in items] == [200] * 12
    assert [r.json()["doubled"] for r in items] == [2 * n for n in range(12)]
    assert {r.json()["user"] for r in items} == {postgres_server.user}
    assert iam_emulator.logins_rejected == 0
    assert stats["connections_opened"] == iam_emulator.logins_accepted >= 2
    assert iam_emulator.open_connections == 0, "the pool closed at shutdown"


def test_fastapi_example_runs_with_one_command() -> None:
    """``python examples/fastapi_app.py --check`` starts its own emulator and answers."""
    try:
        find_postgres_bin()
    except PostgresNotFoundError as exc:
        pytest.skip(f"the example's self-contained mode needs PostgreSQL binaries: {exc}")
    result = subprocess.run(
        [sys.executable, str(EXAMPLE), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "/items/7 {'doubled': 14" in result.stdout
    assert "/stats {" in result.stdout
