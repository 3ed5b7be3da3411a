"""Connect latency: a static password, the ways people sign tokens by hand, and asyncpg-iam.

Every sample opens one new TLS connection through an emulator to the same PostgreSQL and is
timed from the start of the connect to a ready connection (the close is not timed):

- ``a`` static password, ``asyncpg.connect`` to the emulator in accept-any mode (the floor);
- ``b`` a new boto3 RDS client per connect, then ``generate_db_auth_token`` (tutorial style);
- ``c`` one botocore RDS client, sync ``generate_db_auth_token`` in the password callable;
- ``d`` one aiobotocore RDS client, ``await generate_db_auth_token`` in the password callable;
- ``e`` asyncpg-iam's TokenProvider as the password callable of ``asyncpg.connect``;
- ``a_pool`` a plain ``asyncpg.Pool`` with the static password, a new connection per acquire;
- ``e_pool`` an ``asyncpg_iam.Pool``, a new connection per acquire (its real connect path:
  rate limit check, target, token, diagnosis wrapper, lifetime tracking).

b to e and e_pool connect to the verifying emulator, which checks every token's signature
against the static key all signers find in the environment. Variants are interleaved.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import asyncpg

import asyncpg_iam
from asyncpg_iam._auth import TokenProvider

from ._harness import CaseResult, Environment, interleave, new_figure, now, ratio, save_figure
from ._harness import summarize as _summarize

NAME = "connect"
TITLE = "1. Connect latency (new TLS connection through the emulator)"
NEEDS_ENVIRONMENT = True

LABELS = {
    "a": "a) static password, accept-any emulator (floor)",
    "b": "b) boto3 client created per connect",
    "c": "c) one botocore client, sync token",
    "d": "d) one aiobotocore client, async token",
    "e": "e) asyncpg-iam TokenProvider + asyncpg.connect",
    "a_pool": "a_pool) asyncpg.Pool, static password, new connection per acquire",
    "e_pool": "e_pool) asyncpg_iam.Pool, new connection per acquire",
}


async def _timed_connect(kwargs: dict[str, Any]) -> float:
    start = now()
    con = await asyncpg.connect(**kwargs)
    elapsed = now() - start
    await con.close()
    return elapsed


async def _timed_pool_connect(pool: Any) -> float:
    # max_size=1 and min_size=0: expiring the connection before release makes asyncpg close it,
    # so the next acquire opens a new one.
    start = now()
    proxy = await pool.acquire()
    elapsed = now() - start
    await pool.expire_connections()
    await pool.release(proxy)
    return elapsed


async def run(env: Environment, quick: bool) -> CaseResult:
    """Measure every variant `rounds` times, interleaved."""
    import boto3
    import botocore.session
    from aiobotocore.session import AioSession

    rounds = 30 if quick else 300
    result = CaseResult(NAME, TITLE)
    host, port, user, region = env.signing_host, env.signing_port, env.user, env.region

    def boto3_per_connect() -> str:
        client = boto3.client("rds", region_name=region)
        return str(client.generate_db_auth_token(host, port, user))

    botocore_client = botocore.session.get_session().create_client("rds", region_name=region)

    def botocore_token() -> str:
        return str(botocore_client.generate_db_auth_token(host, port, user))

    aio_context = AioSession().create_client("rds", region_name=region)
    aio_client = await aio_context.__aenter__()

    async def aiobotocore_token() -> str:
        return str(await aio_client.generate_db_auth_token(host, port, user))

    provider = TokenProvider(env.iam_auth())
    target = provider.target(env.iam_kwargs()["host"], env.iam_kwargs()["port"], user)
    ours = functools.partial(provider.token, target)

    plain_pool = await asyncpg.create_pool(
        **env.any_kwargs(), password="static-password", min_size=0, max_size=1
    )
    iam_pool = await asyncpg_iam.create_pool(
        **env.iam_kwargs(), iam=env.iam_auth(), min_size=0, max_size=1
    )
    assert env.emu_iam is not None
    rejected_before = env.emu_iam.logins_rejected
    accepted_before = env.emu_iam.logins_accepted
    try:
        variants = {
            "a": functools.partial(_timed_connect, {**env.any_kwargs(), "password": "static"}),
            "b": functools.partial(
                _timed_connect, {**env.iam_kwargs(), "password": boto3_per_connect}
            ),
            "c": functools.partial(
                _timed_connect, {**env.iam_kwargs(), "password": botocore_token}
            ),
            "d": functools.partial(
                _timed_connect, {**env.iam_kwargs(), "password": aiobotocore_token}
            ),
            "e": functools.partial(_timed_connect, {**env.iam_kwargs(), "password": ours}),
            "a_pool": functools.partial(_timed_pool_connect, plain_pool),
            "e_pool": functools.partial(_timed_pool_connect, iam_pool),
        }
        # Warm every path once (client creation, imports, first TLS handshake), untimed.
        for measure in variants.values():
            await measure()
        samples = await interleave(variants, rounds)
        stats = iam_pool.stats()
    finally:
        await plain_pool.close()
        await iam_pool.close()
        await aio_context.__aexit__(None, None, None)
        await provider.aclose()
    verified = env.emu_iam.logins_accepted - accepted_before
    rejected = env.emu_iam.logins_rejected - rejected_before

    summary = {name: _summarize([s * 1000 for s in values]) for name, values in samples.items()}
    result.figures = {
        "unit": "ms",
        "rounds": rounds,
        "summary": summary,
        "samples_ms": {
            name: [round(s * 1000, 4) for s in values] for name, values in samples.items()
        },
        "verified_logins": verified,
        "rejected_logins": rejected,
        "pool_stats": {"tokens_signed": stats.tokens_signed, "opened": stats.connections_opened},
    }
    for name, label in LABELS.items():
        s = summary[name]
        result.add(
            label,
            f"p50 {s['p50']:.2f} ms, p95 {s['p95']:.2f} ms, p99 {s['p99']:.2f} ms (n={s['n']})",
        )
    p50 = {name: summary[name]["p50"] for name in summary}
    e_a = ratio(p50["e"], p50["a"])
    pool_ratio = ratio(p50["e_pool"], p50["a_pool"])
    result.add("e / a (p50)", f"{e_a:.3f}", "<= 1.03", e_a <= 1.03)
    result.add("e_pool / a_pool (p50)", f"{pool_ratio:.3f}", "<= 1.03", pool_ratio <= 1.03)
    for other in ("b", "c", "d"):
        r = ratio(p50["e"], p50[other])
        target = "< 1 (e faster)" if other in ("c", "d") else ""
        result.add(f"e / {other} (p50)", f"{r:.3f}", target, r < 1 if target else None)
    result.add(
        "logins verified by the emulator (b-e, e_pool) / rejected",
        f"{verified} / {rejected}",
        "every one verified, 0 rejected",
        rejected == 0 and verified >= 5 * (rounds + 1),
    )
    result.notes.append(
        "b-e and e_pool sign with the static key the verifying emulator has registered, so every "
        "one of those connects had its SigV4 signature checked; a and a_pool go through the "
        "same emulator code in accept-any mode. The difference between e and a therefore "
        "includes the emulator's own token verification (five HMACs and a SHA-256), which a "
        "real RDS does on its side too."
    )
    return result


def plot(result: CaseResult, out: Path) -> None:
    """Plot the latency distributions (empirical CDFs) of every variant."""
    samples = result.figures.get("samples_ms")
    if not samples:
        return
    figure, axes = new_figure(9, 5)
    for name, values in samples.items():
        ordered = sorted(values)
        count = len(ordered)
        axes.plot(ordered, [(i + 1) / count for i in range(count)], label=LABELS[name])
    axes.set_xscale("log")
    axes.set_xlabel("connect latency (ms, log scale)")
    axes.set_ylabel("fraction of connects")
    axes.set_title("Connect latency distribution (empirical CDF)")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=7, loc="lower right")
    result.plots.append(save_figure(figure, out / "connect_latency.png"))
