"""SQLAlchemy's `AsyncEngine` with IAM tokens and max-lifetime recycling.

    from asyncpg_iam.sqlalchemy import create_async_engine

    engine = create_async_engine(
        "postgresql+asyncpg://app@app.cluster-abc.us-east-1.rds.amazonaws.com:5432/app",
        max_lifetime=900,
    )

Each new DBAPI connection is opened through SQLAlchemy's ``async_creator`` with a token signed
from the engine's credential cache, with the same TLS policy as `asyncpg_iam.create_pool`
(verify-full by default; sslmodes that could send the token in clear are refused) and the same
diagnosis of refused logins (`IAMAuthenticationError`). Lifetimes work as in the pool, within
what SQLAlchemy's pool allows:

* each connection gets a deadline drawn from ``[max_lifetime * (1 - jitter), max_lifetime]``;
* a connection that is due is never handed out: the ``checkout`` hook raises SQLAlchemy's
  `DisconnectionError`, which makes the pool discard it and connect anew;
* a connection in use is never interrupted; it is closed when it is checked in past its deadline;
* ``pool_recycle`` defaults to `max_lifetime`, as a backstop for anything the hooks miss.

SQLAlchemy's pool has no background reaper, so an idle connection past its deadline stays open
until it is next checked out (and then closed, not used). Pass ``pool_pre_ping=True`` to test
each connection on checkout as well.

The plan is the pool's (`asyncpg_iam.create_pool`'s defaults, Aurora DSQL's included), and so is
failover handling: on an Aurora cluster endpoint the engine wants the writer
(``target_session_attrs="read-write"`` unless chosen otherwise), a login that lands on a
read-only server is retried within the connect timeout, and once any connection shows a
failover (``25006`` on a writer engine, a shutdown, a dropped connection) every connection
opened before it is discarded at checkout or closed at checkin. On an Aurora cluster or reader
endpoint the engine follows the cluster's topology as the pool does (``topology=``): its first
connect reads it, and each new connection goes to the writer's (or a reader's) instance endpoint.
On an RDS name it follows a blue/green switchover as the pool does (``blue_green=``): new
connects and checkouts wait while the switch is in progress, then connections opened before
it are discarded and new ones go to green, signed for the name green accepts.
Needs the ``sqlalchemy`` extra.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import urllib.parse
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

try:
    from sqlalchemy import event
    from sqlalchemy.engine import URL, make_url
    from sqlalchemy.exc import DisconnectionError
    from sqlalchemy.ext.asyncio import AsyncEngine
    from sqlalchemy.ext.asyncio import create_async_engine as _sa_create_async_engine
    from sqlalchemy.util import await_only
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "asyncpg_iam.sqlalchemy needs SQLAlchemy 2: pip install 'asyncpg-iam[sqlalchemy]'"
    ) from exc


from ._auth import IAMAuth, TokenProvider, auth_from
from ._bluegreen import BlueGreenMonitor, blue_green_settings
from ._connect import Connector, check_keywords, plan_connect
from ._dsql import UNSET, Unset, limits
from ._errors import ConfigurationError, IAMAuthenticationError, SwitchoverTimeoutError
from ._failover import FailoverGuard
from ._health import (
    DEFAULT_HEALTH_CHECK,
    Address,
    HealthCheck,
    HealthMonitor,
    check_health_option,
)
from ._lifetime import draw_lifetime
from ._options import PoolOptions
from ._switchover import BlueGreenSettings
from ._tls import TLS_PARAMETERS
from ._topology import AuroraTopology, TopologyMonitor, topology_for

__all__ = ["create_async_engine"]

logger = logging.getLogger("asyncpg_iam.sqlalchemy")

# Where a connection's deadline (time.monotonic()) is kept in its pool record's `info`.
_DEADLINE = "asyncpg_iam.deadline"
# URL options of SQLAlchemy's asyncpg dialect that only its own creator applies.
_DIALECT_ONLY = ("prepared_statement_cache_size", "prepared_statement_name_func")


def _last(value: Any) -> str:
    """A URL query value given twice is a tuple: the last wins, as in a DSN."""
    return str(value[-1] if isinstance(value, tuple) else value)


def _plan_arguments(
    url: URL, connect_args: dict[str, Any] | None
) -> tuple[str | None, dict[str, Any]]:
    """Return what `plan_connect` takes for `url` and `connect_args`: a DSN holding the URL's
    libpq TLS parameters (``?sslmode=``, ``?sslrootcert=``, ...), which the plan's TLS policy
    reads as it reads a pool's DSN, and `asyncpg.connect` arguments, the rest of the URL as
    SQLAlchemy's dialect reads it."""
    check_keywords(connect_args or {}, what="connect_args")
    _args, params = url.get_dialect()().create_connect_args(url)
    params = dict(params)
    tls = {name: _last(params.pop(name)) for name in TLS_PARAMETERS if name in params}
    if "sslmode" in tls and ("ssl" in params or "ssl" in (connect_args or {})):
        raise ConfigurationError(
            f"sslmode={tls['sslmode']} in the URL and ssl= both choose the TLS mode: keep one"
        )
    check_keywords(
        {name: value for name, value in params.items() if name not in _DIALECT_ONLY},
        what="the URL's query",
    )
    for name in _DIALECT_ONLY:
        if name in params:
            raise ConfigurationError(
                f"{name} in the URL is applied by SQLAlchemy's own connect, which IAM replaces: "
                "drop it from the URL (asyncpg's statement_cache_size can go in connect_args)"
            )
    # Host, port, user and database come as arguments; a DSN without them names none.
    dsn = f"postgresql://?{urllib.parse.urlencode(tls)}" if tls else None
    return dsn, {**params, **(connect_args or {})}


class _EngineFailover:
    """The pool's failover handling for an engine: the same `FailoverGuard` on its connects.

    New connections land on the writer (read-only logins are retried within the connect
    timeout, as in the pool); a failover seen on any connection (``25006`` on a writer
    engine, a shutdown, a lost connection) retires every connection opened before it: the
    checkout hook discards them and the checkin hook closes the ones in use.
    """

    def __init__(self, connector: Connector) -> None:
        # Each open connection's epoch (the guard's when its login began).
        self.epochs: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()
        self.guard = FailoverGuard(
            connector=connector,
            opened=self._opened,
            retire_all=self._retire_all,
            closing=lambda: False,
            started=lambda: True,
            name=connector.name,
        )
        self.also_opened: Callable[[Any], None] | None = None
        """Called with each connection opened (the health check tracks it)."""
        self.first: Callable[[], Awaitable[None]] | None = None
        """What connects wait for until it is done once (the topology's first read)."""
        self.disposed = False
        """Set when the engine is disposed (the blue/green poller stops)."""

    def is_closing(self) -> bool:
        """Tell whether the engine was disposed (what the blue/green poller asks a pool)."""
        return self.disposed

    async def connect(self) -> Any:
        """Open a connection (SQLAlchemy's ``async_creator``)."""
        if self.first is not None:
            await asyncio.shield(self.first())
            self.first = None
        return await self.guard.open()

    def _opened(self, con: Any, _started: float, epoch: int) -> None:
        self.epochs[con] = epoch
        con.add_termination_listener(self.guard.watch(con, epoch))
        if self.also_opened is not None:
            self.also_opened(con)

    def _retire_all(self) -> int:
        return sum(1 for con in list(self.epochs) if not con.is_closed())

    def retired(self, dbapi_connection: Any) -> bool:
        """Tell whether a DBAPI connection was opened before the last failover."""
        con = getattr(dbapi_connection, "driver_connection", None)
        epoch = self.epochs.get(con) if con is not None else None
        return epoch is not None and epoch < self.guard.epoch


def _install_hooks(
    engine: AsyncEngine, options: PoolOptions, connector: Connector, failover: _EngineFailover
) -> None:
    sync_engine = engine.sync_engine
    max_lifetime, jitter = options.max_lifetime, options.max_lifetime_jitter
    rng = random.Random()

    @event.listens_for(sync_engine, "engine_disposed")
    def _disposed(_engine: Any) -> None:
        # AsyncEngine.dispose() runs this in SQLAlchemy's greenlet, where awaiting works.
        reset = connector.reset()
        try:
            await_only(reset)
        except Exception:
            reset.close()
            logger.warning(
                "engine %s: could not close the credential cache on dispose (dispose the "
                "AsyncEngine, not its sync_engine)",
                connector.name,
                exc_info=True,
            )

    @event.listens_for(sync_engine, "handle_error")
    def _refused(context: Any) -> BaseException | None:
        # SQLAlchemy wraps the driver's error; a refused IAM login surfaces as the pool's
        # IAMAuthenticationError instead, with the same hints. Re-chain the wrapper to
        # asyncpg's own error so the chain has no cycle.
        original = context.original_exception
        cause = getattr(original, "__cause__", None)
        if isinstance(cause, IAMAuthenticationError):
            original.__cause__ = cause.__cause__
            return cause
        return None

    def due(record: Any) -> bool:
        deadline = record.info.get(_DEADLINE)
        return deadline is not None and time.monotonic() >= deadline

    if max_lifetime is not None:

        @event.listens_for(sync_engine, "connect")
        def _connected(_dbapi_connection: Any, record: Any) -> None:
            lifetime = draw_lifetime(max_lifetime, jitter, rng)
            record.info[_DEADLINE] = time.monotonic() + lifetime

    @event.listens_for(sync_engine, "checkout")
    def _checkout(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        if failover.retired(dbapi_connection):
            logger.debug(
                "engine %s: discarding a connection from before a failover", connector.name
            )
            raise DisconnectionError("connection opened before a failover")
        if due(record):
            logger.debug("engine %s: discarding a connection past its max lifetime", connector.name)
            # SQLAlchemy closes this connection and checks out a freshly opened one.
            raise DisconnectionError("connection reached its max lifetime")

    @event.listens_for(sync_engine, "checkin")
    def _checkin(dbapi_connection: Any, record: Any) -> None:
        if dbapi_connection is None:
            return
        if failover.retired(dbapi_connection):
            logger.debug("engine %s: closing a connection from before a failover", connector.name)
            record.invalidate()
        elif due(record):
            logger.debug("engine %s: closing a connection past its max lifetime", connector.name)
            record.invalidate()


def _install_health(
    engine: AsyncEngine,
    settings: HealthCheck | None,
    connector: Connector,
    failover: _EngineFailover,
) -> HealthMonitor | None:
    """Find silent hosts as the pool does: probe the hosts of connections checked out; on
    silence terminate that host's connections (idle ones are then refused on checkout), and
    on a writer engine count a failover."""
    if settings is None:
        return None
    sync_engine = engine.sync_engine
    engine_ref = weakref.ref(sync_engine)
    in_use: weakref.WeakSet[Any] = weakref.WeakSet()

    def hosts_in_use() -> set[Address]:
        if engine_ref() is None:
            raise RuntimeError("the engine is gone: stop probing")
        return {host for con in in_use if (host := monitor.address_of(con)) is not None}

    def on_silent(host: Address, label: str, cause: str) -> None:
        what = f"host {label} silent: {cause}"
        writer = failover.guard.wants_writer and failover.guard.report_now(what)
        retired = 0
        for con in monitor.connections_on(host):
            retired += 1
            con.terminate()  # a query in flight fails with ConnectionDoesNotExistError
        if writer:
            return  # the failover's WARNING named the host
        logger.warning(
            "engine %s: host %s silent: %s; terminated %d connection(s) to it",
            connector.name,
            label,
            cause,
            retired,
        )

    monitor = HealthMonitor(
        settings,
        hosts_in_use=hosts_in_use,
        on_silent=on_silent,
        name=connector.name,
    )
    connector.login_gate = monitor.login_gate
    failover.also_opened = monitor.track

    @event.listens_for(sync_engine, "checkout")
    def _checkout(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
        con = dbapi_connection.driver_connection
        if con.is_closed():  # terminated on a silent host (or lost): never handed out
            raise DisconnectionError("the connection's host went silent or it was lost")
        in_use.add(con)

    @event.listens_for(sync_engine, "checkin")
    def _checkin(dbapi_connection: Any, _record: Any) -> None:
        if dbapi_connection is not None:
            in_use.discard(dbapi_connection.driver_connection)

    @event.listens_for(sync_engine, "engine_disposed")
    def _disposed(_engine: Any) -> None:
        monitor.stop()

    return monitor


def _install_topology(
    engine: AsyncEngine,
    setting: bool | AuroraTopology,
    connector: Connector,
    failover: _EngineFailover,
) -> TopologyMonitor | None:
    """Route the engine's connects by the Aurora cluster's topology, as the pool does: read
    on the first connect, refreshed in the background until the engine is disposed. The
    engine retires connections by failover epoch only (nothing to rebalance idle ones)."""
    monitor = topology_for(connector, setting, retire=None, name=connector.name)
    if monitor is None:
        return None
    monitor.follow(failover.guard)
    started: asyncio.Future[None] | None = None

    def first() -> Awaitable[None]:
        # One read for the connects that arrive together; they all wait for it.
        nonlocal started
        if started is None:
            started = asyncio.ensure_future(monitor.start())
        return started

    failover.first = first

    @event.listens_for(engine.sync_engine, "engine_disposed")
    def _disposed(_engine: Any) -> None:
        # Stop, and connect through DNS from now on (the last topology read goes stale).
        monitor.close()
        connector.router = None
        failover.guard.on_event = failover.guard.on_lost = None
        failover.first = None

    return monitor


def _install_blue_green(
    engine: AsyncEngine,
    setting: bool | BlueGreenSettings | None,
    connector: Connector,
    failover: _EngineFailover,
) -> BlueGreenMonitor | None:
    """Follow blue/green switchovers as the pool does, through the same `Connector.route`:
    the first new connection checks for the metadata; during a switch new connects and
    checkouts wait (bounded); after it every connection opened before is discarded at
    checkout or closed at checkin, and new ones go to green."""
    settings = blue_green_settings(setting, connector)
    if settings is None:
        return None
    sync_engine = engine.sync_engine
    gate: list[Callable[[], Awaitable[None]]] = []

    def hold_checkouts(wait: Callable[[], Awaitable[None]] | None) -> None:
        gate[:] = [] if wait is None else [wait]

    monitor = BlueGreenMonitor(
        failover,
        connector=connector,
        retire=lambda: failover.guard.retire_now("blue_green_switchover"),
        hold_acquires=hold_checkouts,
        hold=settings[0],
        resolver=settings[1],
        name=connector.name,
    )
    monitor.start()
    connector.stop_with(monitor.stop)

    @event.listens_for(sync_engine, "checkout")
    def _held(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
        if not gate:
            return
        try:
            await_only(gate[0]())
        except SwitchoverTimeoutError:
            # SQLAlchemy's pool takes no other error from a checkout hook back: at the bound
            # the checkout goes on (new connects get the error).
            return
        if failover.retired(dbapi_connection):  # the switch ended while it waited
            raise DisconnectionError("connection opened before a blue/green switchover")

    @event.listens_for(sync_engine, "engine_disposed")
    def _disposed(_engine: Any) -> None:
        failover.disposed = True
        monitor.stop()

    return monitor


def create_async_engine(
    url: str | URL = "postgresql+asyncpg://",
    *,
    iam: bool | IAMAuth = True,
    max_lifetime: float | Unset | None = UNSET,
    max_lifetime_jitter: float = 0.1,
    max_connect_rate: float | Unset | None = UNSET,
    connect_args: dict[str, Any] | None = None,
    name: str | None = None,
    health_check: HealthCheck | None = DEFAULT_HEALTH_CHECK,
    topology: bool | AuroraTopology = True,
    blue_green: bool | BlueGreenSettings | None = None,
    **engine_kwargs: Any,
) -> AsyncEngine:
    """Create an `AsyncEngine` that signs an IAM token for every new connection.

    `url` is a ``postgresql+asyncpg://user@host:port/database`` URL without a password
    (``postgresql://`` is taken as asyncpg). `connect_args` are further `asyncpg.connect`
    arguments (``ssl``, ``server_settings``, ``statement_cache_size``, ...) and override the
    URL's. `iam`, `max_lifetime`, `max_lifetime_jitter` and `max_connect_rate` mean what they
    mean for `asyncpg_iam.create_pool`, and so does `health_check` (a silent host's connections
    are terminated and refused on checkout; on a writer engine it is a failover) and `topology`
    (an Aurora cluster's instances, read on the first connect) and `blue_green` (an RDS
    blue/green switchover: connects and checkouts wait while it is in progress, then every
    connection is replaced by one to green); `name` names
    the engine in log lines. Every other keyword goes to SQLAlchemy's `create_async_engine`
    (``pool_size``, ``pool_pre_ping``, ``echo``, ...); ``pool_recycle`` defaults to
    `max_lifetime`.

    Dispose of the engine (``await engine.dispose()``) to release the credential cache.
    """
    auth = auth_from(iam)
    health = check_health_option(health_check)
    for reserved in ("creator", "async_creator"):
        if reserved in engine_kwargs:
            raise ConfigurationError(
                f"{reserved} cannot be combined with asyncpg_iam's engine: it opens the "
                "connections itself. Use connect_args for asyncpg.connect() arguments"
            )
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+asyncpg")
    if parsed.drivername != "postgresql+asyncpg":
        raise ConfigurationError(
            f"asyncpg_iam's engine speaks asyncpg: use a postgresql+asyncpg:// URL, not "
            f"{parsed.drivername}://"
        )
    # The one plan assembly (DSQL and writer defaults, TLS), made once, here: the environment
    # read later changes nothing. Then the limits it implies.
    dsn, connect_kwargs = _plan_arguments(parsed, connect_args)
    plan = plan_connect(dsn, connect_kwargs, auth=auth, dsn_name="the URL")
    lifetime, rate = limits(plan.dsql, max_lifetime, max_connect_rate)
    options = PoolOptions(lifetime, max_lifetime_jitter, rate)
    if options.max_lifetime is not None:
        engine_kwargs.setdefault("pool_recycle", options.max_lifetime)
    connector = Connector(
        plan,
        provider=TokenProvider(auth) if auth is not None else None,
        max_connect_rate=options.max_connect_rate,
        name=name,
        kind="engine",
    )
    failover = _EngineFailover(connector)
    engine = _sa_create_async_engine(parsed, async_creator=failover.connect, **engine_kwargs)
    _install_hooks(engine, options, connector, failover)
    _install_health(engine, health, connector, failover)
    _install_topology(engine, topology, connector, failover)
    _install_blue_green(engine, blue_green, connector, failover)
    return engine
