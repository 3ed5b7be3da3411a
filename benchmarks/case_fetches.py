"""Credential fetches: a cold stampede of connects, and an hour of 900-second credentials.

1. 1,000 concurrent cold connects: an ``asyncpg_iam.Pool`` (min_size 0, max_size 1,000) whose
   credentials come from the default chain's container provider, pointed at a
   `CredentialServer`; 1,000 tasks acquire at once, so 1,000 connects ask the empty credential
   cache together. Every connect goes through the verifying emulator. The figure is the
   server's request count.
2. An hour of credentials issued for 900 s (what an assumed role with ``DurationSeconds=900``
   gives; served here by a `CredentialServer` with ``lifetime=900``, which makes a new key
   available every 450 s, as STS would hand out a new session whenever asked): one read per
   5 simulated seconds for 3,600 s (720 reads; each aiobotocore fetch costs real time).

   - asyncpg-iam: its `CredentialCache` over the default chain, driven by a `ManualClock`
     shared with the server.
   - aiobotocore: the ``AioRefreshableCredentials`` object ``AioSession().get_credentials()``
     returns for the same server, with its ``_time_fetcher`` attribute (the function botocore's
     ``RefreshableCredentials`` reads the time from, normally ``_local_now``) replaced by the
     same manual clock's ``now``; ``await get_frozen_credentials()`` is what a signer calls.
"""

from __future__ import annotations

import asyncio
import time

import asyncpg_iam
from asyncpg_iam._auth import credential_cache_for
from asyncpg_iam._clock import ManualClock
from asyncpg_iam.testing import CredentialServer

from ._harness import CaseResult, Environment, patched_environ

NAME = "fetches"
TITLE = "3. Credential fetches"
NEEDS_ENVIRONMENT = True


async def _stampede(env: Environment, connects: int) -> dict[str, float]:
    with CredentialServer() as server, env.container_credentials(server):
        pool = await asyncpg_iam.create_pool(
            **env.iam_kwargs(),
            iam=env.iam_auth(),
            min_size=0,
            max_size=connects,
            max_lifetime=None,
        )
        failures = 0

        async def one() -> None:
            nonlocal failures
            try:
                async with pool.acquire(timeout=120) as con:
                    await con.fetchval("SELECT 1")
                    await asyncio.sleep(0.05)  # hold it, so the connects overlap
            except Exception:
                failures += 1

        started = time.perf_counter()
        try:
            await asyncio.gather(*(one() for _ in range(connects)))
            elapsed = time.perf_counter() - started
            stats = pool.stats()
        finally:
            await pool.close()
        return {
            "connects": connects,
            "server_requests": server.requests,
            "cache_fetches": stats.credential_fetches,
            "connections_opened": stats.connections_opened,
            "tokens_signed": stats.tokens_signed,
            "failures": failures,
            "seconds": elapsed,
        }


async def _hour_ours(seconds: int, every: int) -> dict[str, float]:
    clock = ManualClock(start=_start())
    server = CredentialServer(lifetime=900, clock=clock)
    with server, patched_environ(_container_env(server)):
        cache = credential_cache_for(clock=clock)
        keys: set[str] = set()
        try:
            for _ in range(0, seconds, every):
                keys.add((await cache.get()).access_key)
                await clock.advance(every)
                # A background refresh is real HTTP; let it land before simulated time moves
                # on, as it would in an hour of real time. (`_task` is the cache's in-flight
                # fetch; peeking at it keeps the benchmark deterministic.)
                task = cache._task
                if task is not None:
                    await asyncio.wait({task})
        finally:
            await cache.aclose()
        return {
            "reads": seconds // every,
            "server_requests": server.requests,
            "keys_seen": len(keys),
        }


async def _hour_aiobotocore(seconds: int, every: int) -> dict[str, float]:
    from aiobotocore.session import AioSession

    clock = ManualClock(start=_start())
    server = CredentialServer(lifetime=900, clock=clock)
    with server, patched_environ(_container_env(server)):
        credentials = await AioSession().get_credentials()
        # botocore's RefreshableCredentials asks `self._time_fetcher()` for the current time.
        credentials._time_fetcher = clock.now
        keys: set[str] = set()
        for _ in range(0, seconds, every):
            frozen = await credentials.get_frozen_credentials()
            keys.add(frozen.access_key)
            await clock.advance(every)
        reads = seconds // every
        return {"reads": reads, "server_requests": server.requests, "keys_seen": len(keys)}


def _container_env(server: CredentialServer) -> dict[str, str | None]:
    """Point the default chain at `server` (and hide the static key the suite exports)."""
    return {**server.env(), "AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None}


def _start():  # type: ignore[no-untyped-def]
    import datetime as dt

    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0)


async def run(env: Environment, quick: bool) -> CaseResult:
    """Count fetches in both scenarios."""
    result = CaseResult(NAME, TITLE)
    connects = 100 if quick else 1000
    seconds = 600 if quick else 3600
    stampede = await _stampede(env, connects)
    every = 5
    ours = await _hour_ours(seconds, every)
    theirs = await _hour_aiobotocore(seconds, every)
    result.figures = {"stampede": stampede, "hour": {"asyncpg_iam": ours, "aiobotocore": theirs}}
    fetched = stampede["server_requests"]
    result.add(
        f"{connects} concurrent cold connects: credential fetches",
        f"{fetched} (connections opened {stampede['connections_opened']}, failed "
        f"{stampede['failures']}, {stampede['seconds']:.1f} s)",
        "1",
        fetched == 1 and stampede["failures"] == 0,
    )
    result.add(
        f"900 s credentials, a read every {every} s for {seconds} s: asyncpg-iam fetches",
        f"{ours['server_requests']} ({ours['keys_seen']} keys used)",
        "about 1 per rotation (8 an hour)",
        ours["server_requests"] <= seconds / 450 + 2,
    )
    result.add(
        f"900 s credentials, a read every {every} s for {seconds} s: aiobotocore fetches",
        f"{theirs['server_requests']} ({theirs['keys_seen']} keys used)",
    )
    result.notes.append(
        "The hour is simulated: a ManualClock drives both the credential server and the "
        "reader (asyncpg-iam's cache takes it as `clock`; aiobotocore's refreshable "
        "credentials get it by replacing their `_time_fetcher`). aiobotocore refreshes "
        "inside a 15-minute advisory window, so credentials issued for 15 minutes are "
        "refetched on every read."
    )
    return result
