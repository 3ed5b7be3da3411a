"""Aurora DSQL: connect latency and token cost, asyncpg-iam vs AWS's aurora-dsql-python-connector.

Both pools dial the same DSQL endpoint name (resolved to the emulator on loopback for this case)
and log in as ``admin`` through one emulator in DSQL mode, which verifies every DSQL token with
its own verifier. Each sample opens one new TLS connection through a pool of max_size 1 (the
connection is expired before release, so the next acquire opens a new one):

- ``floor`` a plain ``asyncpg.Pool`` with a static password, through an accept-any emulator;
- ``aws`` ``aurora_dsql_asyncpg.create_pool`` (AWS's connector: a boto3 session and a dsql
  client per connect, then ``generate_db_connect_admin_auth_token``, in the event loop);
- ``ours`` ``asyncpg_iam.create_pool`` for the DSQL endpoint, ``max_connect_rate=None`` (the
  DSQL default of 50 connects/s would pace this back-to-back loop; that is its job).

Token cost, microseconds per token (median of rounds): ``build_dsql_token``, the pool's
``TokenProvider.token``, one reused botocore dsql client, and the AWS connector's
``TokenManager.get_token`` (what its pool runs per connect).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg

import asyncpg_iam
from asyncpg_iam import build_dsql_token
from asyncpg_iam._auth import TokenProvider
from asyncpg_iam.testing import DEFAULT_DSQL_ENDPOINT, RDSIAMEmulator

from ._harness import CaseResult, Environment, interleave, percentile, ratio
from ._harness import summarize as _summarize
from ._shared import per_await, per_call, plot_cdfs, timed_pool_connect

NAME = "dsql"
TITLE = "9. Aurora DSQL: connect latency and token cost vs aurora-dsql-python-connector"
NEEDS_ENVIRONMENT = True

ENDPOINT = DEFAULT_DSQL_ENDPOINT
REGION = "us-east-1"
USER = "admin"
CONNECT_LABELS = {
    "floor": "floor) asyncpg.Pool, static password, accept-any emulator",
    "aws": "aws) aurora_dsql_asyncpg pool (AWS connector)",
    "ours": "ours) asyncpg_iam.Pool for the DSQL endpoint",
}
TOKEN_LABELS = {
    "ours": "asyncpg-iam build_dsql_token",
    "ours_provider": "asyncpg-iam TokenProvider.token (pool path)",
    "botocore": "botocore dsql client, reused",
    "aws": "AWS connector TokenManager.get_token (its per-connect path)",
}


@contextlib.contextmanager
def _resolve_to_loopback(loop: asyncio.AbstractEventLoop, name: str) -> Iterator[None]:
    """Within the block, `loop` resolves `name` to 127.0.0.1 (other names as usual)."""
    original = loop.getaddrinfo

    async def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(host, str) and host.lower() == name:
            host = "127.0.0.1"
            kwargs["family"] = socket.AF_INET
        return await original(host, port, *args, **kwargs)

    loop.getaddrinfo = getaddrinfo  # type: ignore[method-assign]
    try:
        yield
    finally:
        del loop.getaddrinfo  # back to the class's method


def _aws_connector() -> Any:
    try:
        import aurora_dsql_asyncpg
    except ImportError:
        return None
    return aurora_dsql_asyncpg


async def run(env: Environment, quick: bool) -> CaseResult:
    """Measure the connect variants and the token signers, interleaved."""
    result = CaseResult(NAME, TITLE)
    connector = _aws_connector()
    if connector is None:
        result.notes.append(
            "aurora-dsql-python-connector is not installed (pip install 'asyncpg-iam[bench]'): "
            "the AWS connector's rows are missing; botocore is the only comparison."
        )
    assert env.cluster is not None
    server = env.cluster.server
    common = {
        "backend_host": server.host,
        "backend_port": server.port,
        "backend_user": server.user,
        "endpoint": ENDPOINT,
    }
    emu = RDSIAMEmulator(**common)
    emu_any = RDSIAMEmulator(accept_any_password=True, **common)
    emu.register_key(env.credentials.access_key, env.credentials.secret_key)
    async with emu, emu_any:
        await emu.ensure_role(USER)
        loop = asyncio.get_running_loop()
        with _resolve_to_loopback(loop, ENDPOINT):
            await _connects(result, env, emu, emu_any, connector, quick)
    await _tokens(result, env, connector, quick)
    return result


async def _connects(
    result: CaseResult,
    env: Environment,
    emu: RDSIAMEmulator,
    emu_any: RDSIAMEmulator,
    connector: Any,
    quick: bool,
) -> None:
    rounds = 20 if quick else 200
    pools = await _connect_pools(emu, emu_any, connector)
    accepted_before, rejected_before = emu.logins_accepted, emu.logins_rejected
    try:
        variants = {
            name: functools.partial(timed_pool_connect, pool) for name, pool in pools.items()
        }
        for measure in variants.values():  # warm every path once, untimed
            await measure()
        samples = await interleave(variants, rounds)
    finally:
        for pool in pools.values():
            await pool.close()
    verified = emu.logins_accepted - accepted_before
    rejected = emu.logins_rejected - rejected_before
    summary = {name: _summarize([s * 1000 for s in values]) for name, values in samples.items()}
    result.figures["connect"] = {
        "unit": "ms",
        "rounds": rounds,
        "summary": summary,
        "samples_ms": {
            name: [round(s * 1000, 4) for s in values] for name, values in samples.items()
        },
        "verified_logins": verified,
        "rejected_logins": rejected,
    }
    _connect_rows(result, summary, verified, rejected, (len(samples) - 1) * (rounds + 1))


async def _connect_pools(
    emu: RDSIAMEmulator, emu_any: RDSIAMEmulator, connector: Any
) -> dict[str, Any]:
    """Return the floor, ours and (when installed) AWS's pools, each of max_size 1."""
    ssl_context = emu.client_ssl_context()
    floor_pool = await asyncpg.create_pool(
        host=ENDPOINT,
        port=emu_any.port,
        user=USER,
        database="postgres",
        password="static",
        ssl=emu_any.client_ssl_context(),
        min_size=0,
        max_size=1,
    )
    ours_pool = await asyncpg_iam.create_pool(
        host=ENDPOINT,
        port=emu.port,
        user=USER,
        ssl=ssl_context,
        min_size=0,
        max_size=1,
        max_connect_rate=None,
    )
    pools: dict[str, Any] = {"floor": floor_pool, "ours": ours_pool}
    if connector is not None:
        pools["aws"] = await connector.create_pool(
            host=ENDPOINT, port=emu.port, user=USER, ssl=ssl_context, min_size=0, max_size=1
        )
    return pools


def _connect_rows(
    result: CaseResult, summary: dict[str, Any], verified: int, rejected: int, expected: int
) -> None:
    for name, label in CONNECT_LABELS.items():
        if name in summary:
            s = summary[name]
            result.add(
                f"connect {label}",
                f"p50 {s['p50']:.2f} ms, p95 {s['p95']:.2f} ms (n={s['n']})",
            )
    if "aws" in summary:
        r = ratio(summary["ours"]["p50"], summary["aws"]["p50"])
        result.add("connect ours / aws (p50)", f"{r:.3f}", "< 1 (ours faster)", r < 1)
    floor = ratio(summary["ours"]["p50"], summary["floor"]["p50"])
    result.add("connect ours / floor (p50)", f"{floor:.3f}")
    result.add(
        "DSQL logins verified by the emulator / rejected",
        f"{verified} / {rejected}",
        "every one verified, 0 rejected",
        rejected == 0 and verified >= expected,
    )


async def _tokens(result: CaseResult, env: Environment, connector: Any, quick: bool) -> None:
    import botocore.session

    rounds = 5 if quick else 15
    fast_batch = 300 if quick else 3000
    slow_batch = 20 if quick else 200
    aws_batch = 3 if quick else 20
    credentials = env.credentials
    client = botocore.session.get_session().create_client("dsql", region_name=REGION)
    provider = TokenProvider(asyncpg_iam.IAMAuth())
    target = provider.target(ENDPOINT, 5432, USER)

    sign = functools.partial(
        build_dsql_token, host=ENDPOINT, region=REGION, credentials=credentials, admin=True
    )
    variants = {
        "ours": per_call(sign, fast_batch),
        "ours_provider": per_await(functools.partial(provider.token, target), fast_batch),
        "botocore": per_call(
            functools.partial(client.generate_db_connect_admin_auth_token, ENDPOINT, REGION),
            slow_batch,
        ),
    }
    if connector is not None:
        from dsql_core.token_manager import TokenManager

        params = {"host": ENDPOINT, "region": REGION, "user": USER, "token_duration_secs": 900}

        variants["aws"] = per_call(functools.partial(TokenManager.get_token, params), aws_batch)
    try:
        for measure in variants.values():
            await measure()
        samples = await interleave(variants, rounds)
        same = sign() == client.generate_db_connect_admin_auth_token(ENDPOINT, REGION)
    finally:
        await provider.aclose()
    micros = {name: [s * 1e6 for s in values] for name, values in samples.items()}
    median = {name: percentile(values, 50) for name, values in micros.items()}
    result.figures["token"] = {
        "unit": "us per token",
        "rounds": rounds,
        "median": median,
        "per_round": micros,
        "identical_token_to_botocore": same,
    }
    for name, label in TOKEN_LABELS.items():
        if name in median:
            result.add(f"token {label} (median of {rounds} rounds)", f"{median[name]:.1f} us")
    speedup = ratio(median["botocore"], median["ours"])
    result.add("token botocore / ours", f"{speedup:.1f}x", ">= 10x", speedup >= 10)
    if "aws" in median:
        aws = ratio(median["aws"], median["ours_provider"])
        result.add("token AWS connector / ours (pool path)", f"{aws:.0f}x", ">= 10x", aws >= 10)
    if not same:
        result.notes.append(
            "The DSQL token differed from botocore's for the same second (possible when a "
            "second boundary fell between the two calls)."
        )


def plot(result: CaseResult, out: Path) -> None:
    """Plot the connect latency CDFs of the DSQL variants."""
    connect = result.figures.get("connect")
    if connect:
        title = "Aurora DSQL connect latency through the emulator (empirical CDF)"
        path = out / "dsql_connect_latency.png"
        result.plots.append(
            plot_cdfs(connect["samples_ms"], CONNECT_LABELS, title=title, path=path)
        )
