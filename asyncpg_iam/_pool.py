"""`Pool`, an `asyncpg.Pool` that signs a fresh IAM token for every new connection.

Per connect the password is a callable bound to the host and port being dialled: it takes
frozen credentials from the cache and signs (microseconds, no I/O in the steady state). Every
connection lives at most `max_lifetime` seconds (see `_lifetime`), new connections are
rate-limited with `max_connect_rate`, and a refused login becomes an `IAMAuthenticationError`
that says what was signed for whom and what most likely went wrong.
"""

from __future__ import annotations

import array
import asyncio
import functools
import logging
import time
import weakref
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import asyncpg
import asyncpg.pool

from . import _asyncpg_pool, _proxy
from ._asyncpg_pool import AsyncpgPool, holder_of, waiting_acquires
from ._auth import IAMAuth, TokenProvider, auth_from
from ._bluegreen import BlueGreenMonitor, blue_green_settings
from ._clock import SYSTEM_CLOCK, Clock, SystemClock
from ._connect import Connector, check_keywords, plan_connect
from ._dsql import UNSET, Unset, limits
from ._errors import ConfigurationError
from ._failover import FailoverGuard
from ._health import (
    DEFAULT_HEALTH_CHECK,
    Address,
    HealthCheck,
    HealthMonitor,
    check_health_option,
)
from ._lifetime import Recycler
from ._options import PoolOptions
from ._signing import is_cluster_endpoint

if TYPE_CHECKING:
    from ._acquire_times import AcquireTimes  # made by an observer (otel) only
    from ._pool_stats import PoolSettings, PoolStats
    from ._switchover import BlueGreenSettings, Resolver
    from ._topology import AuroraTopology, TopologyMonitor

__all__ = ["Pool", "PoolObserver", "PoolSettings", "PoolStats", "create_pool"]

logger = logging.getLogger("asyncpg_iam.pool")


T = TypeVar("T")

# asyncpg.create_pool's keyword-only parameters and their defaults (as `_connect`'s
# `_CONNECT_DEFAULTS` says why not from `inspect.signature`).
_POOL_DEFAULTS: dict[str, Any] = dict(asyncpg.create_pool.__kwdefaults__ or {})
# How long closing a connection found due on acquire may take before it is terminated.
_DISCARD_CLOSE_TIMEOUT = 5.0
# The keywords Pool takes besides asyncpg's.
_POOL_KEYWORDS = (
    "iam",
    "max_lifetime",
    "max_lifetime_jitter",
    "max_connect_rate",
    "name",
    "clock",
    "topology",
    "blue_green",
    "health_check",
)


class PoolObserver(Protocol):
    """What a pool reports to an observer installed with `Pool.set_observer`.

    Durations are seconds on the pool's clock. Called on the event loop; must not block or
    raise. Acquires and releases call nothing: while `acquire_times` is not None the pool
    appends each acquire's wait and each connection's use to it, for the observer to read
    when it likes (see `AcquireTimes`).
    """

    acquire_times: AcquireTimes | None
    """Where the pool records wait and use times (None: it records none)."""

    def connection_created(self, seconds: float) -> None:
        """A new connection was opened (login, init) in `seconds`."""


class _Counters:
    __slots__ = ("handed_out_due", "opened")

    def __init__(self) -> None:
        self.opened = 0
        self.handed_out_due = 0


class Pool(AsyncpgPool):
    """An `asyncpg.Pool` with IAM tokens, max-lifetime recycling and a connect rate limit.

    Create it with `create_pool()`; it is awaitable and an async context manager, and every
    asyncpg pool method works unchanged. `clock` is where tokens, lifetimes and the connect
    rate limit get their time (tests pass a skewed or manual one).
    """

    def __init__(
        self,
        dsn: str | None = None,
        *,
        iam: bool | IAMAuth = True,
        max_lifetime: float | Unset | None = UNSET,
        max_lifetime_jitter: float = 0.1,
        max_connect_rate: float | Unset | None = UNSET,
        name: str | None = None,
        clock: Clock = SYSTEM_CLOCK,
        topology: bool | AuroraTopology = True,
        blue_green: bool | BlueGreenSettings | None = None,
        health_check: HealthCheck | None = DEFAULT_HEALTH_CHECK,
        **kwargs: Any,
    ) -> None:
        _asyncpg_pool.reserve_hooks(self)  # first: see `_asyncpg_pool.shadow`
        auth = auth_from(iam)
        health = check_health_option(health_check)
        pool_kwargs = {k: kwargs.pop(k, default) for k, default in _POOL_DEFAULTS.items()}
        check_keywords(kwargs, what="create_pool()", pool=_POOL_DEFAULTS, own=_POOL_KEYWORDS)
        user_connect = pool_kwargs.pop("connect") or asyncpg.connect
        # The one plan assembly (DSQL and writer defaults, TLS); then the limits it implies.
        plan = plan_connect(dsn, kwargs, auth=auth)
        lifetime, rate = limits(plan.dsql, max_lifetime, max_connect_rate)
        options = PoolOptions(lifetime, max_lifetime_jitter, rate)
        self._connector = Connector(
            plan,
            provider=TokenProvider(auth, clock=clock) if auth is not None else None,
            max_connect_rate=options.max_connect_rate,
            name=name,
            clock=clock,
            connect=user_connect,
        )
        if self._connector.plan.rds_proxy:
            _proxy.warn_session_state(self._connector.name, pool_kwargs)
        self._clock = clock
        self._counters = _Counters()
        self._max_lifetime = options.max_lifetime
        self._name = self._connector.name
        self._warned_due_on_handout = False
        self._observer: PoolObserver | None = None
        self._acquire_times = None
        self._acquire_gate = None
        self._acquire_timeouts = 0
        # Login times of connections opened before an observer came: the first one gets them
        # (8 bytes each, at most 1,024).
        self._unobserved_creates = array.array("d")
        self._start_upkeep(options)
        try:
            # The connection arguments live in the connector; asyncpg's own are never used.
            # asyncpg calls the failover guard's `open` for each new connection (it holds the
            # pool weakly: no reference cycle).
            super().__init__(connect=self._failover.open, **pool_kwargs)
        except (ValueError, TypeError) as exc:  # asyncpg's checks of min_size, max_size, ...
            raise ConfigurationError(f"invalid pool settings: {exc}") from exc
        self._topology_setting = topology
        self._topology_start: asyncio.Task[None] | None = None
        self._topology = self._start_topology(topology)
        bg = blue_green_settings(blue_green, self._connector)
        self._bluegreen = None if bg is None else _blue_green_monitor(self, bg)
        if self._bluegreen is not None:
            self._bluegreen.start()  # the first connection released checks for metadata
            self._connector.stop_with(self._bluegreen.stop)
        self._health = self._start_health(health)
        if self._health is not None:
            self._connector.stop_with(self._health.stop)
        self._refill_task: asyncio.Task[None] | None = None
        self._shutdown_task: asyncio.Task[None] | None = None

    def __enter__(self) -> None:
        raise TypeError(f"a pool is an async context manager: {_asyncpg_pool.NOT_STARTED}")

    def __exit__(self, *exc_info: object) -> None:  # pragma: no cover - __enter__ raises
        return None

    def _start_upkeep(self, options: PoolOptions) -> None:
        """Make the lifetime recycler and the failover guard (both hold the pool weakly)."""
        self._recycler = Recycler(
            self,
            max_lifetime=options.max_lifetime,
            jitter=options.max_lifetime_jitter,
            # The recycler counts closes; the pool hears of them only to refill (asyncpg
            # < 0.32): nothing more on every connect.
            on_closed=(
                None
                if _asyncpg_pool.REFILLS_MIN_SIZE
                else weakref.WeakMethod(self._on_connection_closed)
            ),
            clock=self._clock,
        )
        # The acquire check's two lookups, bound once (see AsyncpgPool._acquire).
        self._deadline_of = self._recycler.deadlines.get
        # The system clock's monotonic() is time.monotonic(): call that without the wrapper.
        clock = self._clock
        self._now = time.monotonic if type(clock) is SystemClock else clock.monotonic
        self._failover = _failover_guard(weakref.ref(self), self._connector, self._recycler, clock)

    def _start_health(self, settings: HealthCheck | None) -> HealthMonitor | None:
        """Make the silent-host monitor (it starts with the first connection)."""
        if settings is None:
            return None
        ref = weakref.ref(self)
        monitor = HealthMonitor(
            settings,
            hosts_in_use=functools.partial(_hosts_in_use, ref),
            on_silent=functools.partial(_on_silent_host, ref),
            name=self._name,
            clock=self._clock,
        )
        self._connector.login_gate = monitor.login_gate
        return monitor

    @property
    def health_check(self) -> HealthCheck | None:
        """The silent-host detection settings (None: off)."""
        return self._health.settings if self._health is not None else None

    def _retire_host(self, host: Address) -> int:
        """Terminate every connection on `host`: idle ones at once, so none is handed out;
        queries in flight fail with `ConnectionDoesNotExistError`."""
        health = self._health
        assert health is not None
        retired = 0
        for holder, con, idle in _asyncpg_pool.open_holders(self):
            if health.address_of(con) != host:
                continue
            retired += 1
            self._recycler.retire_on_release(holder, "silent_host")
            if idle:
                _asyncpg_pool.terminate_idle(holder, con)
            else:
                con.terminate()  # the caller's query fails now; asyncpg cleans up on release
        return retired

    def _start_topology(self, setting: bool | AuroraTopology) -> TopologyMonitor | None:
        """Route connects by the Aurora cluster's topology (see `_topology`), where it applies."""
        targets = self._connector.targets
        if setting is False or (
            setting is True
            and not (len(targets) == 1 and is_cluster_endpoint(targets[0].signing_host))
        ):
            # Off, or no Aurora cluster name to route by (`topology_for` would keep DNS too): a
            # pool on an instance endpoint, an IP address or without IAM never loads `_topology`.
            return None
        from ._topology import topology_for

        monitor = topology_for(
            self._connector,
            setting,
            retire=_bound_retire(weakref.ref(self)),
            name=self._name,
            clock=self._clock,
        )
        if monitor is not None:
            monitor.follow(self._failover)
        return monitor

    def _replan_topology(self) -> None:
        """Route by the new plan's cluster (or by DNS) after `set_connect_args`."""
        old = self._topology
        if old is not None:
            old.close()
            self._connector.router = None
            self._failover.on_event = self._failover.on_lost = None
        self._topology = self._start_topology(self._topology_setting)
        if self._topology is not None and _asyncpg_pool.initialized(self):
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return  # no loop: its router has no topology and connects go through DNS
            self._topology_start = loop.create_task(self._topology.start())

    # -- introspection ---------------------------------------------------------------------

    @property
    def name(self) -> str:
        """The pool's name, used in its repr and log lines (``user@host:port`` by default)."""
        return self._name

    @property
    def iam(self) -> IAMAuth | None:
        """The IAM settings, or None for a pool without IAM."""
        return self._connector.auth

    @property
    def settings(self) -> PoolSettings:
        """The effective connection settings and limits (see `PoolSettings`)."""
        from ._pool_stats import PoolSettings

        connector = self._connector
        plan = connector.plan
        return PoolSettings(
            endpoints=plan.endpoints,
            user=plan.user,
            database=plan.database,
            tls_mode=plan.tls.mode,
            tls_mode_source=plan.tls.mode_source,
            ca_source=plan.tls.ca_source,
            target_session_attrs=plan.target_session_attrs,
            signing_targets=connector.targets,
            max_lifetime=self._max_lifetime,
            max_connect_rate=connector.max_connect_rate,
        )

    def stats(self) -> PoolStats:
        """Return a snapshot of the pool's counters."""
        from ._pool_stats import PoolStats

        counters = self._counters
        connects = self._connector.counters
        provider = self._connector.provider
        cached = provider.credentials.peek() if provider is not None else None
        return PoolStats(
            connections_opened=counters.opened,
            connections_closed=dict(self._recycler.closed),
            connect_attempts=connects.attempts,
            connect_failures=connects.failures,
            auth_failures=connects.auth_failures,
            tokens_signed=provider.tokens_signed if provider else 0,
            token_reuses=provider.token_reuses if provider else 0,
            credential_fetches=provider.credentials.fetches if provider else 0,
            connects_rate_limited=connects.rate_limited,
            handed_out_due=counters.handed_out_due,
            open_connections=self.get_size(),
            failover_events=self._failover.events,
            failover_retired=self._failover.retired,
            read_only_retries=self._failover.read_only_retries,
            connect_retries=self._failover.connect_retries,
            auth_failures_by_cause=dict(connects.auth_failures_by_cause),
            credential_fetch_failures=provider.credentials.fetch_failures if provider else 0,
            credentials_expiry=cached.expiry if cached is not None else None,
            acquire_timeouts=self._acquire_timeouts,
            waiting_acquires=waiting_acquires(self) if _asyncpg_pool.initialized(self) else 0,
            silent_hosts=self._health.silent_events if self._health is not None else 0,
            health_probes=self._health.probes if self._health is not None else 0,
            topology_refreshes=self._topology.refreshes if self._topology else 0,
            connections_by_instance=(
                dict(self._topology.router.connections_by_instance()) if self._topology else {}
            ),
            **_blue_green_stats(self._bluegreen),
        )

    def __repr__(self) -> str:
        return (
            f"<asyncpg_iam.Pool {self._name!r} iam={self._connector.auth is not None} "
            f"max_lifetime={self._max_lifetime} size={self.get_size()}"
            f"/{self.get_max_size()}>"
        )

    @property
    def clock(self) -> Clock:
        """The clock the pool's tokens, lifetimes, rate limit and backoff read."""
        return self._clock

    @property
    def observer(self) -> PoolObserver | None:
        """The observer installed with `set_observer`, or None."""
        return self._observer

    def set_observer(self, observer: PoolObserver | None) -> None:
        """Install `observer` (None removes it): a hook for metrics, see `asyncpg_iam.otel`.

        Without one, or with one that wants no acquire times, acquires and releases do no
        extra work but one attribute check each. An observer installed after the pool opened
        connections is told their login times first (up to 1,024).
        """
        self._observer = observer
        times = observer.acquire_times if observer is not None else None
        self._acquire_times = times  # read by acquire() and release()
        _asyncpg_pool.observe_new_connections(
            self, None if observer is None else _observed_connect(weakref.ref(self), observer)
        )
        if observer is not None:
            history, self._unobserved_creates = self._unobserved_creates, array.array("d")
            for seconds in history:
                observer.connection_created(seconds)

    def set_connect_args(self, dsn: str | None = None, **connect_kwargs: Any) -> None:
        """Use new connection arguments for the connections opened from now on.

        They are planned and checked exactly as `create_pool`'s (TLS policy included); a
        refused change raises `ConfigurationError` before anything is sent and leaves the
        previous arguments in force. Open connections stay until they are retired; call
        `expire_connections()` to replace them sooner.
        """
        self._connector.use_plan(plan_connect(dsn, connect_kwargs, auth=self._connector.auth))
        self._replan_topology()

    # -- connecting ------------------------------------------------------------------------

    def _connection_opened(self, con: Any, started: float, epoch: int) -> None:
        """Count a connection whose login succeeded; `_adopt` watches and tracks it in the
        event loop's next iteration.

        `started` is the clock time the login began, `epoch` the failover guard's epoch then.
        The connection is handed out first: its bookkeeping (about 50 us of CPU, run cold
        between two TLS handshakes) then runs while the caller's first query is in flight,
        not before the caller gets the connection. Nothing is lost in between: every server
        reply is read after it (the loop runs what was scheduled before what arrived), and
        `_adopt` closes the books of a connection that closed before it ran.
        """
        self._counters.opened += 1
        # The login's end, for the observer's history (an observer times its own logins).
        ended = self._now() if self._observer is None else None
        asyncio.get_running_loop().call_soon(self._adopt, con, started, epoch, ended)

    def _adopt(self, con: Any, started: float, epoch: int, ended: float | None) -> None:
        """Watch and track a connection opened by the pool (see `_connection_opened`), whose
        login began at clock time `started`; `ended`, when no observer timed the login, is
        when it ended."""
        lost = self._failover.watch(con, epoch)
        # The lifetime starts at the login, so connect and init time count against it (with
        # none once the pool is closing: `Recycler.cancel`).
        recycler = self._recycler
        recycler.track(con, started, also=lost)
        if con.is_closed():
            # Closed (by its user, the server or the pool) before this ran: asyncpg has called
            # its termination listeners, so the listener just added is called here.
            _asyncpg_pool.call_termination_listeners(con)
        else:
            if recycler.is_due(con):
                # Due already: it came due during its own login. Handed out before its
                # deadline was known (otherwise the acquire's check sees it), it is used once
                # and closed on release, as `_retire_due` does.
                holder = _asyncpg_pool.find_holder(self, con)
                if holder is not None and _asyncpg_pool.handed_out(holder):
                    recycler.retire_on_release(holder)
                    self._note_due_on_handout()
            if self._health is not None and not self.is_closing():
                self._health.track(con)
            if logger.isEnabledFor(logging.DEBUG):
                logger.debug(
                    "pool %s: opened connection (pid %s)", self._name, con.get_server_pid()
                )
        if ended is not None:  # last: an observer that raises leaves the rest done
            observer = self._observer
            if observer is not None:  # installed since: it has had the history already
                observer.connection_created(ended - started)
            elif len(self._unobserved_creates) < 1024:
                self._unobserved_creates.append(ended - started)

    async def run_transaction(
        self,
        fn: Callable[[Any], Awaitable[T]],
        *,
        retries: int = 5,
        backoff: float = 0.02,
        max_backoff: float = 1.0,
        isolation: str | None = None,
        timeout: float | None = None,
    ) -> T:
        """Run ``await fn(connection)`` in a transaction, retrying serialization conflicts.

        See `asyncpg_iam.run_transaction`; backoff waits on the pool's clock.
        """
        from ._retry import run_transaction

        return await run_transaction(
            self,
            fn,
            retries=retries,
            backoff=backoff,
            max_backoff=max_backoff,
            isolation=isolation,
            timeout=timeout,
            clock=self._clock,
        )

    # -- lifetime --------------------------------------------------------------------------

    async def _retire_due(self, proxy: Any, opened_now: bool) -> bool:
        """Deal with a due connection on acquire: True when it was retired (acquire another).

        Called by the acquire (see `AsyncpgPool._acquire`) when `proxy`'s connection is past
        its deadline; `opened_now` says whether this acquire opened it.
        """
        holder = holder_of(proxy)
        if opened_now:
            # It came due before it could be handed out (its connect, init or setup took
            # that long): hand it out once rather than loop forever; it closes on release.
            self._recycler.retire_on_release(holder)
            self._note_due_on_handout()
            return False
        # Due while it waited to be handed out: retire it; the acquire tries again (within its
        # timeout, if it has one: the close goes on in the background if that runs out).
        self._recycler.retire_on_release(holder, "discarded_on_acquire")
        await super().release(proxy, timeout=_DISCARD_CLOSE_TIMEOUT)
        return True

    def _note_due_on_handout(self) -> None:
        self._counters.handed_out_due += 1
        if not self._warned_due_on_handout:
            self._warned_due_on_handout = True
            logger.warning(
                "pool %s: a connection reached max_lifetime (%s s) before it was handed out: "
                "connecting plus init and setup took longer than its lifetime. It is used "
                "once and closed on release; raise max_lifetime or make setup/init faster",
                self._name,
                self._max_lifetime,
            )

    def _on_connection_closed(self, _reason: str) -> None:
        self._schedule_refill()

    def _schedule_refill(self) -> None:
        if (
            self._refill_task is not None
            or self.is_closing()
            or not _asyncpg_pool.initialized(self)
            or self.get_min_size() == 0
        ):
            return
        self._refill_task = asyncio.get_running_loop().create_task(
            _refill(weakref.ref(self)), name=f"asyncpg_iam refill {self._name}"
        )

    # -- opening and closing ---------------------------------------------------------------

    async def _start(self) -> Any:
        # asyncpg's _async__init__ (see _asyncpg_pool).
        starting = not _asyncpg_pool.initialized(self)
        try:
            if starting and self._topology is not None:
                await self._topology.start()  # the first connects already go by it
            result = await self.asyncpg_start()
            if starting:
                # The first connections' bookkeeping (`_adopt`, scheduled as each login
                # finished) is done before the pool is handed over.
                await asyncio.sleep(0)
        except BaseException:
            # The caller never gets the pool: release the credential cache now.
            self._recycler.cancel()
            await self._shutdown()
            raise
        if starting:
            logger.info(
                "pool %s: ready with %d connection(s) (min_size=%d, max_size=%d, iam=%s, "
                "max_lifetime=%s)",
                self._name,
                self.get_size(),
                self.get_min_size(),
                self.get_max_size(),
                self._connector.provider.credentials.source
                if self._connector.provider is not None
                else "off",
                self._max_lifetime,
            )
        return result

    def _stop_monitors(self) -> None:
        """Stop connecting: no connect starts from now on, and the background monitors stop
        (blue/green and health through the connector, which runs their stops; the topology)."""
        self._connector.stop()
        if self._topology is not None:
            self._topology.close()

    async def close(self) -> None:
        """Wait for every connection to be released, close them all, then the pool."""
        self._recycler.cancel()
        self._stop_monitors()
        try:
            await super().close()
        finally:
            await self._shutdown()
            if logger.isEnabledFor(logging.INFO):  # the snapshot only for a log that shows it
                logger.info("pool %s: closed; %s", self._name, self.stats())

    def terminate(self) -> None:
        """Terminate every connection at once (no waiting for them to be released)."""
        self._recycler.cancel()
        self._stop_monitors()
        super().terminate()
        if self._refill_task is not None:
            self._refill_task.cancel()
        if self._connector.provider is not None and self._shutdown_task is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return  # no loop to close the credential cache on: it holds no connection
            self._shutdown_task = loop.create_task(self._shutdown())

    async def _shutdown(self) -> None:
        if self._refill_task is not None:
            self._refill_task.cancel()
        if self._topology is not None:
            await self._topology.aclose()
        if self._topology_start is not None:
            self._topology_start.cancel()
        await self._connector.aclose()  # idempotent


def _failover_guard(
    pool_ref: weakref.ref[Pool], connector: Connector, recycler: Recycler, clock: Clock
) -> FailoverGuard:
    """Make the pool's failover guard; its callbacks hold the pool weakly (no cycle)."""

    def opened(con: Any, started: float, epoch: int) -> None:
        pool = pool_ref()
        if pool is not None:
            pool._connection_opened(con, started, epoch)

    def retire_all() -> int:
        pool = pool_ref()
        if pool is None:
            return 0
        return _asyncpg_pool.retire_connections(pool, mark_retired)

    def closing() -> bool:
        pool = pool_ref()
        return pool is None or pool.is_closing()

    def started() -> bool:
        pool = pool_ref()
        return pool is not None and _asyncpg_pool.initialized(pool)

    mark_retired = functools.partial(recycler.retire_on_release, reason="failover")
    return FailoverGuard(
        connector=connector,
        opened=opened,
        retire_all=retire_all,
        closing=closing,
        started=started,
        name=connector.name,
        clock=clock,
    )


# What a blue/green switchover needs of the pool: retire every connection, and hold acquires
# while the switch is in progress (`_asyncpg_pool.hold_acquires`: one test per acquire without
# a switch).
def _blue_green_monitor(pool: Pool, settings: tuple[float, Resolver | None]) -> BlueGreenMonitor:
    pool_ref = weakref.ref(pool)

    def retire() -> int:
        live = pool_ref()
        if live is None:
            return 0
        return live._failover.retire_now("blue_green_switchover")

    def hold_acquires(gate: Callable[[], Awaitable[None]] | None) -> None:
        live = pool_ref()
        if live is not None:
            _asyncpg_pool.hold_acquires(live, gate)

    def arm_reset(check: Callable[[Any, Any], Awaitable[None]]) -> None:
        live = pool_ref()
        if live is not None:  # the check rides on the reset's round trip
            _asyncpg_pool.reset_once(live, check)

    return BlueGreenMonitor(
        pool,
        connector=pool._connector,
        retire=retire,
        hold_acquires=hold_acquires,
        arm_reset=arm_reset,
        hold=settings[0],
        resolver=settings[1],
        clock=pool._clock,
        name=pool._name,
    )


def _blue_green_stats(monitor: BlueGreenMonitor | None) -> dict[str, Any]:
    """Return the `PoolStats` fields of a pool's blue/green monitor (None: it has none)."""
    if monitor is None:
        return {}
    counters = monitor.counters
    return {
        "blue_green_phase": monitor.phase_name(),
        "blue_green_holds": counters.switchovers,
        "blue_green_hold_timeouts": counters.holds_timed_out,
        "blue_green_reroutes": counters.rerouted,
        "blue_green_fallback_refusals": counters.fallback_refusals,
    }


def _observed_connect(
    pool_ref: weakref.ref[Pool], observer: PoolObserver
) -> Callable[[], Coroutine[Any, Any, Any]]:
    """Return asyncpg's new-connection hook while `observer` is installed: each login timed
    for it. Holds the pool weakly (it is stored on the pool)."""

    async def new_connection() -> Any:
        pool = pool_ref()
        if pool is None:
            raise asyncpg.InterfaceError("the pool was garbage-collected")
        clock = pool._clock
        started = clock.monotonic()
        con = await pool.asyncpg_new_connection()
        observer.connection_created(clock.monotonic() - started)
        return con

    return new_connection


def _bound_retire(
    pool_ref: weakref.ref[Pool],
) -> Callable[[Callable[[Any], bool], bool, int | None], int]:
    """Return the topology monitor's retire callback, holding the pool weakly."""

    def retire(where: Callable[[Any], bool], idle_only: bool, limit: int | None) -> int:
        pool = pool_ref()
        if pool is None or pool.is_closing() or not _asyncpg_pool.initialized(pool):
            return 0
        mark = functools.partial(pool._recycler.retire_on_release, reason="topology")
        return _asyncpg_pool.retire_connections(pool, mark, where, idle_only=idle_only, limit=limit)

    return retire


def _hosts_in_use(pool_ref: weakref.ref[Pool]) -> set[Address]:
    """The health monitor's view of a pool: the hosts its connections in use are on."""
    pool = pool_ref()
    if pool is None or pool.is_closing():
        raise asyncpg.InterfaceError("the pool is closed")
    health = pool._health
    assert health is not None
    hosts = set()
    for _, con, idle in _asyncpg_pool.open_holders(pool):
        if not idle and (host := health.address_of(con)) is not None:
            hosts.add(host)
    return hosts


def _on_silent_host(pool_ref: weakref.ref[Pool], host: Address, label: str, cause: str) -> None:
    """Retire what a silent host holds: on a writer pool, a failover (every connection)."""
    pool = pool_ref()
    if pool is None or pool.is_closing():
        return
    what = f"host {label} silent: {cause}"
    if pool._failover.wants_writer and pool._failover.report_now(what):
        pool._retire_host(host)  # those the failover left (connecting when it ran)
        return
    retired = pool._retire_host(host)
    logger.warning("pool %s: %s; retired %d connection(s) to it", pool.name, what, retired)


async def _refill(pool_ref: weakref.ref[Pool]) -> None:
    """Reconnect idle holders until the pool is back at min_size (asyncpg < 0.32 only).

    A failed reconnect is retried after a backoff on the pool's clock.
    """
    delay = 1.0
    try:
        while True:
            pool = pool_ref()
            if pool is None or pool.is_closing() or pool.get_size() >= pool.get_min_size():
                return
            holder = _asyncpg_pool.empty_idle_holder(pool)
            if holder is None:
                return  # every empty holder is being connected by an acquirer
            failed = False
            try:
                await _asyncpg_pool.reconnect(holder)
            except Exception:
                failed = True
                logger.warning(
                    "pool %s: refilling to min_size failed; retrying in %.0f s",
                    pool.name,
                    delay,
                    exc_info=True,
                )
            finally:
                _asyncpg_pool.put_back(pool, holder)
            clock = pool._clock
            del pool, holder  # not held across the wait
            if failed:
                await clock.sleep(delay)
                delay = min(delay * 2, 30.0)
            else:
                delay = 1.0
    finally:
        pool = pool_ref()
        if pool is not None:
            pool._refill_task = None


def create_pool(
    dsn: str | None = None,
    *,
    iam: bool | IAMAuth = True,
    max_lifetime: float | Unset | None = UNSET,
    max_lifetime_jitter: float = 0.1,
    max_connect_rate: float | Unset | None = UNSET,
    health_check: HealthCheck | None = DEFAULT_HEALTH_CHECK,
    **asyncpg_kwargs: Any,
) -> Pool:
    """Create an IAM-authenticated connection pool; await it (or ``async with`` it).

    Takes every argument of `asyncpg.create_pool` and `asyncpg.connect` (host, port, user,
    database, min_size, max_size, setup, init, reset, connect, server_settings, ...), plus:

    - `iam`: True signs tokens with the default AWS credential chain; an `IAMAuth` chooses the
      profile, role, region, signing endpoint and token reuse; False disables IAM (a plain
      pool that still recycles).
    - `max_lifetime`: no connection lives longer than this many seconds (None: forever);
      default 900 (3300 for Aurora DSQL, where it may not exceed 3600). Connections in use
      are never interrupted; they close when released.
    - `max_lifetime_jitter`: a connection that replaces one retired at its lifetime lives
      ``[max_lifetime * (1 - jitter), max_lifetime]``; any other (the pool filling up,
      growing, reconnecting after a drop) starts with a lifetime spread over the last 75 %
      of `max_lifetime`, so connections opened together do not come due together. 0 makes
      every lifetime exactly `max_lifetime`.
    - `max_connect_rate`: at most this many new connections per second (None: no limit);
      default no limit (50 per second for Aurora DSQL). The first connect after a quiet
      interval waits a random part of one interval, so pools that lose their connections
      together reconnect out of step.
    - `name`: the pool's name in logs and its repr.
    - `blue_green`: follow RDS Blue/Green switchovers (hold connects and acquires while one is
      in progress, then send the blue name to green; see `BlueGreenSettings`). None (the
      default) turns it on for an IAM pool on one RDS endpoint name, where it costs one
      catalog query on the first new connection when the database has no blue/green
      metadata; False turns it off.
    - `health_check`: how hosts that stop answering without closing their connections are
      found (`HealthCheck`: keepalive and ``TCP_USER_TIMEOUT`` on every socket, and a probe
      each second of the hosts with connections in use; no login). None turns it off.

    - `sslrootcert`: the CA file that verifies the server (``"system"``: the system store).

    An Aurora DSQL endpoint (``<id>.dsql.<region>.on.aws``, or ``IAMAuth(service="dsql")``)
    gets DSQL tokens, ``database="postgres"`` unless one is named, and verify-full TLS
    against the system store (``sslrootcert="system"``) unless TLS settings are given.

    With IAM, TLS defaults to verify-full (against the RDS CA bundle that ``asyncpg-iam
    ca-bundle`` caches, else the system store); verify-ca is accepted; sslmode
    disable/allow/prefer raise `ConfigurationError`, since the token could travel in clear, and
    so does require (no certificate check) unless ``IAMAuth(insecure_unverified_tls=True)``.
    The TLS settings (``ssl``, the DSN's, ``PGSSLMODE``, ``PGSSLROOTCERT``, ...) are read once,
    here: changing the environment later changes nothing.
    """
    return Pool(
        dsn,
        iam=iam,
        max_lifetime=max_lifetime,
        max_lifetime_jitter=max_lifetime_jitter,
        max_connect_rate=max_connect_rate,
        health_check=health_check,
        **asyncpg_kwargs,
    )
