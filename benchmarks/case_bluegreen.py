"""Blue/green switchover under load: an IAM pool against a plain asyncpg.Pool.

Each variant gets its own `asyncpg_iam.testing.BlueGreenDeployment` (blue primary, green
synchronous standby, each behind the verifying emulator; the blue name's DNS moves to green
`DNS_LAG` s after the rename). 64 workers loop acquire, a read or an ``INSERT`` of a unique id,
release. After a warm-up: ``switchover(duration=5, dns_lag=60)`` (blue read-only for 5 s, green
promoted and renamed, completion reported), then the load goes on a few seconds.

- ``asyncpg_iam.Pool``: IAM with ``blue_green`` on (the test bed's resolver).
- ``asyncpg.Pool``: a password callable that signs a token for the blue name per connect.

Figures: failed queries (begun before blue went read-only / after), the longest stall (the
longest gap between two acknowledged queries), writes acknowledged on the wrong side (on blue
after green's promotion: the ledger on blue minus green), acknowledged writes missing on
green, logins and rejected tokens at the emulators from the switch on.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
from collections import Counter
from typing import Any

import asyncpg

import asyncpg_iam
from asyncpg_iam import Credentials
from asyncpg_iam.testing import BlueGreenDeployment

from ._harness import CaseResult
from ._shared import aws_keys, signer, versus

NAME = "bluegreen"
TITLE = "14. Blue/green switchover under load (64 workers, 5 s switch, 60 s DNS lag)"
NEEDS_ENVIRONMENT = False
WORKERS = 64
POOL_SIZE = 20
DURATION = 5.0
DNS_LAG = 60.0
ACCESS_KEY = "AKIABENCHBLUEGREEN01"


async def _variant(
    kind: str,
    *,
    warmup: float,
    after: float,
    duration: float,
    dns_lag: float,
    credentials: Credentials,
) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    async with BlueGreenDeployment() as bed:
        bed.register_key(credentials.access_key, credentials.secret_key)
        await bed.query(bed.blue, "CREATE TABLE ledger (id bigint)")
        common = {"min_size": POOL_SIZE, "max_size": POOL_SIZE}
        pool: Any
        if kind == "asyncpg_iam":
            pool = await asyncpg_iam.create_pool(**bed.pool_kwargs(**common))
            for _ in range(300):  # until the deployment is known
                if pool._bluegreen.tracker.phase:
                    break
                await asyncio.sleep(0.1)
        else:
            kwargs = bed.pool_kwargs(**common)
            del kwargs["iam"], kwargs["blue_green"]
            password = signer(bed.blue_endpoint, bed.signing_port, bed.user, credentials)
            pool = await asyncpg.create_pool(**kwargs, password=password)
        ids = itertools.count(1)
        acknowledged: list[int] = []
        done_at: list[float] = []
        failed: list[tuple[float, str]] = []
        stop = asyncio.Event()
        try:

            async def worker(n: int) -> None:
                while not stop.is_set():
                    write_id = next(ids)
                    began = loop.time()
                    try:
                        async with pool.acquire(timeout=60) as con:
                            if n % 2:
                                await con.execute("INSERT INTO ledger VALUES ($1)", write_id)
                                acknowledged.append(write_id)
                            else:
                                await con.fetchval("SELECT count(*) FROM pg_class")
                        done_at.append(loop.time())
                    except Exception as exc:
                        failed.append((began, type(exc).__name__))
                        await asyncio.sleep(0.05)

            tasks = [asyncio.ensure_future(worker(n)) for n in range(WORKERS)]
            await asyncio.sleep(warmup)
            switch_wall = dt.datetime.now(dt.timezone.utc)
            timeline = await bed.switchover(duration=duration, dns_lag=dns_lag)
            await asyncio.sleep(after)
            stop.set()
            await asyncio.gather(*tasks)
            counters = pool._bluegreen.counters if kind == "asyncpg_iam" else None
            # When the pool began to hold (its clock is the loop's monotonic one).
            follower = pool._bluegreen.follower if counters is not None else None
            seen = follower.first_hold_at if follower is not None else None
        finally:
            await pool.close()
        on_green = {r[0] for r in await bed.query(bed.green, "SELECT id FROM ledger")}
        on_blue = {r[0] for r in await bed.query(bed.blue, "SELECT id FROM ledger")}
        logins = [
            r
            for emulator in (bed.blue_emulator, bed.green_emulator)
            for r in emulator.records
            if r.at >= switch_wall
        ]
    done_at.sort()
    window = [t for t in done_at if t >= timeline.initiated_at - 1]
    gaps = [b - a for a, b in itertools.pairwise(window)]
    return {
        "kind": kind,
        "acknowledged_writes": len(acknowledged),
        "failed": len(failed),
        "failed_began_before_read_only": sum(1 for b, _ in failed if b < timeline.read_only_at),
        "failed_began_after": sum(1 for b, _ in failed if b >= timeline.read_only_at),
        "failed_began_after_hold": (
            None if seen is None else sum(1 for b, _ in failed if b >= seen)
        ),
        "errors": dict(Counter(name for _, name in failed)),
        "longest_stall_s": max(gaps) if gaps else None,
        "wrong_side": len(on_blue - on_green),
        "lost": sum(1 for i in acknowledged if i not in on_green),
        "logins": len(logins),
        "rejected_tokens": sum(1 for r in logins if not r.accepted),
        "fallback_refusals": None if counters is None else counters.fallback_refusals,
        "switch_s": timeline.promoted_at - timeline.read_only_at,
    }


async def run(env: Any, quick: bool) -> CaseResult:
    """Run the switchover once with each pool and compare."""
    # The smoke run: a 1 s switch and a 2 s DNS lag (the real run's lag outlasts it).
    warmup, after, duration, lag = (1.0, 3.0, 1.0, 2.0) if quick else (3.0, 5.0, DURATION, DNS_LAG)
    result = CaseResult(NAME, TITLE)
    variants: dict[str, dict[str, Any]] = {}
    with aws_keys(ACCESS_KEY) as credentials:
        for kind in ("asyncpg_iam", "asyncpg"):
            variants[kind] = await _variant(
                kind,
                warmup=warmup,
                after=after,
                duration=duration,
                dns_lag=lag,
                credentials=credentials,
            )
    result.figures = {"workers": WORKERS, "pool_size": POOL_SIZE, "dns_lag_s": lag, **variants}
    ours, plain = variants["asyncpg_iam"], variants["asyncpg"]

    def both(key: str, fmt: str = "{}") -> str:
        return versus(ours, plain, key, fmt)

    result.add(
        "writes acknowledged (asyncpg_iam.Pool vs asyncpg.Pool)", both("acknowledged_writes")
    )
    result.add(
        "failed queries begun before blue went read-only",
        both("failed_began_before_read_only"),
        "reported",
    )
    result.add(
        "failed queries begun after (in flight before the pool saw it)", both("failed_began_after")
    )
    result.add(
        "asyncpg_iam.Pool: failed queries begun after the pool saw the switch",
        str(ours["failed_began_after_hold"]),
        "0",
        ours["failed_began_after_hold"] == 0,
    )
    stall = ours["longest_stall_s"]
    result.add(
        "longest stall",
        both("longest_stall_s", "{:.2f} s"),
        f"<= switch + 1 s ({ours['switch_s'] + 1:.1f} s)",
        stall is not None and stall <= ours["switch_s"] + 1,
    )
    result.add(
        "writes acknowledged on the wrong side / lost",
        f"{ours['wrong_side']} / {ours['lost']} vs {plain['wrong_side']} / {plain['lost']}",
        "0 / 0",
        ours["wrong_side"] == ours["lost"] == 0,
    )
    result.add(
        "logins from the switch on (rejected tokens)",
        f"{ours['logins']} ({ours['rejected_tokens']}) vs "
        f"{plain['logins']} ({plain['rejected_tokens']})",
    )
    refusals = ours["fallback_refusals"]
    result.add(
        "asyncpg_iam.Pool: the fallback's first tries refused (all its refused logins)",
        str(refusals),
        "<= 1 (one a switchover)",
        refusals is not None and refusals <= 1,
    )
    result.notes.append(
        f"Each variant runs on its own BlueGreenDeployment: {warmup:g} s of load, then "
        f"switchover(duration={duration:g}, dns_lag={lag:g}) and {after:g} s more. With the "
        "60 s lag the plain pool never reaches green within the run. Its own run writes "
        "its own file: python -m benchmarks --only bluegreen --output "
        "benchmarks/results/bluegreen."
    )
    return result
