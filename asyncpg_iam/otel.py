"""OpenTelemetry metrics for an IAM pool: the database connection-pool conventions, and IAM's own.

    from asyncpg_iam.otel import instrument_pool

    pool = await asyncpg_iam.create_pool(...)
    instrumentation = instrument_pool(pool)  # the global MeterProvider, or meter_provider=...
    ...
    instrumentation.uninstrument()

The pool metrics follow OpenTelemetry's semantic conventions for database client connection
pools, each with ``db.client.connection.pool.name`` (the pool's name):

=========================================== ============== ======================================
``db.client.connection.count``              {connection}   open connections, by
                                                           ``db.client.connection.state``
                                                           (``idle`` or ``used``)
``db.client.connection.idle.max``           {connection}   ``max_size`` (asyncpg keeps idle ones)
``db.client.connection.idle.min``           {connection}   ``min_size``
``db.client.connection.max``                {connection}   ``max_size``
``db.client.connection.pending_requests``   {request}      acquires waiting for a connection
``db.client.connection.timeouts``           {timeout}      acquires that timed out
``db.client.connection.create_time``        s              histogram: opening a connection
``db.client.connection.wait_time``          s              histogram: waiting in ``acquire``
``db.client.connection.use_time``           s              histogram: from acquire to release
=========================================== ============== ======================================

and what only an IAM pool knows, under ``asyncpg_iam.``: tokens signed and reused, credential
fetches and their failures, refused logins by the diagnosed cause
(``asyncpg_iam.auth.failure.cause``: ``missing_grant``, ``permission``, ``region_mismatch``,
``signing_host``, ``clock_skew``, ...), connections retired by reason
(``asyncpg_iam.connection.close.reason``: ``max_lifetime``, ``discarded_on_acquire``,
``failover``, ``topology``, ``silent_host``, ``other``), connects that waited for
``max_connect_rate``, hosts found silent and the health check's probes, the seconds left before
the cached AWS credentials expire, and on an Aurora cluster the topology refreshes and the open
connections per instance (``asyncpg_iam.instance.id``), and on a database with a blue/green
deployment the phase seen (``asyncpg_iam.bluegreen.phase``), the holds begun and those ended by
their bound, the connections rerouted to green and the logins green refused while the pool
found its name (``asyncpg_iam.bluegreen.*``).

Counters and gauges are observable: they read the pool's counters when the reader collects, so
an instrumented pool does no extra work for them. The three histograms are fed through
`Pool.set_observer`: an uninstrumented pool, or one with ``histograms=False``, does no extra
work per acquire but one attribute check in its acquire and its release; with the histograms,
the pool appends each wait and use time to a buffer (no call per acquire: the SDK's
``record()`` costs several microseconds, twice per acquire), and they are recorded into the
histograms when the reader collects. At high rates (more than `DRAIN_AT` acquires between two
collections: OpenTelemetry's default exporter collects once a minute) the buffered times are
recorded sooner, on the pool's event loop, `CHUNK` at a time in callbacks of their own, so the
loop is never held for more than about a millisecond. No sample is ever dropped, at any acquire
rate or collection interval, and the buffer stays bounded (`MAX_BUFFERED`) even on a
``MeterProvider`` without a reader, which then discards what is recorded (the SDK keeps nothing
for an instrument nobody reads). Nothing recorded ever carries a token or a secret. Needs the
``otel`` extra (``opentelemetry-api``); traces of queries come from
``opentelemetry-instrumentation-asyncpg``, which works unchanged on connections from this pool.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import inspect
import weakref
from collections.abc import Callable, Iterable
from typing import Any

try:
    from opentelemetry import metrics
    from opentelemetry.metrics import CallbackOptions, Meter, MeterProvider, Observation
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "asyncpg_iam.otel needs the OpenTelemetry API: pip install 'asyncpg-iam[otel]'"
    ) from exc

from ._acquire_times import AcquireTimes
from ._errors import AUTH_CAUSES, ConfigurationError
from ._pool import Pool

__all__ = ["PoolInstrumentation", "instrument_pool"]

POOL_NAME = "db.client.connection.pool.name"
STATE = "db.client.connection.state"
CLOSE_REASON = "asyncpg_iam.connection.close.reason"
AUTH_CAUSE = "asyncpg_iam.auth.failure.cause"
INSTANCE = "asyncpg_iam.instance.id"
# The reasons reported even before any connection closed for them (zeros, for dashboards).
CLOSE_REASONS = ("discarded_on_acquire", "failover", "max_lifetime", "other", "silent_host")
#: Use times a pool buffers before their recording starts on its event loop, `CHUNK` at a
#: time (fewer wait for the reader's collection, which records whatever is buffered).
DRAIN_AT = 4_096
#: The most use times a pool buffers (and waits: as many, plus one per connection in use). At
#: that size, reached only while releases outpace the drain (more than `CHUNK` in each turn of
#: the event loop, for long), each release that finds it so records a chunk itself: nothing
#: is ever dropped.
MAX_BUFFERED = 16_384
#: Wait times and use times recorded per step of the drain, each step one callback on the
#: event loop: 2 x 64 calls of the SDK's ``record()`` (about 6.5 us each) hold it under a
#: millisecond.
CHUNK = 64
# Bucket boundaries (seconds) for connect, wait and use times: 0.5 ms to a minute.
_SECONDS_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
)  # fmt: skip


def _histograms(meter: Meter) -> tuple[Any, Any, Any]:
    """Create the create, wait and use time histograms."""
    histogram: Any = meter.create_histogram
    kwargs: dict[str, Any] = {"unit": "s"}
    # Advisory bucket boundaries exist from OpenTelemetry API 1.23 on.
    if "explicit_bucket_boundaries_advisory" in inspect.signature(histogram).parameters:
        kwargs["explicit_bucket_boundaries_advisory"] = _SECONDS_BUCKETS
    return (
        histogram(
            "db.client.connection.create_time",
            description="The time it took to create a new connection.",
            **kwargs,
        ),
        histogram(
            "db.client.connection.wait_time",
            description="The time it took to obtain an open connection from the pool.",
            **kwargs,
        ),
        histogram(
            "db.client.connection.use_time",
            description="The time between borrowing a connection and returning it to the pool.",
            **kwargs,
        ),
    )


class _Recorder:
    """The pool observer: records connect times, and the wait and use times the pool buffers.

    The pool appends each wait and use time to `acquire_times` (a deque append, where the
    SDK's ``record()`` costs several microseconds, twice per acquire); they are recorded when
    the reader collects, or sooner, once `DRAIN_AT` are buffered, by a drain on the pool's
    event loop, `CHUNK` at a time (one callback each, so the loop is never held long), until
    the buffer is empty. Nothing is dropped at any acquire rate or collection interval, and
    memory stays bounded even when nothing collects (see `MAX_BUFFERED`).
    """

    def __init__(self, histograms: tuple[Any, Any, Any] | None, attributes: dict[str, str]) -> None:
        self._attributes = attributes
        self._create: Any = None
        self._wait: Any = None
        self._use: Any = None
        self._draining = False
        self.acquire_times: AcquireTimes | None = None
        if histograms is not None:
            self._create, self._wait, self._use = histograms
            self.acquire_times = AcquireTimes(self._spill, DRAIN_AT)

    def connection_created(self, seconds: float) -> None:
        if self._create is not None:
            self._create.record(seconds, self._attributes)

    def flush(self) -> None:
        """Record every buffered wait and use time into their histograms."""
        if self.acquire_times is not None:
            self._record(self.acquire_times, None)

    def _record(self, times: AcquireTimes, most: int | None) -> None:
        """Record the oldest `most` wait and use times buffered (None: all of them)."""
        for samples, histogram in ((times.waits, self._wait), (times.uses, self._use)):
            record, pop, attributes = histogram.record, samples.popleft, self._attributes
            count = len(samples) if most is None else min(most, len(samples))
            try:
                for _ in range(count):
                    record(pop(), attributes)
            except IndexError:  # a collection on the exporter's thread took the rest
                pass

    def _spill(self) -> None:
        # Called by the pool's release once `spill_at` use times are buffered.
        times = self.acquire_times
        assert times is not None
        if self._draining:
            # MAX_BUFFERED reached: releases outpace the drain (more than CHUNK a turn of the
            # loop). Record a chunk here, as the drain would have.
            self._record(times, CHUNK)
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # released off the event loop: nowhere to drain
            self._record(times, CHUNK)
            return
        self._draining = True
        times.spill_at = MAX_BUFFERED
        loop.call_soon(self._drain, loop)

    def _drain(self, loop: asyncio.AbstractEventLoop) -> None:
        times = self.acquire_times
        assert times is not None
        self._record(times, CHUNK)
        if times.waits or times.uses:
            loop.call_soon(self._drain, loop)
            return
        self._draining = False
        times.spill_at = DRAIN_AT


#: What a pool reports to one instrument: ``report(instrumentation, options)``.
Report = Callable[["PoolInstrumentation", CallbackOptions], Iterable[Observation]]


class _SharedInstruments:
    """The instruments of one meter, shared by every pool instrumented on it.

    OpenTelemetry's SDK registers each instrument name once per meter: a second pool's
    callbacks under the same names would be dropped (with a warning), its gauges never read
    and its buffered times never recorded. So each instrument is created once per meter, and
    its callback reports every pool instrumented there, each under its own pool name.
    """

    def __init__(self, meter: Meter) -> None:
        self.members: tuple[PoolInstrumentation, ...] = ()
        self._histograms: tuple[Any, Any, Any] | None = None
        self.instruments = [*self._pool_instruments(meter), *self._iam_instruments(meter)]

    def histograms(self, meter: Meter) -> tuple[Any, Any, Any]:
        """The create, wait and use time histograms, created on first use."""
        if self._histograms is None:
            self._histograms = _histograms(meter)
        return self._histograms

    def _each(self, report: Report) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def callback(options: CallbackOptions) -> Iterable[Observation]:
            # `members` is replaced, never changed in place: an exporter's thread reads a
            # consistent tuple.
            return [found for member in self.members for found in report(member, options)]

        return callback

    def _pool_instruments(self, meter: Meter) -> list[Any]:
        return [
            meter.create_observable_up_down_counter(
                "db.client.connection.count",
                [self._each(PoolInstrumentation._count)],
                unit="{connection}",
                description="The number of connections that are currently in state described "
                "by the state attribute.",
            ),
            meter.create_observable_up_down_counter(
                "db.client.connection.idle.max",
                [self._each(_gauge(lambda p: p.get_max_size()))],
                unit="{connection}",
                description="The maximum number of idle open connections allowed.",
            ),
            meter.create_observable_up_down_counter(
                "db.client.connection.idle.min",
                [self._each(_gauge(lambda p: p.get_min_size()))],
                unit="{connection}",
                description="The minimum number of idle open connections allowed.",
            ),
            meter.create_observable_up_down_counter(
                "db.client.connection.max",
                [self._each(_gauge(lambda p: p.get_max_size()))],
                unit="{connection}",
                description="The maximum number of open connections allowed.",
            ),
            meter.create_observable_up_down_counter(
                "db.client.connection.pending_requests",
                [self._each(_gauge(lambda p: p.stats().waiting_acquires))],
                unit="{request}",
                description="The number of current pending requests for an open connection.",
            ),
            meter.create_observable_counter(
                "db.client.connection.timeouts",
                [self._each(_gauge(_stat("acquire_timeouts")))],
                unit="{timeout}",
                description="The number of connection timeouts that have occurred trying to "
                "obtain a connection from the pool.",
            ),
        ]

    def _iam_instruments(self, meter: Meter) -> list[Any]:
        counters = (
            ("asyncpg_iam.tokens.signed", "{token}", "IAM tokens signed.", "tokens_signed"),
            (
                "asyncpg_iam.tokens.reused",
                "{token}",
                "Connects that presented a recently signed token again (token_reuse).",
                "token_reuses",
            ),
            (
                "asyncpg_iam.credentials.fetches",
                "{fetch}",
                "Fetches from the AWS credential source, successful or not.",
                "credential_fetches",
            ),
            (
                "asyncpg_iam.connects.rate_limited",
                "{connect}",
                "Login attempts that waited for max_connect_rate.",
                "connects_rate_limited",
            ),
            (
                "asyncpg_iam.topology.refreshes",
                "{refresh}",
                "Aurora topology queries answered (0 for a pool on DNS only).",
                "topology_refreshes",
            ),
            (
                "asyncpg_iam.bluegreen.holds",
                "{hold}",
                "Blue/green switchovers that held new connects and acquires.",
                "blue_green_holds",
            ),
            (
                "asyncpg_iam.bluegreen.hold_timeouts",
                "{hold}",
                "Blue/green holds ended by their bound before the switch ended.",
                "blue_green_hold_timeouts",
            ),
            (
                "asyncpg_iam.bluegreen.reroutes",
                "{connection}",
                "New connections sent to green's address after a blue/green switchover.",
                "blue_green_reroutes",
            ),
            (
                "asyncpg_iam.bluegreen.fallback_refusals",
                "{login}",
                "Logins green refused while the pool found the name it accepts.",
                "blue_green_fallback_refusals",
            ),
            (
                "asyncpg_iam.hosts.silent",
                "{host}",
                "Hosts declared silent: no answer to the health check's probes.",
                "silent_hosts",
            ),
            (
                "asyncpg_iam.health.probes",
                "{probe}",
                "Health-check probes sent (a TCP connection each, no login).",
                "health_probes",
            ),
        )
        instruments: list[Any] = [
            meter.create_observable_counter(
                name, [self._each(_gauge(_stat(field)))], unit=unit, description=description
            )
            for name, unit, description, field in counters
        ]
        instruments += [
            meter.create_observable_counter(
                "asyncpg_iam.credentials.fetch_failures",
                [self._each(_gauge(_stat("credential_fetch_failures")))],
                unit="{fetch}",
                description="Fetches from the AWS credential source that failed.",
            ),
            meter.create_observable_counter(
                "asyncpg_iam.auth.failures",
                [self._each(PoolInstrumentation._refused)],
                unit="{login}",
                description="Logins the database refused (IAMAuthenticationError), by the most "
                "likely cause the diagnosis names.",
            ),
            meter.create_observable_counter(
                "asyncpg_iam.connections.closed",
                [self._each(PoolInstrumentation._closed)],
                unit="{connection}",
                description="Connections closed, by reason (max_lifetime: retired by the "
                "recycler; failover; topology; discarded_on_acquire; silent_host; other).",
            ),
            meter.create_observable_up_down_counter(
                "asyncpg_iam.connections.by_instance",
                [self._each(PoolInstrumentation._by_instance)],
                unit="{connection}",
                description="Open connections per Aurora instance the topology routed them to "
                "(asyncpg_iam.instance.id).",
            ),
            meter.create_observable_gauge(
                "asyncpg_iam.bluegreen.phase",
                [self._each(PoolInstrumentation._phase)],
                unit="1",
                description="The blue/green phase the pool saw last: 0 no deployment, 1 "
                "created, 2 switchover initiated, 3 in progress, 4 post-processing, 5 "
                "completed (absent when the pool does not follow switchovers).",
            ),
            meter.create_observable_gauge(
                "asyncpg_iam.credentials.expiry",
                [self._each(PoolInstrumentation._expiry)],
                unit="s",
                description="Seconds until the cached AWS credentials expire (absent for "
                "credentials that never expire).",
            ),
        ]
        return instruments


class PoolInstrumentation:
    """The instruments of one pool; `uninstrument()` stops recording and reporting."""

    def __init__(self, pool: Pool, meter: Meter, *, histograms: bool = True) -> None:
        self.pool = pool
        self._attributes = {POOL_NAME: pool.name}
        shared = _SHARED.get(meter)
        if shared is None:
            shared = _SHARED[meter] = _SharedInstruments(meter)
        self._shared = shared
        self._recorder = _Recorder(
            shared.histograms(meter) if histograms else None, self._attributes
        )
        pool.set_observer(self._recorder)
        shared.members = (*shared.members, self)

    def uninstrument(self) -> None:
        """Stop recording: the pool's observer is removed and callbacks report nothing.

        The wait and use times still buffered are recorded first, at once: fewer than
        `DRAIN_AT` pairs (about 50 ms of CPU at the SDK's 6.5 us a sample) unless releases
        outpace the drain, and never more than `MAX_BUFFERED`. Call it where such a pause of
        the event loop does no harm, at shutdown for instance.
        """
        shared = self._shared
        shared.members = tuple(member for member in shared.members if member is not self)
        self._recorder.flush()
        if self.pool.observer is self._recorder:
            self.pool.set_observer(None)

    # -- what this pool reports to each shared instrument ------------------------------------

    def _count(self, _options: CallbackOptions) -> Iterable[Observation]:
        # A collection has begun (the SDK runs callbacks before it reads the histograms):
        # hand the buffered samples over first.
        self._recorder.flush()
        pool = self.pool
        size, idle = pool.get_size(), pool.get_idle_size()
        return [
            Observation(idle, {**self._attributes, STATE: "idle"}),
            Observation(max(size - idle, 0), {**self._attributes, STATE: "used"}),
        ]

    def _closed(self, _options: CallbackOptions) -> Iterable[Observation]:
        closed = {reason: 0 for reason in CLOSE_REASONS}
        closed.update(self.pool.stats().connections_closed)
        return [
            Observation(count, {**self._attributes, CLOSE_REASON: reason})
            for reason, count in sorted(closed.items())
        ]

    def _by_instance(self, _options: CallbackOptions) -> Iterable[Observation]:
        counts = self.pool.stats().connections_by_instance
        return [
            Observation(count, {**self._attributes, INSTANCE: instance})
            for instance, count in sorted(counts.items())
        ]

    def _refused(self, _options: CallbackOptions) -> Iterable[Observation]:
        by_cause = dict.fromkeys(AUTH_CAUSES, 0)
        by_cause.update(self.pool.stats().auth_failures_by_cause)
        return [
            Observation(count, {**self._attributes, AUTH_CAUSE: cause})
            for cause, count in sorted(by_cause.items())
        ]

    def _phase(self, _options: CallbackOptions) -> Iterable[Observation]:
        phase = self.pool.stats().blue_green_phase
        if phase is None:
            return []
        return [Observation(BLUE_GREEN_PHASES.index(phase), self._attributes)]

    def _expiry(self, _options: CallbackOptions) -> Iterable[Observation]:
        expiry = self.pool.stats().credentials_expiry
        if expiry is None:
            return []
        left = (expiry - self.pool.clock.now()).total_seconds()
        return [Observation(left, self._attributes)]


# PoolStats.blue_green_phase's values, in the order of the switchover (the gauge's values).
BLUE_GREEN_PHASES = ("not_created", "created", "preparation", "in_progress", "post", "completed")


def _stat(field: str) -> Any:
    return lambda pool: getattr(pool.stats(), field)


def _gauge(read: Callable[[Pool], Any]) -> Report:
    def report(member: PoolInstrumentation, _options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(read(member.pool), member._attributes)]

    return report


#: The instruments of each meter, and the meter of each provider (a proxy provider, the global
#: one before an SDK is set, makes a new meter on every call): held weakly.
_SHARED: weakref.WeakKeyDictionary[Any, _SharedInstruments] = weakref.WeakKeyDictionary()
_METERS: weakref.WeakKeyDictionary[Any, Meter] = weakref.WeakKeyDictionary()


def instrument_pool(
    pool: Pool, meter_provider: MeterProvider | None = None, *, histograms: bool = True
) -> PoolInstrumentation:
    """Report `pool`'s metrics through `meter_provider` (default: the global one).

    With `histograms` False the three time histograms are not recorded: the OpenTelemetry
    SDK's ``record`` costs tens of microseconds, twice per acquire (see the benchmark), and
    the counters and gauges cost nothing per acquire. Returns the instrumentation; call its
    `uninstrument()` when the pool closes (or keep it: a closed pool reports zeros).
    """
    if not isinstance(pool, Pool):
        raise ConfigurationError(
            f"instrument_pool takes an asyncpg_iam.Pool, not {type(pool).__name__}"
        )
    provider = meter_provider or metrics.get_meter_provider()
    try:
        version = importlib.metadata.version("asyncpg-iam")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - a source checkout
        version = None
    meter = _METERS.get(provider)
    if meter is None:
        meter = _METERS[provider] = provider.get_meter("asyncpg_iam", version)
    return PoolInstrumentation(pool, meter, histograms=histograms)
