"""OpenTelemetry metrics for an IAM pool: the database connection-pool conventions, and IAM's own.

    import asyncpg_iam.otel

    pool = await asyncpg_iam.create_pool(...)
    instrumentation = asyncpg_iam.otel.instrument_pool(pool)   # the global MeterProvider
    ...
    instrumentation.uninstrument()

Reported per pool, each with ``db.client.connection.pool.name`` = `Pool.name`, after
OpenTelemetry's semantic conventions for database client connection pools:

- ``db.client.connection.count`` (``db.client.connection.state`` = ``idle`` | ``used``),
  ``.idle.max``, ``.idle.min``, ``.max``, ``.pending_requests`` (UpDownCounters),
  ``.timeouts`` (Counter), and the histograms ``.create_time``, ``.wait_time`` and
  ``.use_time`` in seconds;

and what only an IAM pool knows, under ``asyncpg_iam.``: tokens signed and reused,
credential fetches and failures, connections opened, connect failures, refused logins by
diagnosed cause, connections closed by reason, connects that waited on ``max_connect_rate``,
and the seconds the signing credentials have left.

Counters and gauges are observable: they read the pool's counters when the SDK collects.
Only the histograms, pending requests and timeouts need the pool to report as it works, and
an uninstrumented pool does none of that work. An instrumented one appends each wait and use
time to a bounded buffer (a deque append, well under a microsecond) and the buffer is
recorded into the histograms when the SDK collects (the SDK's own ``record`` costs 10 us or
more a call, a noticeable share of a pooled ``SELECT 1``); at most `MAX_BUFFERED` samples per
histogram wait between two collections, older ones are dropped beyond that. No attribute
carries a token, a key or a secret. Needs the ``otel`` extra (``opentelemetry-api``); the
application brings the SDK.
"""

from __future__ import annotations

import asyncio
import collections
import time
import weakref
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

try:
    from opentelemetry import metrics
    from opentelemetry.metrics import CallbackOptions, MeterProvider, Observation
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "asyncpg_iam.otel needs the OpenTelemetry API: pip install asyncpg-iam[otel]"
    ) from exc

from ._errors import ConfigurationError
from ._pool import Pool

if TYPE_CHECKING:
    from ._errors import IAMAuthenticationError

__all__ = ["AUTH_FAILURE_CAUSES", "PoolInstrumentation", "auth_failure_cause", "instrument_pool"]

#: The attribute naming the pool on every instrument.
POOL_NAME = "db.client.connection.pool.name"
#: The connection state attribute of ``db.client.connection.count``.
STATE = "db.client.connection.state"
#: The attribute of ``asyncpg_iam.connections.closed``: the pool's close reason.
CLOSE_REASON = "asyncpg_iam.connection.close_reason"
#: The attribute of ``asyncpg_iam.auth.failures``: the most likely cause, as diagnosed.
FAILURE_CAUSE = "asyncpg_iam.auth.failure_cause"

# The diagnosis ranks hints (see `diagnose_auth_failure`); the first one names the cause.
_HINT_CAUSES = (
    ("The connection was not encrypted", "no_tls"),
    ("Region mismatch", "region_mismatch"),
    ("The token was signed for", "signing_host"),
    ("The signing credentials", "credentials_expired"),
    ("The token was reused", "token_reuse"),
    ("The database user", "missing_rds_iam_grant"),
    ("The AWS identity", "missing_permission"),
    ("Clock skew", "clock_skew"),
)
#: Samples per histogram kept between two collections (a minute at 1,000 acquires a second).
MAX_BUFFERED = 65_536
#: Every value ``asyncpg_iam.auth.failure_cause`` takes.
AUTH_FAILURE_CAUSES = (*(cause for _, cause in _HINT_CAUSES), "unknown")

# Seconds: from a sub-millisecond acquire to a connect that waited on a slow login.
_TIME_BUCKETS = (
    0.0001,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)


def auth_failure_cause(hints: Sequence[str]) -> str:
    """Return the short cause (one of `AUTH_FAILURE_CAUSES`) the first hint of a diagnosis names."""
    first = hints[0] if hints else ""
    for prefix, cause in _HINT_CAUSES:
        if first.startswith(prefix):
            return cause
    return "unknown"


class _Observer:
    """The hooks the pool calls while instrumented (see `asyncpg_iam._observer`)."""

    def __init__(self, meter: metrics.Meter, attributes: dict[str, str]) -> None:
        self._attributes = attributes
        self._time = time.perf_counter
        self.pending = 0
        self.timeouts = 0
        self.auth_failures: collections.Counter[str] = collections.Counter()
        # perf_counter time each lent connection's holder was handed out at.
        self._lent: dict[Any, float] = {}
        # Samples waiting for the next collection; deque appends and pops are thread-safe
        # (the SDK may collect from its exporter thread).
        self._waits: collections.deque[float] = collections.deque(maxlen=MAX_BUFFERED)
        self._uses: collections.deque[float] = collections.deque(maxlen=MAX_BUFFERED)
        self._create_time = meter.create_histogram(
            "db.client.connection.create_time",
            unit="s",
            description="The time it took to create a new connection.",
            explicit_bucket_boundaries_advisory=_TIME_BUCKETS,
        )
        self._wait_time = meter.create_histogram(
            "db.client.connection.wait_time",
            unit="s",
            description="The time it took to obtain an open connection from the pool.",
            explicit_bucket_boundaries_advisory=_TIME_BUCKETS,
        )
        self._use_time = meter.create_histogram(
            "db.client.connection.use_time",
            unit="s",
            description="The time between borrowing a connection and returning it to the pool.",
            explicit_bucket_boundaries_advisory=_TIME_BUCKETS,
        )

    async def acquire(
        self, acquire: Callable[[float | None], Awaitable[Any]], timeout: float | None
    ) -> Any:
        started = self._time()
        self.pending += 1
        try:
            proxy = await acquire(timeout)
        except asyncio.TimeoutError:
            self.timeouts += 1
            raise
        finally:
            self.pending -= 1
        now = self._time()
        self._waits.append(now - started)
        self._lent[getattr(proxy, "_holder", proxy)] = now
        return proxy

    def released(self, connection: Any) -> None:
        started = self._lent.pop(getattr(connection, "_holder", connection), None)
        if started is not None:
            self._uses.append(self._time() - started)

    def flush(self) -> None:
        """Record the buffered wait and use times into their histograms."""
        for samples, histogram in ((self._waits, self._wait_time), (self._uses, self._use_time)):
            attributes = self._attributes
            record = histogram.record
            pop = samples.popleft
            for _ in range(len(samples)):
                record(pop(), attributes)

    def connection_created(self, seconds: float) -> None:
        self._create_time.record(seconds, self._attributes)

    def auth_failed(self, error: IAMAuthenticationError) -> None:
        self.auth_failures[auth_failure_cause(error.hints)] += 1


class PoolInstrumentation:
    """A pool's metrics, reported until `uninstrument` is called.

    Create it with `instrument_pool`. It holds the pool weakly: a pool that is garbage
    collected simply stops reporting.
    """

    def __init__(self, pool: Pool, meter_provider: MeterProvider | None) -> None:
        if pool._observer is not None:
            raise ConfigurationError(
                f"pool {pool.name} is already instrumented: call uninstrument() on its "
                "PoolInstrumentation before instrumenting it again"
            )
        meter = metrics.get_meter("asyncpg_iam", meter_provider=meter_provider)
        self._pool_ref = weakref.ref(pool)
        self._attributes = {POOL_NAME: pool.name}
        self._observer = _Observer(meter, self._attributes)
        self._active = True
        self._register(meter)
        pool._observer = self._observer

    @property
    def pool_name(self) -> str:
        """The ``db.client.connection.pool.name`` reported."""
        return self._attributes[POOL_NAME]

    @property
    def active(self) -> bool:
        """True until `uninstrument` is called."""
        return self._active

    def uninstrument(self) -> None:
        """Stop reporting: the pool goes back to doing no metrics work at all."""
        self._active = False
        self._observer.flush()
        pool = self._pool_ref()
        if pool is not None and pool._observer is self._observer:
            pool._observer = None

    def __repr__(self) -> str:
        state = "active" if self._active else "uninstrumented"
        return f"<asyncpg_iam.otel.PoolInstrumentation {self.pool_name!r} {state}>"

    # -- instruments -----------------------------------------------------------------------

    def _live_pool(self) -> Pool | None:
        return self._pool_ref() if self._active else None

    def _one(self, read: Callable[[Pool], float | None]) -> Callable[[CallbackOptions], Any]:
        """Return a callback reporting ``read(pool)`` with the pool's name."""

        def callback(options: CallbackOptions) -> Iterable[Observation]:
            pool = self._live_pool()
            if pool is None:
                return []
            value = read(pool)
            return [] if value is None else [Observation(value, self._attributes)]

        return callback

    def _by(
        self, key: str, read: Callable[[Pool], Iterable[tuple[str, float]]]
    ) -> Callable[[CallbackOptions], Any]:
        """Return a callback reporting each ``(label, value)`` of ``read(pool)`` under `key`."""

        def callback(options: CallbackOptions) -> Iterable[Observation]:
            pool = self._live_pool()
            if pool is None:
                return []
            return [
                Observation(value, {**self._attributes, key: label}) for label, value in read(pool)
            ]

        return callback

    def _register(self, meter: metrics.Meter) -> None:
        observer = self._observer
        updown = meter.create_observable_up_down_counter
        counter = meter.create_observable_counter

        def count(pool: Pool) -> Iterable[tuple[str, float]]:
            size, idle = pool.get_size(), pool.get_idle_size()
            return [("idle", idle), ("used", max(size - idle, 0))]

        updown(
            "db.client.connection.count",
            [self._by(STATE, count)],
            unit="{connection}",
            description="The number of connections that are currently in the state described "
            "by the state attribute.",
        )
        # asyncpg keeps up to max_size connections idle and refills to min_size.
        updown(
            "db.client.connection.idle.max",
            [self._one(lambda pool: pool.get_max_size())],
            unit="{connection}",
            description="The maximum number of idle open connections allowed.",
        )
        updown(
            "db.client.connection.idle.min",
            [self._one(lambda pool: pool.get_min_size())],
            unit="{connection}",
            description="The minimum number of idle open connections allowed.",
        )
        updown(
            "db.client.connection.max",
            [self._one(lambda pool: pool.get_max_size())],
            unit="{connection}",
            description="The maximum number of open connections allowed.",
        )

        def pending(pool: Pool) -> int:
            # Collection has begun: hand the buffered samples to the histograms first.
            observer.flush()
            return observer.pending

        updown(
            "db.client.connection.pending_requests",
            [self._one(pending)],
            unit="{request}",
            description="The number of current pending requests for an open connection.",
        )
        counter(
            "db.client.connection.timeouts",
            [self._one(lambda pool: observer.timeouts)],
            unit="{timeout}",
            description="The number of connection timeouts that have occurred trying to "
            "obtain a connection from the pool.",
        )
        # IAM's own.
        counter(
            "asyncpg_iam.tokens.signed",
            [self._one(lambda pool: pool.stats().tokens_signed)],
            unit="{token}",
            description="IAM tokens signed.",
        )
        counter(
            "asyncpg_iam.tokens.reused",
            [self._one(lambda pool: pool.stats().token_reuses)],
            unit="{token}",
            description="Connects that presented a recently signed token again.",
        )
        counter(
            "asyncpg_iam.credentials.fetches",
            [self._one(lambda pool: pool.stats().credential_fetches)],
            unit="{fetch}",
            description="Fetches from the AWS credential source, successful or not.",
        )
        counter(
            "asyncpg_iam.credentials.fetch_failures",
            [self._one(lambda pool: pool.stats().credential_fetch_failures)],
            unit="{fetch}",
            description="Fetches from the AWS credential source that failed.",
        )
        meter.create_observable_gauge(
            "asyncpg_iam.credentials.time_left",
            [self._one(_credentials_time_left)],
            unit="s",
            description="Seconds until the signing credentials expire (absent when they "
            "never expire or none were fetched yet).",
        )
        counter(
            "asyncpg_iam.connections.opened",
            [self._one(lambda pool: pool.stats().connections_opened)],
            unit="{connection}",
            description="Connections opened and added to the pool.",
        )
        counter(
            "asyncpg_iam.connections.closed",
            [self._by(CLOSE_REASON, lambda pool: pool.stats().connections_closed.items())],
            unit="{connection}",
            description="Connections closed, by reason (max_lifetime, discarded_on_acquire, "
            "other).",
        )
        counter(
            "asyncpg_iam.connects.failed",
            [self._one(lambda pool: pool.stats().connect_failures)],
            unit="{connect}",
            description="Connection attempts that raised, refused logins included.",
        )
        counter(
            "asyncpg_iam.connects.rate_limited",
            [self._one(lambda pool: pool.stats().connects_rate_limited)],
            unit="{connect}",
            description="Login attempts that waited for max_connect_rate.",
        )
        counter(
            "asyncpg_iam.auth.failures",
            [self._by(FAILURE_CAUSE, lambda pool: observer.auth_failures.items())],
            unit="{login}",
            description="IAM logins the server refused since instrumenting, by the most "
            "likely cause diagnosed.",
        )


def _credentials_time_left(pool: Pool) -> float | None:
    provider = pool._provider
    if provider is None:
        return None
    current = provider.credentials.peek()
    if current is None:
        return None
    return current.expires_in(pool._clock.now())


def instrument_pool(pool: Pool, meter_provider: MeterProvider | None = None) -> PoolInstrumentation:
    """Report `pool`'s metrics through `meter_provider` (the global one when None).

    Call it once the pool exists (before or after it is awaited), in the pool's event loop.
    Raises `ConfigurationError` if the pool is already instrumented.
    """
    if not isinstance(pool, Pool):
        raise ConfigurationError(
            f"instrument_pool takes an asyncpg_iam.Pool (from asyncpg_iam.create_pool), not "
            f"{type(pool).__name__}"
        )
    return PoolInstrumentation(pool, meter_provider)
