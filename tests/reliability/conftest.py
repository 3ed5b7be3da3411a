"""Fixtures and helpers shared by the reliability suite."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import pytest

from asyncpg_iam import IAMAuth
from asyncpg_iam.testing import CredentialServer, PostgresServer, RDSIAMEmulator

T = TypeVar("T")

#: A bound on any single await in these tests: a hang detector, not a measurement.
HANG = 30.0


@pytest.fixture
async def emulator(
    rds_emulator: RDSIAMEmulator, credential_server: CredentialServer
) -> AsyncIterator[RDSIAMEmulator]:
    """An emulator that trusts every key the credential server issues."""
    credential_server.add_emulator(rds_emulator)
    return rds_emulator


def pool_kwargs(
    emulator: RDSIAMEmulator, server: PostgresServer, **overrides: Any
) -> dict[str, Any]:
    """Return create_pool arguments that dial the emulator and sign for its endpoint."""
    kwargs: dict[str, Any] = {
        "host": emulator.host,
        "port": emulator.port,
        "user": server.user,
        "database": server.database,
        "ssl": emulator.client_ssl_context(),
        "iam": IAMAuth(signing_host=emulator.endpoint),
        "min_size": 1,
        "max_size": 4,
        "timeout": 10,
    }
    kwargs.update(overrides)
    return kwargs


async def no_hang(awaitable: Awaitable[T], limit: float = HANG) -> T:
    """Await `awaitable`; fail the test (as a hang) if it takes longer than `limit`."""
    try:
        return await asyncio.wait_for(awaitable, limit)
    except asyncio.TimeoutError:
        pytest.fail(f"hung: no outcome within {limit} s")


async def wait_for(condition: Callable[[], bool], timeout: float = 15.0) -> None:
    """Poll `condition` until it holds; fail the test when it does not within `timeout`."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout} s")
        await asyncio.sleep(0.02)
