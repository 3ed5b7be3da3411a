"""Metrics overhead: acquire + ``SELECT 1`` + release with OpenTelemetry metrics on vs off.

Two `asyncpg_iam.Pool`s straight to PostgreSQL over TLS (the path where the pool's own work
is the largest share of each query), min_size = max_size = 10, 20 workers. One is
instrumented with `asyncpg_iam.otel.instrument_pool` on an SDK MeterProvider (an in-memory
reader, collected once after each run so the observable callbacks run too); the other is not
instrumented. Rounds run both in a fresh random order; the figure against the target is the
median of per-round ratios. The instrumented pool buffers its histogram samples and records
them when the SDK collects, so a second row charges that collection to the run as well
(throughput = operations / (run time + collection time)). On a shared, loaded machine the
wall-clock ratios swing by +-30% from round to round; the client's CPU time per operation
(this process only: PostgreSQL runs in its own) is reported too, as the steadier figure.
"""

from __future__ import annotations

import time
from typing import Any

from ._harness import CaseResult, Environment, interleave, percentile, ratio
from .case_pool_overhead import POOL_SIZE, WORKERS, _throughput

# CPU microseconds per operation of the last measured run, by variant.
_cpu: dict[str, list[float]] = {}


async def _measure(name: str, pool: Any, seconds: float) -> float:
    cpu = time.process_time()
    wall = time.perf_counter()
    ops = await _throughput(pool, seconds)
    count = ops * (time.perf_counter() - wall)
    _cpu.setdefault(name, []).append((time.process_time() - cpu) / max(count, 1) * 1e6)
    return ops


NAME = "otel_overhead"
TITLE = "7. Metrics overhead (acquire + SELECT 1 + release, metrics on vs off)"
NEEDS_ENVIRONMENT = True


async def run(env: Environment, quick: bool) -> CaseResult:
    """Compare throughput of an instrumented and an uninstrumented pool."""
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    import asyncpg_iam.otel

    rounds = 2 if quick else 16
    seconds = 0.5 if quick else 0.75
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    sizes = {"min_size": POOL_SIZE, "max_size": POOL_SIZE}
    kwargs: dict[str, Any] = {**env.direct_kwargs(), "iam": env.iam_auth(), **sizes}
    off = await asyncpg_iam.create_pool(**kwargs, name="metrics-off")
    on = await asyncpg_iam.create_pool(**kwargs, name="metrics-on")
    instrumentation = asyncpg_iam.otel.instrument_pool(on, provider)

    with_collection: list[float] = []

    async def instrumented() -> float:
        ops = await _measure("on", on, seconds)
        started = time.perf_counter()
        reader.get_metrics_data()  # an export cycle, as a periodic reader would do
        collect = time.perf_counter() - started
        with_collection.append(ops * seconds / (seconds + collect))
        return ops

    try:
        await _throughput(off, seconds / 4)  # warm, untimed
        await instrumented()
        with_collection.clear()
        _cpu.clear()
        samples = await interleave(
            {"off": lambda: _measure("off", off, seconds), "on": instrumented}, rounds
        )
    finally:
        instrumentation.uninstrument()
        await off.close()
        await on.close()
        provider.shutdown()
    median = {name: percentile(values, 50) for name, values in samples.items()}
    paired = [ratio(a, b) for a, b in zip(samples["on"], samples["off"], strict=True)]
    charged = [ratio(a, b) for a, b in zip(with_collection, samples["off"], strict=True)]
    figures = {
        "rounds": rounds,
        "round_seconds": seconds,
        "pool_size": POOL_SIZE,
        "workers": WORKERS,
        "per_round_ops_per_second": samples,
        "median_ops_per_second": median,
        "per_round_ratio": paired,
        "ratio": percentile(paired, 50),
        "ratio_of_medians": ratio(median["on"], median["off"]),
        "per_round_ops_per_second_with_collection": with_collection,
        "ratio_with_collection": percentile(charged, 50),
        "client_cpu_us_per_op": dict(_cpu),
        "median_client_cpu_us_per_op": {name: percentile(v, 50) for name, v in _cpu.items()},
    }
    result = CaseResult(NAME, TITLE)
    result.figures = figures
    result.add(
        "direct: metrics on vs off (median ops/s)",
        f"{median['on']:.0f} vs {median['off']:.0f} (median of per-round ratios "
        f"{figures['ratio']:.3f}x, ratio of medians {figures['ratio_of_medians']:.3f}x)",
        ">= 0.98x",
        figures["ratio"] >= 0.98,
    )
    result.add(
        "direct: metrics on, collection time charged, vs off",
        f"median of per-round ratios {figures['ratio_with_collection']:.3f}x",
    )
    cpu = figures["median_client_cpu_us_per_op"]
    result.add(
        "direct: client CPU per operation, metrics on vs off (median us)",
        f"{cpu['on']:.1f} vs {cpu['off']:.1f} (off/on {ratio(cpu['off'], cpu['on']):.3f}x)",
    )
    return result
