"""Metrics overhead: acquire + ``SELECT 1`` + release with OpenTelemetry metrics on vs off.

Case 6's measurement (min_size = max_size = 10, 20 workers, interleaved rounds on fresh sets of
pools, both estimators and an A/A control) on four ``asyncpg_iam.Pool`` straight to
PostgreSQL, created anew for each block:

- ``on``: instrumented with `asyncpg_iam.otel.instrument_pool` on the OpenTelemetry SDK, every
  instrument on (each acquire's wait and use times go to the three histograms);
- ``on_counters_only``: instrumented with ``histograms=False`` (counters and gauges only, read
  at collection);
- ``off``: not instrumented;
- ``off_control``: a second uninstrumented pool, the A/A control (the same code against
  itself, interleaved the same way, so every run shows its own noise).

Both instrumented pools report through one ``MeterProvider`` of the block, and after every
round its reader collects, as an exporter does every interval. Both estimators are quoted for
on / off, counters-only / off and the A/A control, each with its 95 % interval: the median of
per-round ratios and the ratio of the medians (see case 6). The target holds both instrumented
pools to >= 0.98 by both estimators, and their ratios to the A/A control's spread.

The collection is not timed in the ratios (an exporter collects on its own thread, once an
interval), yet with the histograms on it is where their cost went: the pool only buffers each
wait and use time, and the collection records them into the SDK's histograms. A last row gives
its CPU per operation of the pool that ran, so the cost moved off the acquire path stays in view.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import AsyncIterator
from typing import Any

import asyncpg_iam

from ._harness import CaseResult, Environment, percentile
from .case_pool_overhead import (
    POOL_SIZE,
    ROUND_SECONDS,
    ROUNDS_PER_BLOCK,
    WORKERS,
    BlockSetup,
    Measure,
    PoolFactory,
    _throughput,
    add_control_row,
    add_target_row,
    estimators,
    run_blocks,
)

NAME = "metrics"
TITLE = "8. OpenTelemetry metrics overhead (acquire + SELECT 1 + release)"
NEEDS_ENVIRONMENT = True
BLOCKS = 8  # fresh sets of pools: a multiple of 4, each pool made at each place alike
# This process and PostgreSQL on their own CPUs (`Environment.pinned`).
PIN_CPUS = True
#: The instrumented pools, by the name their figures are kept under: (row label, histograms).
INSTRUMENTED = {
    "on": ("every instrument on", True),
    "on_counters_only": ("histograms=False", False),
}


def _block_setup(env: Environment) -> tuple[BlockSetup, dict[str, list[float]]]:
    """Return the set-up of one block (the four pools' makers and a measure that collects),
    and where the measure puts each round's collection CPU, in microseconds per operation of
    the pool that ran, by pool name."""
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    from asyncpg_iam.otel import instrument_pool

    make_off = functools.partial(
        asyncpg_iam.create_pool,
        **env.direct_kwargs(),
        iam=env.iam_auth(),
        min_size=POOL_SIZE,
        max_size=POOL_SIZE,
    )

    collect_us: dict[str, list[float]] = {}

    @contextlib.asynccontextmanager
    async def setup() -> AsyncIterator[tuple[dict[str, PoolFactory], Measure]]:
        reader = InMemoryMetricReader()
        provider = MeterProvider(metric_readers=[reader], shutdown_on_exit=False)
        names: dict[int, str] = {}

        def named(name: str, make: PoolFactory) -> PoolFactory:
            async def make_named() -> Any:
                pool = await make()
                names[id(pool)] = name
                return pool

            return make_named

        def instrumented(histograms: bool) -> PoolFactory:
            async def make() -> Any:
                pool = await make_off()
                instrument_pool(pool, provider, histograms=histograms)
                return pool

            return make

        async def measure(pool: Any, seconds: float) -> float:
            ops = await _throughput(pool, seconds)
            # What an exporter does every interval, untimed: the histograms' samples, buffered
            # by the pool, are recorded now. Its CPU is kept apart.
            started = time.process_time()
            reader.get_metrics_data()
            spent = time.process_time() - started
            collect_us.setdefault(names[id(pool)], []).append(spent * 1e6 / (ops * seconds))
            return ops

        factories = {"off": named("off", make_off), "off_control": named("off_control", make_off)}
        for name, (_label, histograms) in INSTRUMENTED.items():
            factories[name] = named(name, instrumented(histograms))
        try:
            yield factories, measure
        finally:
            provider.shutdown()

    return setup, collect_us


async def run(env: Environment, quick: bool) -> CaseResult:
    """Compare throughput with metrics on and off, case 6's way."""
    blocks, rounds = (1, 2) if quick else (BLOCKS, ROUNDS_PER_BLOCK)
    setup, collect_us = _block_setup(env)
    samples = await run_blocks(setup, blocks, rounds, ROUND_SECONDS)
    median = {name: percentile(values, 50) for name, values in samples.items()}
    figures: dict[str, Any] = {
        "blocks": blocks,
        "rounds": blocks * rounds,
        "round_seconds": ROUND_SECONDS,
        "pool_size": POOL_SIZE,
        "workers": WORKERS,
        "per_round_ops_per_second": samples,
        "median_ops_per_second": median,
        "control": estimators(samples["off_control"], samples["off"], blocks),
        "collect_cpu_us_per_op": collect_us,
        "median_collect_cpu_us_per_op": {
            name: percentile(values, 50) for name, values in collect_us.items()
        },
    }
    result = CaseResult(NAME, TITLE)
    result.figures = figures
    for name, (label, _histograms) in INSTRUMENTED.items():
        figures[name] = estimators(samples[name], samples["off"], blocks)
        add_target_row(
            result,
            f"metrics on ({label}) vs off, direct",
            f"{median[name]:.0f} vs {median['off']:.0f}",
            figures[name],
        )
    add_control_row(
        result,
        "A/A control, metrics off vs off, direct",
        f"{median['off_control']:.0f} vs {median['off']:.0f}",
        figures["control"],
        [figures[name]["ratio"] for name in INSTRUMENTED],
        "both real ratios within the control's interval over blocks",
    )
    collect = figures["median_collect_cpu_us_per_op"]
    result.add(
        "the reader's collection after a round (untimed in the ratios): CPU us per operation of "
        "the pool that ran, every instrument on / histograms=False / off (median)",
        f"{collect['on']:.1f} / {collect['on_counters_only']:.1f} / {collect['off']:.1f} us",
    )
    return result
