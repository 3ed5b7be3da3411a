"""OpenTelemetry metrics and traces of an IAM pool, through the emulator and real PostgreSQL."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import asyncpg_iam
import asyncpg_iam.otel
import asyncpg_iam.starlette
from asyncpg_iam.testing import CredentialServer, PostgresServer, RDSIAMEmulator
from asyncpg_iam.testing._leak_guard import LeakGuard
from tests._support import pool_kwargs

POOL_NAME = "db.client.connection.pool.name"

# name -> (unit, data type) every instrumented pool reports.
SEMCONV = {
    "db.client.connection.count": ("{connection}", "Sum"),
    "db.client.connection.idle.max": ("{connection}", "Sum"),
    "db.client.connection.idle.min": ("{connection}", "Sum"),
    "db.client.connection.max": ("{connection}", "Sum"),
    "db.client.connection.pending_requests": ("{request}", "Sum"),
    "db.client.connection.timeouts": ("{timeout}", "Sum"),
    "db.client.connection.create_time": ("s", "Histogram"),
    "db.client.connection.wait_time": ("s", "Histogram"),
    "db.client.connection.use_time": ("s", "Histogram"),
}
IAM = {
    "asyncpg_iam.tokens.signed": ("{token}", "Sum"),
    "asyncpg_iam.tokens.reused": ("{token}", "Sum"),
    "asyncpg_iam.credentials.fetches": ("{fetch}", "Sum"),
    "asyncpg_iam.credentials.fetch_failures": ("{fetch}", "Sum"),
    "asyncpg_iam.credentials.time_left": ("s", "Gauge"),
    "asyncpg_iam.connections.opened": ("{connection}", "Sum"),
    "asyncpg_iam.connections.closed": ("{connection}", "Sum"),
    "asyncpg_iam.connects.failed": ("{connect}", "Sum"),
    "asyncpg_iam.connects.rate_limited": ("{connect}", "Sum"),
    "asyncpg_iam.auth.failures": ("{login}", "Sum"),
}


def collect(reader: InMemoryMetricReader) -> dict[str, Any]:
    """Return the metrics `reader` collects now, by name."""
    data = reader.get_metrics_data()
    found: dict[str, Any] = {}
    if data is None:
        return found
    for resource_metrics in data.resource_metrics:
        for scope_metrics in resource_metrics.scope_metrics:
            for metric in scope_metrics.metrics:
                found[metric.name] = metric
    return found


def points(metric: Any) -> list[Any]:
    """Return a metric's data points."""
    return list(metric.data.data_points)


def value(metrics: dict[str, Any], name: str, **attributes: str) -> Any:
    """Return the one data point of `name` whose attributes include `attributes`."""
    matching = [
        point
        for point in points(metrics[name])
        if all(point.attributes.get(key) == want for key, want in attributes.items())
    ]
    assert len(matching) == 1, (name, attributes, points(metrics[name]))
    point = matching[0]
    return point.count if hasattr(point, "bucket_counts") else point.value


async def test_every_instrument_matches_the_pool(
    iam_emulator: RDSIAMEmulator, postgres_server: PostgresServer
) -> None:
    """Every instrument has its name, unit and pool attribute, and agrees with stats()."""
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader])
    kwargs = pool_kwargs(iam_emulator, postgres_server, min_size=0, max_size=2)
    async with asyncpg_iam.create_pool(**kwargs) as pool:
        handle = asyncpg_iam.otel.instrument_pool(pool, meter_provider)
        iam_emulator.reject_next(1)
        with pytest.raises(asyncpg_iam.IAMAuthenticationError):
            await pool.fetchval("SELECT 1")
        for _ in range(3):
            assert await pool.fetchval("SELECT 1") == 1
        first = await pool.acquire()
        second = await pool.acquire()
        with pytest.raises(asyncio.TimeoutError):
            await pool.acquire(timeout=0.05)
        waiter = asyncio.ensure_future(pool.acquire(timeout=10))
        await asyncio.sleep(0.05)
        busy = collect(reader)
        await pool.release(first)
        third = await waiter
        await pool.release(second)
        await pool.release(third)
        metrics = collect(reader)
        stats = pool.stats()
        name = pool.name
        handle.uninstrument()
    meter_provider.shutdown()

    assert value(busy, "db.client.connection.pending_requests") == 1
    assert value(busy, "db.client.connection.count", **{"db.client.connection.state": "used"}) == 2
    # No connection has closed yet: test_closed_connections_by_reason covers that counter.
    for instrument, (unit, kind) in {**SEMCONV, **IAM}.items():
        if instrument == "asyncpg_iam.connections.closed":
            continue
        assert instrument in metrics, instrument
        assert metrics[instrument].unit == unit, instrument
        assert type(metrics[instrument].data).__name__ == kind, instrument
        assert points(metrics[instrument]), instrument
        for point in points(metrics[instrument]):
            assert point.attributes[POOL_NAME] == name, instrument

    state = "db.client.connection.state"
    assert value(metrics, "db.client.connection.count", **{state: "idle"}) == 2
    assert value(metrics, "db.client.connection.count", **{state: "used"}) == 0
    assert value(metrics, "db.client.connection.max") == 2
    assert value(metrics, "db.client.connection.idle.max") == 2
    assert value(metrics, "db.client.connection.idle.min") == 0
    assert value(metrics, "db.client.connection.pending_requests") == 0
    assert value(metrics, "db.client.connection.timeouts") == 1
    # 3 fetchvals + 3 acquires succeeded; the refused login and the timeout waited in vain.
    assert value(metrics, "db.client.connection.wait_time") == 6
    assert value(metrics, "db.client.connection.use_time") == 6
    assert value(metrics, "db.client.connection.create_time") == stats.connections_opened == 2
    assert value(metrics, "asyncpg_iam.connections.opened") == iam_emulator.logins_accepted == 2
    assert value(metrics, "asyncpg_iam.tokens.signed") == stats.tokens_signed == 3
    assert value(metrics, "asyncpg_iam.tokens.reused") == stats.token_reuses == 0
    assert value(metrics, "asyncpg_iam.credentials.fetches") == stats.credential_fetches == 1
    assert value(metrics, "asyncpg_iam.credentials.fetch_failures") == 0
    assert value(metrics, "asyncpg_iam.connects.failed") == stats.connect_failures == 1
    assert value(metrics, "asyncpg_iam.connects.rate_limited") == 0
    assert 3500 < value(metrics, "asyncpg_iam.credentials.time_left") < 3700  # 1-hour keys
    failures = points(metrics["asyncpg_iam.auth.failures"])
    assert sum(p.value for p in failures) == stats.auth_failures == iam_emulator.logins_rejected
    assert {p.attributes["asyncpg_iam.auth.failure_cause"] for p in failures} <= set(
        asyncpg_iam.otel.AUTH_FAILURE_CAUSES
    )


async def test_closed_connections_by_reason_and_rate_limit(
    iam_emulator: RDSIAMEmulator, postgres_server: PostgresServer
) -> None:
    """Connections retired by max_lifetime and connects that waited are reported by reason."""
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader])
    kwargs = pool_kwargs(
        iam_emulator,
        postgres_server,
        min_size=0,
        max_size=2,
        max_lifetime=0.3,
        max_connect_rate=20,
    )
    async with asyncpg_iam.create_pool(**kwargs) as pool:
        asyncpg_iam.otel.instrument_pool(pool, meter_provider)
        for _ in range(3):
            async with pool.acquire() as con:
                await con.fetchval("SELECT 1")
                await asyncio.sleep(0.35)
        stats = pool.stats()
        metrics = collect(reader)
    meter_provider.shutdown()
    closed = {
        p.attributes["asyncpg_iam.connection.close_reason"]: p.value
        for p in points(metrics["asyncpg_iam.connections.closed"])
    }
    assert closed == dict(stats.connections_closed)
    assert closed.get("max_lifetime", 0) >= 2
    assert value(metrics, "asyncpg_iam.connects.rate_limited") == stats.connects_rate_limited


async def test_credential_fetch_failures_are_counted(
    iam_emulator: RDSIAMEmulator,
    postgres_server: PostgresServer,
    credential_server: CredentialServer,
) -> None:
    """A failing credential endpoint shows in fetch_failures (stats and metric alike)."""
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader])
    credential_server.fail_status = 500
    kwargs = pool_kwargs(iam_emulator, postgres_server, min_size=0)
    async with asyncpg_iam.create_pool(**kwargs) as pool:
        asyncpg_iam.otel.instrument_pool(pool, meter_provider)
        with pytest.raises(asyncpg_iam.CredentialsError):
            await pool.fetchval("SELECT 1")
        metrics = collect(reader)
        stats = pool.stats()
    meter_provider.shutdown()
    assert stats.credential_fetch_failures == 1
    assert value(metrics, "asyncpg_iam.credentials.fetch_failures") == 1
    assert value(metrics, "asyncpg_iam.connects.failed") == stats.connect_failures == 1
    assert "asyncpg_iam.credentials.time_left" not in metrics or not points(
        metrics["asyncpg_iam.credentials.time_left"]
    )


async def test_uninstrumented_pool_reports_nothing_and_has_no_observer(
    iam_emulator: RDSIAMEmulator, postgres_server: PostgresServer
) -> None:
    """uninstrument() stops every report and takes the hooks off the pool; twice is refused."""
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader])
    async with asyncpg_iam.create_pool(**pool_kwargs(iam_emulator, postgres_server)) as pool:
        assert pool._observer is None
        handle = asyncpg_iam.otel.instrument_pool(pool, meter_provider)
        assert pool._observer is not None
        with pytest.raises(asyncpg_iam.ConfigurationError, match="already instrumented"):
            asyncpg_iam.otel.instrument_pool(pool, meter_provider)
        await pool.fetchval("SELECT 1")
        assert points(collect(reader)["db.client.connection.count"])
        handle.uninstrument()
        assert pool._observer is None
        assert not handle.active
        await pool.fetchval("SELECT 1")
        after = collect(reader)
        # Re-instrumenting after uninstrument works.
        again = asyncpg_iam.otel.instrument_pool(pool, meter_provider)
        again.uninstrument()
    meter_provider.shutdown()
    for name in ("db.client.connection.count", "asyncpg_iam.tokens.signed"):
        assert name not in after or not points(after[name]), name
    with pytest.raises(asyncpg_iam.ConfigurationError, match=r"asyncpg_iam\.Pool"):
        asyncpg_iam.otel.instrument_pool(object(), meter_provider)  # type: ignore[arg-type]


def test_auth_failure_cause_reads_the_first_hint() -> None:
    """The cause label comes from the diagnosis's first hint; unknown text is 'unknown'."""
    cause = asyncpg_iam.otel.auth_failure_cause
    assert cause(["Region mismatch: the token ...", "The database user ..."]) == "region_mismatch"
    assert cause(["The database user 'app' may lack the rds_iam role"]) == "missing_rds_iam_grant"
    assert cause(["Clock skew: this host's clock ..."]) == "clock_skew"
    assert cause([]) == "unknown"
    assert cause(["something new"]) == "unknown"


async def test_query_spans_through_an_iam_pool_carry_no_secret(
    iam_emulator: RDSIAMEmulator,
    postgres_server: PostgresServer,
    secret_leak_guard: LeakGuard,
) -> None:
    """asyncpg's instrumentation traces queries on pool connections; no telemetry has a secret."""
    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader])
    instrumentor = AsyncPGInstrumentor()
    instrumentor.instrument(tracer_provider=tracer_provider)
    try:
        kwargs = pool_kwargs(iam_emulator, postgres_server, min_size=0)
        async with asyncpg_iam.create_pool(**kwargs) as pool:
            asyncpg_iam.otel.instrument_pool(pool, meter_provider)
            iam_emulator.reject_next(1)
            with pytest.raises(asyncpg_iam.IAMAuthenticationError) as refused:
                await pool.fetchval("SELECT 1")
            assert await pool.fetchval("SELECT $1::int + 1", 41) == 42
            async with pool.acquire() as con:
                await con.execute("SELECT current_user")
            metrics_data = reader.get_metrics_data()
            stats = pool.stats()
    finally:
        instrumentor.uninstrument()
    meter_provider.shutdown()
    spans = exporter.get_finished_spans()
    statements = [span.attributes.get("db.statement") for span in spans]
    assert "SELECT $1::int + 1" in statements
    assert "SELECT current_user" in statements
    assert all(span.attributes.get("db.system") == "postgresql" for span in spans)
    assert stats.tokens_signed >= 2
    # The guard knows this test's secrets (so it could find them) and finds none anywhere.
    assert len(secret_leak_guard.registry) > 0
    assert metrics_data is not None
    for span in spans:
        secret_leak_guard.watch(span.to_json(), f"span {span.name}")
    secret_leak_guard.watch(metrics_data.to_json(), "exported metrics")
    secret_leak_guard.watch(refused.value)
    assert secret_leak_guard.find_leaks() == []


async def test_starlette_lifespan_reports_metrics_with_one_option(
    iam_emulator: RDSIAMEmulator, postgres_server: PostgresServer
) -> None:
    """lifespan(metrics=provider) instruments the pool while the app runs, and stops after."""
    from starlette.applications import Starlette

    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader])
    kwargs = pool_kwargs(iam_emulator, postgres_server)
    app = Starlette()
    async with asyncpg_iam.starlette.lifespan(metrics=meter_provider, **kwargs)(app) as state:
        pool = state["pool"]
        assert pool._observer is not None
        await pool.fetchval("SELECT 1")
        metrics = collect(reader)
    assert pool._observer is None
    meter_provider.shutdown()
    assert value(metrics, "db.client.connection.max") == pool.get_max_size()
    assert value(metrics, "asyncpg_iam.connections.opened") == pool.stats().connections_opened
