"""Recycling under load: max_lifetime 5 s against the same pool without recycling.

An ``asyncpg_iam.Pool`` (min_size = max_size = 20) through the verifying emulator, 64 workers
each looping acquire, ``SELECT 1``, release. The recycling variant has ``max_lifetime=5`` (and
the default jitter of 10 %), the other ``max_lifetime=None``. Segments alternate A B A B (30 s
each, 60 s per variant in all). Acquire latency is measured from the call to ``acquire()`` to
the connection in hand, so it includes waiting for one of the 20 connections. Reconnects are
the connections opened after the pool's initial fill, timed by a wrapping ``connect=``.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path
from typing import Any

import asyncpg

import asyncpg_iam

from ._harness import CaseResult, Environment, new_figure, percentile, ratio, save_figure

NAME = "recycling"
TITLE = "5. Recycling under load (max_size 20, 64 workers, max_lifetime 5 s)"
NEEDS_ENVIRONMENT = True
WORKERS = 64
POOL_SIZE = 20
MAX_LIFETIME = 5.0
JITTER = 0.1


async def _segment(env: Environment, *, recycle: bool, duration: float) -> dict[str, Any]:
    opened: list[float] = []

    async def connect(*args: Any, **kwargs: Any) -> Any:
        con = await asyncpg.connect(*args, **kwargs)
        opened.append(time.perf_counter())
        return con

    pool = await asyncpg_iam.create_pool(
        **env.iam_kwargs(),
        iam=env.iam_auth(),
        min_size=POOL_SIZE,
        max_size=POOL_SIZE,
        max_lifetime=MAX_LIFETIME if recycle else None,
        max_lifetime_jitter=JITTER,
        connect=connect,
    )
    initial = len(opened)
    latencies: list[float] = []
    per_second: Counter[int] = Counter()
    errors: Counter[str] = Counter()
    start = time.perf_counter()
    stop = start + duration

    async def worker() -> None:
        while True:
            began = time.perf_counter()
            if began >= stop:
                return
            try:
                async with pool.acquire(timeout=30) as con:
                    latencies.append(time.perf_counter() - began)
                    await con.fetchval("SELECT 1")
            except Exception as exc:
                errors[type(exc).__name__] += 1
            else:
                per_second[int(time.perf_counter() - start)] += 1

    try:
        await asyncio.gather(*(worker() for _ in range(WORKERS)))
        elapsed = time.perf_counter() - start
        stats = pool.stats()
    finally:
        await pool.close()
    reconnects = [t - start for t in opened[initial:] if t - start <= elapsed]
    reconnects_per_second = Counter(int(t) for t in reconnects)
    seconds = int(elapsed) + 1
    # Whole seconds after every initial connection has lived its first lifetime.
    after_first = [reconnects_per_second.get(i, 0) for i in range(int(MAX_LIFETIME) + 1, seconds)]
    return {
        "recycle": recycle,
        "seconds": elapsed,
        "queries": sum(per_second.values()),
        "failed": sum(errors.values()),
        "errors": dict(errors),
        "latencies": latencies,
        "queries_per_second": [per_second.get(i, 0) for i in range(seconds)],
        "reconnects_per_second": [reconnects_per_second.get(i, 0) for i in range(seconds)],
        "reconnects": len(reconnects),
        "max_reconnects_in_one_second_after_first_lifetime": max(after_first, default=0),
        "closed": dict(stats.connections_closed),
        "auth_failures": stats.auth_failures,
    }


async def run(env: Environment, quick: bool) -> CaseResult:
    """Run A B A B segments and compare."""
    duration = 7.0 if quick else 30.0
    result = CaseResult(NAME, TITLE)
    segments: list[dict[str, Any]] = []
    for recycle in (True, False, True, False):
        segments.append(await _segment(env, recycle=recycle, duration=duration))
    figures: dict[str, Any] = {"segment_seconds": duration, "segments": []}
    totals: dict[str, dict[str, Any]] = {}
    for name, flag in (("recycling", True), ("no_recycling", False)):
        mine = [s for s in segments if s["recycle"] is flag]
        latencies = [x for s in mine for x in s["latencies"]]
        seconds = sum(s["seconds"] for s in mine)
        per_second = [n for s in mine for n in s["reconnects_per_second"]]
        totals[name] = {
            "queries_per_second": sum(s["queries"] for s in mine) / seconds,
            "acquire_p50_ms": percentile(latencies, 50) * 1000,
            "acquire_p99_ms": percentile(latencies, 99) * 1000,
            "acquire_max_ms": max(latencies, default=0.0) * 1000,
            "failed": sum(s["failed"] for s in mine),
            "reconnects": sum(s["reconnects"] for s in mine),
            "max_reconnects_in_one_second": max(per_second, default=0),
            "max_reconnects_in_one_second_after_first_lifetime": max(
                (s["max_reconnects_in_one_second_after_first_lifetime"] for s in mine), default=0
            ),
            "seconds": seconds,
        }
    for s in segments:
        figures["segments"].append({k: v for k, v in s.items() if k != "latencies"})
    figures["totals"] = totals
    result.figures = figures
    on, off = totals["recycling"], totals["no_recycling"]
    result.add(
        "queries/s with recycling vs without",
        f"{on['queries_per_second']:.0f} vs {off['queries_per_second']:.0f} "
        f"({ratio(on['queries_per_second'], off['queries_per_second']):.3f}x)",
    )
    result.add(
        "acquire latency p50 with vs without",
        f"{on['acquire_p50_ms']:.2f} ms vs {off['acquire_p50_ms']:.2f} ms",
    )
    p99 = ratio(on["acquire_p99_ms"], off["acquire_p99_ms"])
    result.add(
        "acquire latency p99 with vs without",
        f"{on['acquire_p99_ms']:.2f} ms vs {off['acquire_p99_ms']:.2f} ms ({p99:.3f}x)",
        "<= 1.2x",
        p99 <= 1.2,
    )
    failed = on["failed"] + off["failed"]
    result.add("failed queries (both variants)", str(failed), "0", failed == 0)
    steady_mean = POOL_SIZE / (MAX_LIFETIME * (1 - JITTER / 2))
    busiest = on["max_reconnects_in_one_second_after_first_lifetime"]
    result.add(
        "reconnects with recycling: total / most in any one second / most in one second "
        "after the first lifetime",
        f"{on['reconnects']} / {on['max_reconnects_in_one_second']} / {busiest}",
        f"after the first lifetime <= 2x the steady mean ({2 * steady_mean:.1f})",
        busiest <= 2 * steady_mean,
    )
    result.notes.append(
        f"Segments of {duration:g} s alternate recycling / no recycling (A B A B); each "
        "starts a new pool, whose initial 20 connects are not counted as reconnects. The 20 "
        "connections opened together at start get first lifetimes spread over [1.25, 5] s "
        "(75 % of max_lifetime); their replacements live [4.5, 5] s (10 % jitter), so the "
        f"steady mean is {POOL_SIZE} / 4.75 s = {steady_mean:.1f} reconnects a second."
    )
    return result


def plot(result: CaseResult, out: Path) -> None:
    """Plot reconnects per second and queries per second over time, per segment."""
    segments = result.figures.get("segments")
    if not segments:
        return
    figure, (top, bottom) = new_figure(9, 6, rows=2)
    for index, segment in enumerate(segments):
        kind = "max_lifetime 5 s" if segment["recycle"] else "no recycling"
        label = f"segment {index + 1} ({kind})"
        style = "-" if segment["recycle"] else ":"
        if segment["recycle"]:
            series = segment["reconnects_per_second"]
            top.step(range(len(series)), series, where="post", label=label)
        qps = segment["queries_per_second"][:-1]  # the last second is partial
        bottom.plot(range(len(qps)), qps, style, label=label)
    top.axhline(POOL_SIZE, color="grey", linewidth=0.8, linestyle="--", label="pool size")
    top.set_ylabel("reconnects in that second")
    top.set_title("Recycling under load: reconnects and throughput over time")
    top.legend(fontsize=7)
    top.grid(True, alpha=0.3)
    bottom.set_ylabel("queries in that second")
    bottom.set_xlabel("seconds since the segment started")
    bottom.legend(fontsize=7)
    bottom.grid(True, alpha=0.3)
    bottom.set_ylim(bottom=0)
    result.plots.append(save_figure(figure, out / "recycling.png"))
