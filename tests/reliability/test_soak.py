"""Load and soak: many queries through recycling connections and rotating credentials."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter

import pytest

import asyncpg_iam
from asyncpg_iam.testing import CredentialServer, PostgresServer, RDSIAMEmulator

from .conftest import no_hang, pool_kwargs

pytestmark = pytest.mark.reliability

QUERIES = 10_000
KEYS = 3  # distinct access keys the logins must have used
WORKERS = 24


async def test_soak_every_query_answered_exactly_once(
    iam_emulator: RDSIAMEmulator,
    postgres_server: PostgresServer,
    credential_server: CredentialServer,
) -> None:
    """10,000+ queries with 1 s lifetimes and rotating keys: each answered once, correctly."""
    # Keys live 8 s and rotate every 2 s; the cache refetches about every 5 s, so every ~5 s the
    # logins switch to a new key.
    credential_server.lifetime = 8.0
    credential_server.rotate_every = 2.0
    ids = itertools.count(1)
    answers: Counter[int] = Counter()
    errors: dict[int, str] = {}
    wrong: list[int] = []
    hard_stop = time.monotonic() + 50  # the test fails below if the goal is not met by then

    def keys_used() -> int:
        return len({r.access_key for r in iam_emulator.records if r.accepted})

    def done() -> bool:
        return sum(answers.values()) >= QUERIES and keys_used() >= KEYS

    async def worker(pool: asyncpg_iam.Pool, n: int) -> None:
        while not done() and time.monotonic() < hard_stop:
            query_id = next(ids)
            try:
                if n % 2:
                    value = await pool.fetchval("SELECT $1::bigint", query_id, timeout=10)
                else:
                    async with pool.acquire(timeout=10) as con, con.transaction():
                        value = await con.fetchval("SELECT $1::bigint", query_id, timeout=10)
            except Exception as exc:
                errors[query_id] = type(exc).__name__
                continue
            answers[value] += 1
            if value != query_id:
                wrong.append(query_id)

    kwargs = pool_kwargs(
        iam_emulator, postgres_server, min_size=4, max_size=12, max_lifetime=1.0, timeout=10
    )
    async with asyncpg_iam.create_pool(**kwargs) as pool:
        await no_hang(asyncio.gather(*(worker(pool, n) for n in range(WORKERS))), limit=60)
        stats = pool.stats()

    issued = next(ids) - 1
    assert done(), f"{sum(answers.values())} queries, {keys_used()} keys before the hard stop"
    assert errors == {}
    assert wrong == []
    assert set(answers.values()) == {1}, "no query was answered twice"
    assert len(answers) == issued, "no query was lost"
    assert iam_emulator.logins_rejected == 0
    assert stats.connections_closed.get("max_lifetime", 0) >= 20
    assert stats.connections_opened == iam_emulator.logins_accepted
