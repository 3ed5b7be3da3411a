"""Metrics overhead: acquire + ``SELECT 1`` + release with OpenTelemetry metrics on vs off.

Three ``asyncpg_iam.Pool`` straight to PostgreSQL (min_size = max_size = 10, 20 workers): one
instrumented with `asyncpg_iam.otel.instrument_pool` on the OpenTelemetry SDK (every acquire
records wait and use times into SDK histograms), one instrumented with ``histograms=False``
(counters and gauges only, read at collection), one not instrumented. A reader collects every
round, as an exporter would. Rounds shuffle the order; the quoted ratios are the medians of
per-round ratios against the uninstrumented pool.
"""

from __future__ import annotations

import functools
from typing import Any

import asyncpg_iam

from ._harness import CaseResult, Environment, interleave, percentile, ratio
from .case_pool_overhead import POOL_SIZE, WORKERS, _throughput

NAME = "metrics"
TITLE = "8. OpenTelemetry metrics overhead (acquire + SELECT 1 + release)"
NEEDS_ENVIRONMENT = True


async def run(env: Environment, quick: bool) -> CaseResult:
    """Compare throughput with metrics on and off."""
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    from asyncpg_iam.otel import instrument_pool

    rounds = 2 if quick else 16
    seconds = 0.5 if quick else 0.75
    sizes = {"min_size": POOL_SIZE, "max_size": POOL_SIZE}
    pools = {
        name: await asyncpg_iam.create_pool(**env.direct_kwargs(), iam=env.iam_auth(), **sizes)
        for name in ("off", "on", "on_counters_only")
    }
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    instrument_pool(pools["on"], provider)
    instrument_pool(pools["on_counters_only"], provider, histograms=False)

    async def measure(pool: Any) -> float:
        ops = await _throughput(pool, seconds)
        reader.get_metrics_data()  # what an exporter does every interval
        return ops

    try:
        for pool in pools.values():
            await _throughput(pool, seconds / 4)  # warm, untimed
        samples = await interleave(
            {name: functools.partial(measure, pool) for name, pool in pools.items()}, rounds
        )
    finally:
        for pool in pools.values():
            await pool.close()
    median = {name: percentile(values, 50) for name, values in samples.items()}
    figures: dict[str, Any] = {
        "rounds": rounds,
        "round_seconds": seconds,
        "pool_size": POOL_SIZE,
        "workers": WORKERS,
        "per_round_ops_per_second": samples,
        "median_ops_per_second": median,
    }
    result = CaseResult(NAME, TITLE)
    result.figures = figures
    for name, label in (("on", "all instruments"), ("on_counters_only", "histograms=False")):
        paired = [ratio(a, b) for a, b in zip(samples[name], samples["off"], strict=True)]
        figures[f"{name}_per_round_ratio"] = paired
        figures[f"{name}_ratio"] = percentile(paired, 50)
        result.add(
            f"metrics on ({label}) vs off, direct (median ops/s)",
            f"{median[name]:.0f} vs {median['off']:.0f} (median of per-round ratios "
            f"{figures[f'{name}_ratio']:.3f}x)",
            ">= 0.98x",
            figures[f"{name}_ratio"] >= 0.98,
        )
    return result
