"""Fixtures and helpers shared by the reliability suite."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, TypeVar

import pytest

from asyncpg_iam.testing import PostgresServer, RDSIAMEmulator
from tests import _support

T = TypeVar("T")

#: A bound on any single await in these tests: a hang detector, not a measurement.
HANG = 30.0


def pool_kwargs(
    emulator: RDSIAMEmulator, server: PostgresServer, **overrides: Any
) -> dict[str, Any]:
    """Return the suite's create_pool arguments (`tests._support.pool_kwargs`), timeout 10 s."""
    return _support.pool_kwargs(emulator, server, **{"timeout": 10, **overrides})


async def no_hang(awaitable: Awaitable[T], limit: float = HANG) -> T:
    """Await `awaitable`; fail the test (as a hang) if it takes longer than `limit`."""
    try:
        return await asyncio.wait_for(awaitable, limit)
    except asyncio.TimeoutError:
        pytest.fail(f"hung: no outcome within {limit} s")
