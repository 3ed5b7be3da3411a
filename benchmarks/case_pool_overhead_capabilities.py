"""Pool overhead with each capability on, on the test bed where it acts (issue #28, item 3).

Case 6's measurement (acquire + ``SELECT 1`` + release, min_size = max_size = 10, 20 workers,
interleaved rounds on fresh sets of pools, both estimators and the A/A control) with
``asyncpg_iam.Pool`` set up so that one capability is on and acting, against ``asyncpg.Pool``
on the same test bed with a token signed once as a static password:

- ``topology``: `AuroraCluster` (a writer and a reader), the pool on its cluster endpoint with
  the topology on (the monitor refreshes it in the background);
- ``health``: silent-host health checks on (the default), through the verifying emulator;
- ``blue_green_deployment``: `BlueGreenDeployment` (a deployment present, no switch), the pool
  on the blue name with ``blue_green`` on, timed once the pool has seen the deployment;
- ``blue_green_none``: ``blue_green`` on, no deployment (issue #29's "no measurable cost");
- ``rds_proxy``: the emulator in RDS Proxy mode, the pool with its RDS Proxy defaults. Those
  make a release send nothing to the server, where ``asyncpg.Pool`` sends its reset query (and
  pins every session with it), so here the IAM pool is faster by that query per operation.

Each capability is to stay off the acquire and query paths: the ratio is held to the A/A
control's spread, as case 6's is.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg

import asyncpg_iam
from asyncpg_iam import IAMAuth, build_auth_token
from asyncpg_iam.testing import DEFAULT_PROXY_ENDPOINT, AuroraCluster, BlueGreenDeployment

from ._harness import CaseResult, Environment
from ._shared import aws_keys
from .case_pool_overhead import POOL_SIZE, PoolFactory, add_rows, compare

NAME = "pool_overhead_capabilities"
TITLE = "6b. Pool overhead with each capability on (topology, health, blue/green, RDS Proxy)"
NEEDS_ENVIRONMENT = True
BLOCKS = 6  # a multiple of 3: each pool made at each place alike (`_block`)
ROUNDS_PER_BLOCK = 20
ROUND_SECONDS = 0.25
ACCESS_KEY = "AKIABENCHCAPABILITY1"
SIZES: dict[str, Any] = {"min_size": POOL_SIZE, "max_size": POOL_SIZE}

Bed = Callable[
    [Environment], contextlib.AbstractAsyncContextManager[tuple[PoolFactory, PoolFactory]]
]


def _signed_once(host: str, port: int, user: str, credentials: Any) -> str:
    return build_auth_token(
        host=host, port=port, user=user, region="us-east-1", credentials=credentials
    )


@contextlib.asynccontextmanager
async def _topology(_env: Environment) -> AsyncIterator[tuple[PoolFactory, PoolFactory]]:
    with aws_keys(ACCESS_KEY) as credentials:
        async with AuroraCluster(replicas=1, lag=0.0) as cluster:
            cluster.register_key(credentials.access_key, credentials.secret_key)
            plain = cluster.pool_kwargs()
            del plain["iam"], plain["topology"]
            token = _signed_once(cluster.endpoint, 5432, cluster.user, credentials)
            yield (
                functools.partial(asyncpg.create_pool, **plain, password=token, **SIZES),
                functools.partial(
                    asyncpg_iam.create_pool, **cluster.pool_kwargs(topology=True), **SIZES
                ),
            )


@contextlib.asynccontextmanager
async def _health(env: Environment) -> AsyncIterator[tuple[PoolFactory, PoolFactory]]:
    token = _signed_once(env.signing_host, env.signing_port, env.user, env.credentials)
    check = asyncpg_iam.HealthCheck()
    yield (
        functools.partial(asyncpg.create_pool, **env.iam_kwargs(), password=token, **SIZES),
        functools.partial(
            asyncpg_iam.create_pool,
            **env.iam_kwargs(),
            iam=env.iam_auth(),
            health_check=check,
            **SIZES,
        ),
    )


@contextlib.asynccontextmanager
async def _blue_green_none(env: Environment) -> AsyncIterator[tuple[PoolFactory, PoolFactory]]:
    token = _signed_once(env.signing_host, env.signing_port, env.user, env.credentials)
    yield (
        functools.partial(asyncpg.create_pool, **env.iam_kwargs(), password=token, **SIZES),
        functools.partial(
            asyncpg_iam.create_pool,
            **env.iam_kwargs(),
            iam=env.iam_auth(),
            blue_green=True,
            **SIZES,
        ),
    )


@contextlib.asynccontextmanager
async def _blue_green_deployment(
    _env: Environment,
) -> AsyncIterator[tuple[PoolFactory, PoolFactory]]:
    with aws_keys(ACCESS_KEY) as credentials:
        async with BlueGreenDeployment() as bed:
            bed.register_key(credentials.access_key, credentials.secret_key)
            plain = bed.pool_kwargs()
            del plain["iam"], plain["blue_green"]
            token = _signed_once(bed.blue_endpoint, bed.signing_port, bed.user, credentials)

            async def ours() -> Any:
                pool = await asyncpg_iam.create_pool(**bed.pool_kwargs(), **SIZES)
                for _ in range(300):  # until the deployment is known
                    if pool._bluegreen.tracker.phase:
                        break
                    await asyncio.sleep(0.1)
                return pool

            yield functools.partial(asyncpg.create_pool, **plain, password=token, **SIZES), ours


@contextlib.asynccontextmanager
async def _rds_proxy(env: Environment) -> AsyncIterator[tuple[PoolFactory, PoolFactory]]:
    emulator = await env.sandbox.add_emulator(endpoint=DEFAULT_PROXY_ENDPOINT)
    plain = emulator.connect_kwargs(user=env.user, database=env.database)
    token = build_auth_token(
        host=emulator.endpoint,
        port=emulator.port,
        user=env.user,
        region=emulator.region,
        credentials=env.credentials,
    )
    ours = emulator.pool_kwargs(
        user=env.user,
        database=env.database,
        iam=IAMAuth(signing_host=emulator.endpoint, credentials=env.credentials),
    )
    yield (
        functools.partial(asyncpg.create_pool, **plain, password=token, **SIZES),
        functools.partial(asyncpg_iam.create_pool, **ours, **SIZES),
    )


#: The capabilities, by the name their figures are kept under: (row label, test bed).
VARIANTS: dict[str, tuple[str, Bed]] = {
    "topology": ("topology on (AuroraCluster, cluster endpoint)", _topology),
    "health": ("silent-host health checks on", _health),
    "blue_green_deployment": (
        "blue/green on, a deployment present, no switch (BlueGreenDeployment)",
        _blue_green_deployment,
    ),
    "blue_green_none": ("blue/green on, no deployment", _blue_green_none),
    "rds_proxy": ("RDS Proxy defaults (emulator in proxy mode)", _rds_proxy),
}


async def run(env: Environment, quick: bool) -> CaseResult:
    """Compare each capability's pool with asyncpg.Pool on its test bed, case 6's way."""
    blocks, rounds = (1, 2) if quick else (BLOCKS, ROUNDS_PER_BLOCK)
    result = CaseResult(NAME, TITLE)
    result.figures = {
        "blocks": blocks,
        "rounds": blocks * rounds,
        "round_seconds": ROUND_SECONDS,
        "pool_size": POOL_SIZE,
    }
    for name, (label, bed) in VARIANTS.items():
        async with bed(env) as (make_plain, make_iam):
            figures = await compare(make_plain, make_iam, blocks, rounds, ROUND_SECONDS)
        result.figures[name] = figures
        add_rows(result, label, figures)
    result.notes.append(
        "asyncpg.Pool presents a token signed once as a static password on the same test bed; "
        "asyncpg_iam.Pool has the capability on. Both estimators and the A/A control as in "
        "case 6. Through RDS Proxy the IAM pool's release sends nothing (its proxy defaults) "
        "where asyncpg.Pool sends its reset query, which also pins the session: that query "
        "per operation is the difference there."
    )
    return result
