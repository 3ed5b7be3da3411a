"""Connect latency: static passwords, the ways people sign tokens by hand, peers, asyncpg-iam.

Every sample opens one new TLS connection through an emulator to the same PostgreSQL and is
timed from the start of the connect to a ready connection (the close is not timed):

- ``a`` static password, ``asyncpg.connect`` to the emulator in accept-any mode;
- ``f`` the fair floor: a valid token signed once up front, passed as a static password to
  ``asyncpg.connect`` through the verifying emulator (same verification as every IAM login);
- ``b`` a new boto3 RDS client per connect, then ``generate_db_auth_token`` (tutorial style);
- ``c`` one botocore RDS client, sync ``generate_db_auth_token`` in the password callable;
- ``d`` one aiobotocore RDS client, ``await generate_db_auth_token`` in the password callable;
- ``e`` asyncpg-iam's TokenProvider as the password callable of ``asyncpg.connect``;
- ``w`` the ``aws-advanced-python-wrapper`` IAM plugin on async psycopg (its ``aio`` module),
  dialling 127.0.0.1 and signing for the emulator's RDS name (``iam_host``); it caches a
  token for 15 minutes by default, so it signs once and presents that token again;
- ``a_pool`` a plain ``asyncpg.Pool`` with a static password, accept-any emulator;
- ``f_pool`` a plain ``asyncpg.Pool`` with the token signed once (the fair pool floor);
- ``d_pool`` a plain ``asyncpg.Pool`` whose password callable awaits aiobotocore's
  ``generate_db_auth_token`` (one session and client, created up front);
- ``e_pool`` an ``asyncpg_iam.Pool`` (its real connect path: rate limit check, target, token,
  diagnosis wrapper; its bookkeeping of the new connection, failover watch, lifetime and
  silent-host tracking, runs in the loop iteration after the handout).

Pools have max_size 1 and open a new connection per acquire. All but a and a_pool go through the
verifying emulator, which checks every token's signature against the static key all signers
find in the environment. Variants are interleaved. A per-phase breakdown of one connect (what
each step costs in microseconds, measured alone) explains what separates e_pool from f_pool.

The target, ``e_pool / f_pool`` at the p50, is measured on its own as well: 300 samples put the
ratio of two medians within about 1.5 % (one standard error) of its true value, as wide as the
margin that matters, so 4,000 more interleaved pairs of just these two follow, and the ratio
comes with a bootstrap 95 % interval (resampling rounds). 2,000 pairs gave an interval of about
+-1 %, as wide as the distance between the target (1.01) and the bound on its upper end (1.02).
"""

from __future__ import annotations

import asyncio
import contextlib
import cProfile
import datetime as dt
import functools
import pstats
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg

import asyncpg_iam
from asyncpg_iam import build_auth_token
from asyncpg_iam._auth import TokenProvider
from asyncpg_iam.testing._emu_verify import RegisteredKey, verify_token

from ._harness import (
    CaseResult,
    Environment,
    interleave,
    now,
    paired_ratio_interval,
    percentile,
    ratio,
)
from ._harness import summarize as _summarize
from ._shared import per_await, per_call, plot_cdfs, timed_connect, timed_pool_connect

NAME = "connect"
TITLE = "1. Connect latency (new TLS connection through the emulator)"
NEEDS_ENVIRONMENT = True
# This process and PostgreSQL on their own CPUs (`Environment.pinned`).
PIN_CPUS = True

LABELS = {
    "a": "a) static password, accept-any emulator",
    "f": "f) token signed once as a static password, verifying emulator (fair floor)",
    "b": "b) boto3 client created per connect",
    "c": "c) one botocore client, sync token",
    "d": "d) one aiobotocore client, async token",
    "e": "e) asyncpg-iam TokenProvider + asyncpg.connect",
    "w": "w) aws-advanced-python-wrapper IAM plugin, async psycopg (token cached 15 min)",
    "a_pool": "a_pool) asyncpg.Pool, static password, accept-any emulator",
    "f_pool": "f_pool) asyncpg.Pool, token signed once as a static password (fair pool floor)",
    "d_pool": "d_pool) asyncpg.Pool, password callable awaiting aiobotocore's token",
    "e_pool": "e_pool) asyncpg_iam.Pool, new connection per acquire",
}
# Variants that log in through the verifying emulator.
VERIFIED = ("f", "b", "c", "d", "e", "w", "f_pool", "d_pool", "e_pool")
PAIR_ROUNDS = 4000  # the target pair, measured on its own (see the module doc)
PAIR_ROUNDS_QUICK = 30


async def run(env: Environment, quick: bool) -> CaseResult:
    """Measure every variant `rounds` times, interleaved, then break one connect down."""
    rounds = 30 if quick else 300
    result = CaseResult(NAME, TITLE)
    assert env.emu_iam is not None
    async with contextlib.AsyncExitStack() as stack:
        variants, pools, provider = await _variants(env, stack, result)
        iam_pool, fair_pool = pools["e_pool"], pools["f_pool"]
        for measure in variants.values():  # warm every path once (clients, imports), untimed
            await measure()
        accepted_before = env.emu_iam.logins_accepted
        rejected_before = env.emu_iam.logins_rejected
        samples = await interleave(variants, rounds)
        verified = env.emu_iam.logins_accepted - accepted_before
        rejected = env.emu_iam.logins_rejected - rejected_before
        stats = iam_pool.stats()
        pair = {name: variants[name] for name in ("f_pool", "e_pool")}
        target = await interleave(pair, PAIR_ROUNDS_QUICK if quick else PAIR_ROUNDS)
        breakdown = await _breakdown(env, provider, iam_pool, quick)
        result.figures["calls_per_connect"] = await _call_profile(pair, 20 if quick else 100)
        result.figures["cpu_per_connect_us"] = await _cpu_per_connect(
            {"f_pool": fair_pool, "e_pool": iam_pool}, 30 if quick else 300
        )
    summary = {name: _summarize([s * 1000 for s in values]) for name, values in samples.items()}
    result.figures.update(
        unit="ms",
        rounds=rounds,
        summary=summary,
        samples_ms={n: [round(s * 1000, 4) for s in values] for n, values in samples.items()},
        verified_logins=verified,
        rejected_logins=rejected,
        pool_stats={"tokens_signed": stats.tokens_signed, "opened": stats.connections_opened},
    )
    _rows(result, summary, verified, rejected, rounds)
    _target_row(result, target)
    _breakdown_rows(result, breakdown, summary)
    return result


def _target_row(result: CaseResult, samples: dict[str, list[float]]) -> None:
    """The target: e_pool / f_pool at the p50 over the pairs measured on their own."""
    iam, fair = samples["e_pool"], samples["f_pool"]
    value = ratio(percentile(iam, 50), percentile(fair, 50))
    low, high = paired_ratio_interval(iam, fair)
    result.figures["target_pairs"] = {
        "rounds": len(iam),
        "p50_ms": {name: percentile(values, 50) * 1000 for name, values in samples.items()},
        "ratio": value,
        "ratio_interval_95": [low, high],
    }
    result.add(
        f"e_pool / f_pool (p50), {len(iam)} pairs of just these two: IAM pool vs fair floor",
        f"{value:.3f} (95 % interval {low:.3f}-{high:.3f})",
        "<= 1.01, interval's upper end <= 1.02",
        value <= 1.01 and high <= 1.02,
    )


async def _variants(
    env: Environment, stack: contextlib.AsyncExitStack, result: CaseResult
) -> tuple[dict[str, Callable[[], Awaitable[float]]], dict[str, Any], TokenProvider]:
    """Create every client and pool (closed by `stack`); return the sample functions, the
    pools by name and the provider of `e`."""
    host, port, user, region = env.signing_host, env.signing_port, env.user, env.region
    sdk = await _sdk_passwords(env, stack)
    provider = TokenProvider(env.iam_auth())
    stack.push_async_callback(provider.aclose)
    target = provider.target(env.iam_kwargs()["host"], env.iam_kwargs()["port"], user)
    # Valid for 900 s, far longer than a run; the emulator would refuse it after that.
    signed_once = build_auth_token(
        host=host, port=port, user=user, region=region, credentials=env.credentials
    )
    any_kwargs, iam_kwargs = env.any_kwargs(), env.iam_kwargs()
    one = {"min_size": 0, "max_size": 1}
    pools = {
        "a_pool": await asyncpg.create_pool(**any_kwargs, password="static-password", **one),
        "f_pool": await asyncpg.create_pool(**iam_kwargs, password=signed_once, **one),
        "d_pool": await asyncpg.create_pool(**iam_kwargs, password=sdk["d"], **one),
        "e_pool": await asyncpg_iam.create_pool(**iam_kwargs, iam=env.iam_auth(), **one),
    }
    for pool in pools.values():
        stack.push_async_callback(pool.close)
    connects = {
        "a": {**any_kwargs, "password": "static"},
        "f": {**iam_kwargs, "password": signed_once},
        **{name: {**iam_kwargs, "password": password} for name, password in sdk.items()},
        "e": {**iam_kwargs, "password": functools.partial(provider.token, target)},
    }
    variants: dict[str, Callable[[], Awaitable[float]]] = {
        name: functools.partial(timed_connect, kwargs) for name, kwargs in connects.items()
    }
    wrapper = await _wrapper_variant(env)
    if isinstance(wrapper, str):
        result.figures["wrapper_not_measurable"] = wrapper
    else:
        variants["w"] = wrapper
    for name, pool in pools.items():
        variants[name] = functools.partial(timed_pool_connect, pool)
    return variants, pools, provider


async def _sdk_passwords(
    env: Environment, stack: contextlib.AsyncExitStack
) -> dict[str, Callable[[], Any]]:
    """Return the password callables of b, c and d: tokens from boto3, botocore, aiobotocore."""
    import boto3
    import botocore.session
    from aiobotocore.session import AioSession

    host, port, user, region = env.signing_host, env.signing_port, env.user, env.region

    def boto3_per_connect() -> str:
        client = boto3.client("rds", region_name=region)
        return str(client.generate_db_auth_token(host, port, user))

    botocore_client = botocore.session.get_session().create_client("rds", region_name=region)

    def botocore_token() -> str:
        return str(botocore_client.generate_db_auth_token(host, port, user))

    aio_client = await stack.enter_async_context(
        AioSession().create_client("rds", region_name=region)
    )

    async def aiobotocore_token() -> str:
        return str(await aio_client.generate_db_auth_token(host, port, user))

    return {"b": boto3_per_connect, "c": botocore_token, "d": aiobotocore_token}


async def _wrapper_variant(env: Environment) -> Callable[[], Awaitable[float]] | str:
    """Return the aws-advanced-python-wrapper sample function, or why it cannot run here."""
    try:
        from aws_advanced_python_wrapper.aio.psycopg import connect
    except ImportError as exc:
        return f"not installed ({exc}; pip install 'asyncpg-iam[bench]')"
    assert env.emu_iam is not None
    emu = env.emu_iam
    conninfo = (
        f"host=127.0.0.1 port={emu.port} user={env.user} dbname={env.database} "
        f"sslmode=verify-full sslrootcert={emu.ca_path}"
    )
    # iam_host: sign for the RDS name (the plugin refuses to sign for an IP address) while
    # psycopg dials the loopback address; wrapper_dialect skips its dialect probing.
    options = {
        "plugins": "iam",
        "iam_host": env.signing_host,
        "iam_region": env.region,
        "iam_default_port": str(env.signing_port),
        "wrapper_dialect": "pg",
    }

    async def measure() -> float:
        start = now()
        con = await connect(conninfo, **options)
        elapsed = now() - start
        await con.close()
        return elapsed

    try:
        await measure()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return measure


def _rows(
    result: CaseResult, summary: dict[str, Any], verified: int, rejected: int, rounds: int
) -> None:
    for name, label in LABELS.items():
        if name not in summary:
            reason = result.figures.get("wrapper_not_measurable", "not run")
            result.add(label, f"not measurable here: {reason}")
            continue
        s = summary[name]
        result.add(
            label,
            f"p50 {s['p50']:.2f} ms, p95 {s['p95']:.2f} ms, p99 {s['p99']:.2f} ms (n={s['n']})",
        )
    p50 = {name: summary[name]["p50"] for name in summary}
    result.add(
        f"e_pool / f_pool (p50), the {rounds} rounds above",
        f"{ratio(p50['e_pool'], p50['f_pool']):.3f}",
    )
    result.add("e / f (p50)", f"{ratio(p50['e'], p50['f']):.3f}")
    result.add("e / a (p50), floor without verification", f"{ratio(p50['e'], p50['a']):.3f}")
    result.add("e_pool / a_pool (p50)", f"{ratio(p50['e_pool'], p50['a_pool']):.3f}")
    for other in ("b", "c", "d"):
        r = ratio(p50["e"], p50[other])
        target = "< 1 (e faster)" if other in ("c", "d") else ""
        result.add(f"e / {other} (p50)", f"{r:.3f}", target, r < 1 if target else None)
    r = ratio(p50["e_pool"], p50["d_pool"])
    result.add("e_pool / d_pool (p50)", f"{r:.3f}", "< 1 (e_pool faster)", r < 1)
    if "w" in p50:
        result.add("e_pool / w (p50)", f"{ratio(p50['e_pool'], p50['w']):.3f}")
    expected = sum(1 for name in VERIFIED if name in summary) * rounds
    result.add(
        "logins verified by the emulator (all but a, a_pool) / rejected",
        f"{verified} / {rejected}",
        "every one verified, 0 rejected",
        rejected == 0 and verified >= expected,
    )
    result.notes.append(
        "f and f_pool present one valid token, signed before the run, as a static password "
        "through the verifying emulator: the emulator checks its signature exactly as for every "
        "IAM login, so e_pool / f_pool is what the pool's IAM path costs, and e / a also counts "
        "the emulator's own check. w (aws-advanced-python-wrapper) is async psycopg, not "
        "asyncpg, and by default presents a token cached for 15 minutes."
    )


async def _breakdown(
    env: Environment, provider: TokenProvider, iam_pool: Any, quick: bool
) -> dict[str, float]:
    """Time each step of one IAM connect alone; return microseconds (median of rounds)."""
    batch, rounds = (200, 5) if quick else (2000, 11)
    target = provider.target(env.iam_kwargs()["host"], env.iam_kwargs()["port"], env.user)
    token = await provider.token(target)
    keys = {env.credentials.access_key: RegisteredKey(**_key(env))}
    emu = env.emu_iam
    assert emu is not None

    def verify() -> object:
        return verify_token(
            token,
            user=env.user,
            endpoint=emu.endpoint,
            port=emu.endpoint_port,
            region=emu.region,
            keys=keys,
            now=dt.datetime.now(dt.timezone.utc),
        )

    def sign() -> str:
        return build_auth_token(
            host=target.signing_host,
            port=target.signing_port,
            user=target.user,
            region=target.region,
            credentials=env.credentials,
        )

    steps = {
        "credential cache read": per_await(provider.credentials.get, batch),
        "signing one token (build_auth_token)": per_call(sign, batch),
        # Within one second the provider hands out the token it signed in that second.
        "TokenProvider.token, cache read and the token of this second": per_await(
            functools.partial(provider.token, target), batch
        ),
        "connect arguments from the plan (TLS context included)": per_call(
            iam_pool._connector.plan.asyncpg_kwargs, batch
        ),
        "emulator's token verification (in f and f_pool too)": per_call(verify, batch),
    }
    samples = await interleave(steps, rounds)
    return {name: percentile(values, 50) * 1e6 for name, values in samples.items()}


async def _cpu_per_connect(pools: dict[str, Any], rounds: int) -> dict[str, dict[str, float]]:
    """Thread CPU time of one pool connect (acquire of a new connection), interleaved.

    Two spans: ``handout``, the acquire alone (what the caller waits for), and ``whole``, the
    acquire and the event loop's next iteration, where asyncpg_iam.Pool watches and tracks the
    new connection (see `Pool._connection_opened`): all the CPU a connect costs the client.
    Returns, for each span, the median of each pool and the median of the paired differences
    (second minus first), in microseconds.
    """
    samples: dict[str, dict[str, list[float]]] = {
        span: {name: [] for name in pools} for span in ("handout", "whole")
    }
    for _ in range(rounds):
        for name, pool in pools.items():
            started = time.thread_time()
            proxy = await pool.acquire()
            handed_out = time.thread_time()
            await asyncio.sleep(0)
            samples["whole"][name].append(time.thread_time() - started)
            samples["handout"][name].append(handed_out - started)
            await pool.expire_connections()
            await pool.release(proxy)
    figures: dict[str, dict[str, float]] = {}
    for span, by_pool in samples.items():
        first, second = by_pool.values()
        figures[span] = {name: percentile(values, 50) * 1e6 for name, values in by_pool.items()}
        gaps = [b - a for a, b in zip(first, second, strict=True)]
        figures[span]["gap"] = percentile(gaps, 50) * 1e6
    return figures


async def _call_profile(
    variants: dict[str, Callable[[], Awaitable[float]]], connects: int
) -> dict[str, Any]:
    """Count the function calls per connect of each variant under cProfile, by module.

    Call counts, unlike timings, barely move with machine load: the difference says what
    work one path does that the other does not.
    """
    counts: dict[str, Counter[str]] = {}
    for name, measure in variants.items():
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(connects):
            await measure()
        profiler.disable()
        by_module: Counter[str] = Counter()
        for (filename, _line, _function), row in pstats.Stats(profiler).stats.items():  # type: ignore[attr-defined]
            by_module[_module_of(filename)] += row[1]
        counts[name] = by_module
    first, second = counts.values()
    extra = {
        module: (second[module] - first[module]) / connects
        for module in set(first) | set(second)
        if abs(second[module] - first[module]) >= connects
    }
    return {
        "connects": connects,
        "total": {name: sum(c.values()) / connects for name, c in counts.items()},
        "extra_by_module": dict(sorted(extra.items(), key=lambda item: -item[1])),
    }


def _module_of(filename: str) -> str:
    if "asyncpg_iam" in filename:
        return "asyncpg_iam/" + filename.rsplit("asyncpg_iam/", 1)[-1]
    if "site-packages/" in filename:
        return filename.rsplit("site-packages/", 1)[-1].split("/", 1)[0]
    if filename == "~":
        return "builtins"
    return "stdlib " + Path(filename).stem


def _key(env: Environment) -> dict[str, str]:
    return {"access_key": env.credentials.access_key, "secret_key": env.credentials.secret_key}


def _breakdown_rows(
    result: CaseResult, breakdown: dict[str, float], summary: dict[str, Any]
) -> None:
    gap = (summary["e_pool"]["p50"] - summary["f_pool"]["p50"]) * 1000
    result.figures["breakdown_us"] = {**breakdown, "e_pool - f_pool p50": gap}
    parts = ", ".join(f"{name} {us:.1f} us" for name, us in breakdown.items())
    calls = result.figures["calls_per_connect"]
    total = calls["total"]
    top = ", ".join(
        f"{module} {count:+.0f}" for module, count in list(calls["extra_by_module"].items())[:6]
    )
    result.add(
        "function calls per connect (cProfile), f_pool / e_pool; where e_pool's extra are",
        f"{total['f_pool']:.0f} / {total['e_pool']:.0f}; {top}",
    )
    result.add("one IAM connect, step by step (median, each step alone)", parts)
    signing = breakdown["signing one token (build_auth_token)"]
    result.add(
        "e_pool - f_pool (p50) / of it, signing a token",
        f"{gap:.0f} us / {signing:.1f} us",
    )
    cpu = result.figures["cpu_per_connect_us"]
    for span, label in (
        ("handout", "until the connection is handed out"),
        ("whole", "with the loop iteration after it (the pool's bookkeeping)"),
    ):
        figures = cpu[span]
        result.add(
            f"client CPU per connect (thread time, median), {label}: "
            "f_pool / e_pool / median paired gap",
            f"{figures['f_pool']:.0f} us / {figures['e_pool']:.0f} us / {figures['gap']:+.0f} us",
        )
    result.notes.append(
        "What separates e_pool from f_pool per connect is the token (credential cache read and, "
        "once a second, signing) and the pool's connect path (arguments from the plan, the "
        "diagnosis wrapper); the emulator verifies a token in both, so its check is not part of "
        "that gap. The pool's bookkeeping of a new connection (failover watch, lifetime, the "
        "silent-host check's socket options) runs in the event loop's iteration after the "
        "handout, while the caller's first query is in flight: the connect rows do not wait for "
        "it, the second client CPU row counts it. The steps above are timed alone, warm, over "
        "batches. Inside a connect the same code runs cold (the TLS handshakes, the emulator "
        "and PostgreSQL's login run between two connects' worth of it) and costs several times "
        "more: the client CPU rows measure that directly, as thread time, which includes the "
        "in-process emulator's work for each connect (the same for both). The p50 gap is a "
        "difference of two noisy figures of several milliseconds."
    )


def plot(result: CaseResult, out: Path) -> None:
    """Plot the latency distributions (empirical CDFs) of every variant."""
    samples = result.figures.get("samples_ms")
    if samples:
        title = "Connect latency distribution (empirical CDF)"
        result.plots.append(
            plot_cdfs(samples, LABELS, title=title, path=out / "connect_latency.png")
        )
