"""Helpers shared by the test modules: pool arguments, polling, and the console script."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from asyncpg_iam.testing import ManualClock, PostgresServer, RDSIAMEmulator


def pool_kwargs(
    emulator: RDSIAMEmulator, server: PostgresServer, **overrides: Any
) -> dict[str, Any]:
    """Return create_pool arguments that dial the emulator as `server`'s user; pool of 1 to 4."""
    return emulator.pool_kwargs(
        user=server.user, database=server.database, **{"min_size": 1, "max_size": 4, **overrides}
    )


def engine_on(kwargs: dict[str, Any], **options: Any) -> Any:
    """Return an asyncpg_iam.sqlalchemy engine for the target of test-bed pool arguments
    (`kwargs` from a bed's ``pool_kwargs()``): its URL, `iam` and TLS context, plus `options`."""
    from asyncpg_iam.sqlalchemy import create_async_engine

    url = f"postgresql+asyncpg://{kwargs['user']}@{kwargs['host']}:{kwargs['port']}/{kwargs['database']}"
    return create_async_engine(
        url, iam=kwargs["iam"], connect_args={"ssl": kwargs["ssl"]}, **options
    )


def direct_kwargs(server: PostgresServer, **overrides: Any) -> dict[str, Any]:
    """Return create_pool arguments for `server` itself, without IAM (a static-password pool)."""
    return {
        "host": server.host,
        "port": server.port,
        "user": server.user,
        "password": server.password,
        "database": server.database,
        "iam": False,
        **overrides,
    }


def resolve_as_unknown(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """Make the running loop's resolver answer for `name` as DNS does for an unknown name.

    DNS itself cannot be asked in tests (no traffic off loopback); other names resolve as usual.
    """
    loop = asyncio.get_running_loop()
    real = loop.getaddrinfo

    async def resolve(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host == name:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return await real(host, *args, **kwargs)

    monkeypatch.setattr(loop, "getaddrinfo", resolve)


async def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll `condition` until it holds; fail the test when it does not within `timeout`."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout} s")
        await asyncio.sleep(0.02)


def console_script() -> str:
    """Return the installed `asyncpg-iam` script, or skip the test when it is not installed."""
    candidate = Path(sys.executable).parent / "asyncpg-iam"
    if candidate.is_file():
        return str(candidate)
    found = shutil.which("asyncpg-iam")
    if found is None:
        pytest.skip("the asyncpg-iam console script is not installed: run `pip install -e .`")
    return found


async def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> tuple[int, str, str]:
    """Run the console script without blocking the loop that serves the emulator."""
    proc = await asyncio.create_subprocess_exec(
        console_script(),
        *args,
        env=env if env is not None else dict(os.environ),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def run_in_lock_step(
    clock: ManualClock,
    *,
    workers: int,
    step: float,
    until: float,
    turn: Callable[[int], Awaitable[None]],
    hang: float = 30.0,
) -> None:
    """Run `workers` loops of ``await turn(n)`` until `clock` reaches `until`, in lock-step.

    The clock moves `step` only once every worker has finished its turn and sleeps on it, so
    real round trips take no clock time and machine load cannot starve a worker of turns.
    A turn should handle its own errors. Fails the test if the workers stop pausing for `hang`
    real seconds.
    """
    busy = workers
    paused = asyncio.Event()

    async def worker(n: int) -> None:
        nonlocal busy
        try:
            while clock.monotonic() < until:
                await turn(n)
                busy -= 1
                if busy == 0:
                    paused.set()
                await clock.sleep(step)
        finally:
            busy -= 1
            if busy <= 0:
                paused.set()

    async def drive() -> None:
        nonlocal busy
        while clock.monotonic() < until:
            try:
                await asyncio.wait_for(paused.wait(), hang)
            except asyncio.TimeoutError:
                pytest.fail(f"hung: the workers did not pause within {hang} s")
            paused.clear()
            busy = workers
            await clock.advance(step)

    await asyncio.gather(drive(), *(worker(n) for n in range(workers)))
