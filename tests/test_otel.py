"""OpenTelemetry: the pool's metrics by the conventions, IAM's own, and traces without secrets."""

from __future__ import annotations

import asyncio
import datetime
import json
from typing import Any

import pytest

pytest.importorskip("opentelemetry.sdk")

from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
    InMemorySpanExporter,
)

import asyncpg_iam
from asyncpg_iam.otel import instrument_pool
from asyncpg_iam.testing import ManualClock, PostgresServer, RDSIAMEmulator
from asyncpg_iam.testing._leak_guard import LeakGuard

from ._support import pool_kwargs, wait_for

POOL_NAME = "db.client.connection.pool.name"
CONVENTIONS = {
    "db.client.connection.count": "{connection}",
    "db.client.connection.idle.max": "{connection}",
    "db.client.connection.idle.min": "{connection}",
    "db.client.connection.max": "{connection}",
    "db.client.connection.pending_requests": "{request}",
    "db.client.connection.timeouts": "{timeout}",
    "db.client.connection.create_time": "s",
    "db.client.connection.wait_time": "s",
    "db.client.connection.use_time": "s",
}
IAM = {
    "asyncpg_iam.tokens.signed": "{token}",
    "asyncpg_iam.tokens.reused": "{token}",
    "asyncpg_iam.credentials.fetches": "{fetch}",
    "asyncpg_iam.credentials.fetch_failures": "{fetch}",
    "asyncpg_iam.auth.failures": "{login}",
    "asyncpg_iam.connects.rate_limited": "{connect}",
    "asyncpg_iam.hosts.silent": "{host}",
    "asyncpg_iam.health.probes": "{probe}",
    "asyncpg_iam.connections.closed": "{connection}",
    "asyncpg_iam.credentials.expiry": "s",
    "asyncpg_iam.topology.refreshes": "{refresh}",
    "asyncpg_iam.bluegreen.holds": "{hold}",
    "asyncpg_iam.bluegreen.hold_timeouts": "{hold}",
    "asyncpg_iam.bluegreen.reroutes": "{connection}",
    "asyncpg_iam.bluegreen.fallback_refusals": "{login}",
}


def collect(reader: InMemoryMetricReader) -> dict[str, Any]:
    """Return the collected metrics by name."""
    data = reader.get_metrics_data()
    if data is None:  # no instrument reported a data point
        return {}
    return {
        metric.name: metric
        for resource in data.resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
    }


def points(metric: Any) -> list[Any]:
    return list(metric.data.data_points)


def value(metric: Any, **attributes: str) -> Any:
    """Return the one data point's value (or histogram count) with these attributes."""
    found = [
        p for p in points(metric) if all(p.attributes.get(k) == v for k, v in attributes.items())
    ]
    assert len(found) == 1, (metric.name, attributes, points(metric))
    point = found[0]
    return point.count if hasattr(point, "bucket_counts") else point.value


@pytest.fixture
def small_buffer(monkeypatch: pytest.MonkeyPatch) -> None:
    """Buffer bounds small enough for a test to cross them many times over."""
    import asyncpg_iam.otel

    monkeypatch.setattr(asyncpg_iam.otel, "MAX_BUFFERED", 8)
    monkeypatch.setattr(asyncpg_iam.otel, "DRAIN_AT", 4, raising=False)
    monkeypatch.setattr(asyncpg_iam.otel, "CHUNK", 2, raising=False)


async def acquire(pool: Any, times: int) -> None:
    """Run `times` queries on `pool`, one after another (an acquire and a release each)."""
    for _ in range(times):
        await pool.fetchval("SELECT 1")


def histogram_counts(reader: InMemoryMetricReader, pool: Any) -> tuple[int, int]:
    """Return the wait_time and use_time histograms' counts of `pool`."""
    metrics = collect(reader)
    name = {POOL_NAME: pool.name}
    return (
        value(metrics["db.client.connection.wait_time"], **name),
        value(metrics["db.client.connection.use_time"], **name),
    )


async def test_every_instrument_with_names_units_and_values(
    iam_emulator: RDSIAMEmulator, postgres_server: PostgresServer
) -> None:
    """Every instrument is there, named and united as the conventions say, matching stats()."""
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    kwargs = pool_kwargs(iam_emulator, postgres_server, min_size=1, max_size=2, max_lifetime=60)
    async with asyncpg_iam.create_pool(**kwargs) as pool:
        instrument_pool(pool, provider)
        acquires = 0
        for _ in range(5):
            async with pool.acquire() as con:
                await con.fetchval("SELECT 1")
            acquires += 1
        # Both connections in use, a third acquire waits and times out.
        async with pool.acquire(), pool.acquire():
            acquires += 2
            waiter = asyncio.ensure_future(pool.acquire(timeout=0.3))
            await wait_for(lambda: pool.stats().waiting_acquires == 1)
            metrics = collect(reader)
            assert value(metrics["db.client.connection.pending_requests"]) == 1
            assert (
                value(
                    metrics["db.client.connection.count"], **{"db.client.connection.state": "used"}
                )
                == 2
            )
            with pytest.raises(asyncio.TimeoutError):
                await waiter
        stats = pool.stats()
        metrics = collect(reader)
        provider_ = pool._connector.provider
        assert provider_ is not None
        cached = provider_.credentials.peek()
        assert cached is not None
        assert cached.expiry is not None
        left = (cached.expiry - datetime.datetime.now(datetime.timezone.utc)).total_seconds()

    assert set(metrics) == set(CONVENTIONS) | set(IAM)
    for name, unit in {**CONVENTIONS, **IAM}.items():
        assert metrics[name].unit == unit, name
        for point in points(metrics[name]):
            assert point.attributes[POOL_NAME] == pool.name, name
    count = metrics["db.client.connection.count"]
    assert value(count, **{"db.client.connection.state": "idle"}) == 2
    assert value(count, **{"db.client.connection.state": "used"}) == 0
    assert value(metrics["db.client.connection.max"]) == 2
    assert value(metrics["db.client.connection.idle.max"]) == 2
    assert value(metrics["db.client.connection.idle.min"]) == 1
    assert value(metrics["db.client.connection.pending_requests"]) == 0
    assert value(metrics["db.client.connection.timeouts"]) == 1
    # Every connection, the min_size one opened before instrumenting included (the pool's history).
    assert value(metrics["db.client.connection.create_time"]) == stats.connections_opened
    assert value(metrics["db.client.connection.wait_time"]) == acquires
    assert value(metrics["db.client.connection.use_time"]) == acquires
    assert value(metrics["asyncpg_iam.tokens.signed"]) == stats.tokens_signed
    assert stats.tokens_signed == iam_emulator.logins_accepted == stats.connections_opened
    assert value(metrics["asyncpg_iam.credentials.fetches"]) == stats.credential_fetches
    assert value(metrics["asyncpg_iam.credentials.fetch_failures"]) == 0
    refused = metrics["asyncpg_iam.auth.failures"]
    assert sum(p.value for p in points(refused)) == stats.auth_failures == 0
    assert abs(value(metrics["asyncpg_iam.credentials.expiry"]) - left) < 5


async def test_closes_by_reason_and_refused_logins(
    iam_emulator: RDSIAMEmulator, postgres_server: PostgresServer
) -> None:
    """Retirements by reason and refused logins by cause are counted as stats() counts them."""
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    kwargs = pool_kwargs(iam_emulator, postgres_server, min_size=0, max_size=2, max_lifetime=0.3)
    async with asyncpg_iam.create_pool(**kwargs) as pool:
        instrument_pool(pool, provider)
        await pool.fetchval("SELECT 1")
        await wait_for(lambda: pool.stats().connections_closed.get("max_lifetime", 0) >= 1)
        iam_emulator.reject_next(1)
        with pytest.raises(asyncpg_iam.IAMAuthenticationError) as caught:
            await pool.fetchval("SELECT 1")
        stats = pool.stats()
        metrics = collect(reader)
    closed = metrics["asyncpg_iam.connections.closed"]
    assert (
        value(closed, **{"asyncpg_iam.connection.close.reason": "max_lifetime"})
        == (stats.connections_closed["max_lifetime"])
    )
    refused = metrics["asyncpg_iam.auth.failures"]
    assert value(refused, **{"asyncpg_iam.auth.failure.cause": caught.value.cause}) == 1
    assert sum(p.value for p in points(refused)) == stats.auth_failures == 1
    assert caught.value.cause == "missing_grant"  # the emulator's refusal: RDS's own words
    assert iam_emulator.logins_rejected == 1


async def test_uninstrumented_pool_has_no_observer_and_reports_nothing(
    iam_emulator: RDSIAMEmulator, postgres_server: PostgresServer
) -> None:
    """uninstrument() removes the pool's observer; callbacks then report no data points."""
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    # min_size 0: no connection before instrumenting, so no history is replayed.
    kwargs = pool_kwargs(iam_emulator, postgres_server, min_size=0)
    async with asyncpg_iam.create_pool(**kwargs) as pool:
        assert pool._observer is None
        instrumentation = instrument_pool(pool, provider)
        assert pool._observer is not None
        instrumentation.uninstrument()
        assert pool._observer is None
        await pool.fetchval("SELECT 1")
        metrics = collect(reader)
    assert all(not points(metric) for metric in metrics.values()), metrics


def test_instrument_pool_takes_a_pool() -> None:
    """Anything but an asyncpg_iam.Pool is a ConfigurationError naming what was passed."""
    with pytest.raises(asyncpg_iam.ConfigurationError, match="not str"):
        instrument_pool("pool")  # type: ignore[arg-type]


async def test_asyncpg_traces_work_and_telemetry_carries_no_secret(
    iam_emulator: RDSIAMEmulator,
    postgres_server: PostgresServer,
    secret_leak_guard: LeakGuard,
) -> None:
    """With asyncpg's instrumentation on, queries through an IAM pool make spans; no secrets."""
    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    reader = InMemoryMetricReader()
    instrumentor = AsyncPGInstrumentor()
    instrumentor.instrument(tracer_provider=tracer_provider)
    try:
        clock = ManualClock(datetime.datetime.now(datetime.timezone.utc))
        kwargs = pool_kwargs(
            iam_emulator, postgres_server, min_size=0, max_lifetime=0.5, clock=clock
        )
        async with asyncpg_iam.create_pool(**kwargs) as pool:
            instrument_pool(pool, MeterProvider(metric_readers=[reader]))
            for n in range(3):
                assert await pool.fetchval("SELECT $1::int", n) == n
                await clock.advance(1.0)  # connections come due: new logins, new tokens
            stats = pool.stats()
    finally:
        instrumentor.uninstrument()
    spans = exporter.get_finished_spans()
    statements = [span.attributes.get("db.statement") for span in spans]
    assert statements.count("SELECT $1::int") == 3
    assert stats.tokens_signed >= 2
    data = reader.get_metrics_data()
    assert data is not None
    telemetry = [span.to_json() for span in spans] + [data.to_json()]
    for text in telemetry:
        secret_leak_guard.watch(text, "exported telemetry")
    assert secret_leak_guard.find_leaks() == []
    assert "X-Amz-Signature" not in json.dumps(telemetry)
    assert len(secret_leak_guard.registry) > 0, "the guard knows the secrets it looks for"


async def test_starlette_lifespan_reports_metrics(
    iam_emulator: RDSIAMEmulator, postgres_server: PostgresServer
) -> None:
    """lifespan(metrics=provider) instruments the pool it creates, and stops at shutdown."""
    from asyncpg_iam.starlette import lifespan

    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    run = lifespan(**pool_kwargs(iam_emulator, postgres_server), metrics=provider)
    async with run(object()) as state:
        pool = state["pool"]
        assert pool._observer is not None
        metrics = collect(reader)
        assert value(metrics["asyncpg_iam.tokens.signed"]) == pool.stats().tokens_signed >= 1
    assert pool._observer is None


async def test_without_histograms_the_counters_remain(
    iam_emulator: RDSIAMEmulator, postgres_server: PostgresServer
) -> None:
    """histograms=False drops the three time histograms and keeps every other instrument."""
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    async with asyncpg_iam.create_pool(**pool_kwargs(iam_emulator, postgres_server)) as pool:
        instrument_pool(pool, provider, histograms=False)
        await pool.fetchval("SELECT 1")
        metrics = collect(reader)
    timed = {name for name, unit in CONVENTIONS.items() if unit == "s"}
    assert set(metrics) == (set(CONVENTIONS) - timed) | set(IAM)


async def test_two_pools_on_one_provider_both_report(
    iam_emulator: RDSIAMEmulator, postgres_server: PostgresServer, small_buffer: None
) -> None:
    """Two pools instrumented on one MeterProvider each report every instrument, their own
    histogram counts included (exact, each far beyond the buffer's bound), and
    uninstrumenting one leaves the other reporting."""
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    kwargs = pool_kwargs(iam_emulator, postgres_server, min_size=1, max_size=2)
    async with (
        asyncpg_iam.create_pool(**kwargs, name="first") as first,
        asyncpg_iam.create_pool(**kwargs, name="second") as second,
    ):
        instrument_pool(first, provider)
        second_instrumentation = instrument_pool(second, provider)
        await asyncio.gather(*(acquire(pool, n) for pool, n in ((first, 40), (second, 60))))
        metrics = collect(reader)
        for pool, acquires in ((first, 40), (second, 60)):
            name = {POOL_NAME: pool.name}
            assert value(metrics["db.client.connection.wait_time"], **name) == acquires
            assert value(metrics["db.client.connection.use_time"], **name) == acquires
            assert value(metrics["db.client.connection.max"], **name) == 2
            signed = value(metrics["asyncpg_iam.tokens.signed"], **name)
            assert signed == pool.stats().tokens_signed
        second_instrumentation.uninstrument()
        await first.fetchval("SELECT 1")
        metrics = collect(reader)
    maxima = points(metrics["db.client.connection.max"])
    assert [p.attributes[POOL_NAME] for p in maxima] == [first.name]
    assert value(metrics["db.client.connection.wait_time"], **{POOL_NAME: first.name}) == 41


async def test_histograms_count_every_acquire_far_above_the_buffer(
    iam_emulator: RDSIAMEmulator, postgres_server: PostgresServer, small_buffer: None
) -> None:
    """Between two collections, acquires far beyond the buffer's bound are each counted once
    in the wait and use histograms, and the buffer never holds more than its bound."""
    import asyncpg_iam.otel

    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    kwargs = pool_kwargs(iam_emulator, postgres_server, min_size=1, max_size=2)
    async with asyncpg_iam.create_pool(**kwargs) as pool:
        instrumentation = instrument_pool(pool, provider)
        times = instrumentation._recorder.acquire_times
        assert times is not None
        largest = 0
        for acquires in (100, 200):
            for _ in range(100):
                await pool.fetchval("SELECT 1")
                largest = max(largest, len(times.uses), len(times.waits))
            assert histogram_counts(reader, pool) == (acquires, acquires)
        assert largest <= asyncpg_iam.otel.MAX_BUFFERED
        await acquire(pool, 50)
        # Uninstrumented while the drain may be under way: each sample still recorded once.
        instrumentation.uninstrument()
        assert histogram_counts(reader, pool) == (250, 250)
        await pool.fetchval("SELECT 1")
        assert histogram_counts(reader, pool) == (250, 250)


async def test_releases_record_a_chunk_while_the_loop_cannot_drain(
    iam_emulator: RDSIAMEmulator, postgres_server: PostgresServer, small_buffer: None
) -> None:
    """When releases outrun the drain (none of its callbacks can run between them), the
    releases themselves record, so the buffer stays within its bound and every acquire counts."""
    import asyncpg_iam.otel

    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    bound = asyncpg_iam.otel.MAX_BUFFERED
    kwargs = pool_kwargs(iam_emulator, postgres_server, min_size=12, max_size=12)
    async with asyncpg_iam.create_pool(**kwargs) as pool:
        instrumentation = instrument_pool(pool, provider)
        times = instrumentation._recorder.acquire_times
        assert times is not None
        largest = 0
        for _ in range(10):
            connections = [await pool.acquire() for _ in range(12)]
            # Each release's bookkeeping runs when it is called: twelve in a row, no callback
            # of the loop's in between.
            releases = [pool.release(con) for con in connections]
            largest = max(largest, len(times.uses))
            await asyncio.gather(*releases)
        assert largest <= bound
        assert histogram_counts(reader, pool) == (120, 120)


async def test_without_a_reader_the_buffer_is_drained(
    iam_emulator: RDSIAMEmulator, postgres_server: PostgresServer, small_buffer: None
) -> None:
    """On a MeterProvider that no reader collects, the buffered times are still recorded
    (into the SDK, which keeps nothing for them): the buffer empties instead of filling, and
    the drain then ends (it does not keep the loop busy)."""
    import asyncpg_iam.otel

    kwargs = pool_kwargs(iam_emulator, postgres_server, min_size=1, max_size=2)
    async with asyncpg_iam.create_pool(**kwargs) as pool:
        instrumentation = instrument_pool(pool, MeterProvider())
        times = instrumentation._recorder.acquire_times
        assert times is not None
        await acquire(pool, 100)
        assert len(times.uses) < asyncpg_iam.otel.MAX_BUFFERED
    recorder = instrumentation._recorder
    await wait_for(lambda: not times.uses and not times.waits and not recorder._draining)
    assert times.spill_at == asyncpg_iam.otel.DRAIN_AT
