"""Failover and restart handling for the pool: detect, retire, land on the right server.

When Aurora (or RDS Multi-AZ) fails over, every connection to the old writer dies, and for up
to the DNS TTL new connections to the cluster endpoint can still reach the old writer, now
down or read-only. `FailoverGuard` watches one pool's connections for that and reacts.

**Signals.** asyncpg's pool never sees what happens to a connection while a caller holds it,
so the guard watches every connection the pool opens in two ways:

- a *termination listener* (`Connection.add_termination_listener`), which asyncpg calls when
  the connection closes for any reason. Connections are created from a subclass of the pool's
  ``connection_class`` whose `close()` and `terminate()` note that the client closed it, so
  the listener tells a server or network drop (idle or in use) from the pool's own closes
  (max lifetime, ``max_queries``, idle timeout, pool close);
- on pools that want the writer, query error reports: the connection class also reports the
  server error of every query that fails (`reporting_connection_class`; asyncpg's query
  logger, which costs about 25 calls a query, only for a ``connect=`` that makes its own
  connections): ``25006 read_only_sql_transaction`` when the pool wants the writer (the
  server was demoted), ``57P0x`` and class ``08`` errors. (Lost connections, and the FATAL
  ``57P01 admin_shutdown`` that precedes them, reach the guard through the termination
  listener, which tells them from the client's own closes.)

Connect attempts are a third source: ``57P03``, a refused connection or a ``08`` error at
login. A new connection that lands on a read-only server (``in_hot_standby``/
``default_transaction_read_only``, checked by asyncpg for ``target_session_attrs``) is not: by
itself it says nothing of a failover.

A log listener was considered and left out: asyncpg removes log listeners on every release
(`Connection.reset`), and PostgreSQL reports a shutdown to an idle session as a FATAL error
that closes it, which the termination listener already sees.

**Retiring.** On an event every open connection is retired: its holder gets a stale
generation (as `asyncpg.Pool.expire_connections` does for all holders at once), idle ones
(those in the pool's free queue, which nobody can be handed while this runs) are terminated at
once, and asyncpg closes the ones in use when they are released. So after the pool has seen
the event no caller gets a connection from before it. Holders that are connecting keep their
generation: their login is checked (``target_session_attrs``) when it completes, and throwing
away a connection that reached the new writer would cost a login at the worst moment. One
failover makes every connection fail: signals from connections whose login began before the
last event, and connect failures before the pool has opened a connection since, belong to the
same event and are not counted again.

**Landing on the right server.** While the pool is recovering from an event (no connection
whose login began since has opened), with ``target_session_attrs`` ``read-write`` (the
default for an IAM pool on one Aurora cluster endpoint, see `_connect.plan_connect`) or
``primary``, a new connection that lands on a read-only server is closed and retried with
backoff within the connect timeout, and so are connects that fail because the server is down
or starting. Outside a recovery such a login fails at once with asyncpg's error, as on
asyncpg's pool (whose ``min_size`` upkeep then backs off). Each retry is a new login: a
fresh token, and a slot of the connect rate limit. Reader endpoints (``*.cluster-ro-*``) and
``any``/``read-only`` pools accept any server.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import asyncpg
from asyncpg.exceptions import (
    CannotConnectNowError,
    ConnectionDoesNotExistError,
    TargetServerAttributeNotMatched,
)

from ._clock import SYSTEM_CLOCK, Clock
from ._errors import CredentialsError

__all__ = [
    "FailoverGuard",
    "classify_error",
]

logger = logging.getLogger("asyncpg_iam.pool")

#: Server states that end or refuse sessions during a restart or failover.
SHUTDOWN_SQLSTATES = frozenset({"57P01", "57P02", "57P03"})
READ_ONLY_SQLSTATE = "25006"
WRITER_ATTRS = frozenset({"read-write", "primary"})

_FIRST_BACKOFF = 0.05
_MAX_BACKOFF = 1.0
_DEFAULT_CONNECT_TIMEOUT = 60.0  # asyncpg.connect's default
# A retry that times out with less than this left of the connect timeout spent all of it.
_SPENT = 0.01


# What asyncpg's pool passes to its ``connect=`` of its own (see `FailoverGuard.open`).
_POOL_CONNECT_EXTRAS = ("loop", "connection_class", "record_class")


def classify_error(exc: BaseException | None, *, wants_writer: bool) -> str | None:
    """Name the failover signal `exc` carries (``"shutdown"``, ``"read_only"``,
    ``"connection_lost"``), or None when it is an ordinary error."""
    if exc is None:
        return None
    if isinstance(exc, asyncpg.PostgresError):
        sqlstate = getattr(exc, "sqlstate", None) or ""
        if sqlstate in SHUTDOWN_SQLSTATES:
            return "shutdown"
        if sqlstate == READ_ONLY_SQLSTATE:
            return "read_only" if wants_writer else None
        if sqlstate.startswith("08"):
            return "connection_lost"
        return None
    if isinstance(exc, (ConnectionDoesNotExistError, ConnectionError)):
        return "connection_lost"
    return None


def _connect_failure(exc: BaseException) -> str | None:
    """Name why a connect attempt failed, when a failover or restart can explain it."""
    if isinstance(exc, TargetServerAttributeNotMatched):
        return "read_only"
    if isinstance(exc, CannotConnectNowError):
        return "starting"
    if isinstance(exc, asyncpg.PostgresError):
        return "unavailable" if (getattr(exc, "sqlstate", "") or "").startswith("08") else None
    if isinstance(exc, (ConnectionDoesNotExistError, ConnectionError)):
        return "unavailable"
    return None


_marked_classes: dict[type, type] = {}
_reporting_classes: dict[type, type] = {}


def marked_connection_class(base: type) -> type:
    """Return a subclass of `base` whose `close()` and `terminate()` note a client close."""
    marked = _marked_classes.get(base)
    if marked is not None:
        return marked

    class _Marked(base):  # type: ignore[misc]
        __slots__ = ("_asyncpg_iam_client_closed",)

        def close(self, *, timeout: float | None = None) -> Awaitable[None]:
            # Returns asyncpg's coroutine rather than awaiting it in one more.
            self._asyncpg_iam_client_closed = True
            return super().close(timeout=timeout)  # type: ignore[no-any-return]

        def terminate(self) -> None:
            self._asyncpg_iam_client_closed = True
            super().terminate()

    _Marked.__name__ = _Marked.__qualname__ = base.__name__
    _Marked.__module__ = base.__module__
    _marked_classes[base] = _Marked
    return _Marked


def reporting_connection_class(base: type) -> type:
    """Return a marked subclass of `base` whose queries hand the server errors they raise to
    ``con._asyncpg_iam_on_error(exc)`` once `FailoverGuard.watch` has set it.

    It sees what asyncpg's query logger would (``execute``, and the ``_execute`` and
    ``_executemany`` every fetch goes through) at a fraction of its cost: a logger makes
    asyncpg time every query in a context manager, build a record and schedule a callback,
    about 25 calls a query; this is one coroutine layer, and a call only when a query fails.
    """
    reporting = _reporting_classes.get(base)
    if reporting is not None:
        return reporting
    marked = marked_connection_class(base)

    class _Reporting(marked):  # type: ignore[valid-type,misc]
        __slots__ = ("_asyncpg_iam_on_error",)

        def execute(self, query: str, *args: Any, timeout: float | None = None) -> Any:
            if args:  # asyncpg runs it through _execute, which reports
                return super().execute(query, *args, timeout=timeout)
            return self._asyncpg_iam_reported(super().execute(query, timeout=timeout))

        def _execute(self, *args: Any, **kwargs: Any) -> Any:
            return self._asyncpg_iam_reported(super()._execute(*args, **kwargs))

        def _executemany(self, *args: Any, **kwargs: Any) -> Any:
            return self._asyncpg_iam_reported(super()._executemany(*args, **kwargs))

        async def _asyncpg_iam_reported(self, query: Awaitable[Any]) -> Any:
            try:
                return await query
            except asyncpg.PostgresError as exc:
                # Server errors only: a lost connection reaches the termination listener,
                # which tells the client's own closes apart.
                on_error = getattr(self, "_asyncpg_iam_on_error", None)
                if on_error is not None:
                    on_error(exc)
                raise

    _Reporting.__name__ = _Reporting.__qualname__ = base.__name__
    _Reporting.__module__ = base.__module__
    _reporting_classes[base] = _marked_classes[_Reporting] = _Reporting
    return _Reporting


def _closed_by_client(con: Any) -> bool | None:
    """True if the client closed `con`, False if not, None if `con` is not marked."""
    if type(con) not in _marked_classes.values():
        return None
    return bool(getattr(con, "_asyncpg_iam_client_closed", False))


class _Watched:
    """One watched connection: called with it (or None) when it terminates.

    Called itself rather than through a bound method: one object less per connection.
    """

    __slots__ = ("epoch", "guard")

    def __init__(self, guard: FailoverGuard, epoch: int) -> None:
        self.guard, self.epoch = guard, epoch

    def __call__(self, con: Any) -> None:
        self.guard._on_terminated(self.epoch, con)


class FailoverGuard:
    """Watch one pool's (or engine's) connections for a failover or restart and recover.

    The owner is reached only through callbacks, so the guard serves an asyncpg pool and a
    SQLAlchemy engine alike and holds neither: `opened(con, started, epoch)` takes each
    connection the guard opened (and calls `watch`); `retire_all()` retires every open
    connection and returns how many; `closing()` tells whether the owner is closing and
    `started()` whether it has started (signals before that are not failovers).
    `connector` (the owner's `Connector`) says, through its current plan, whether the owner
    wants the writer (a read-only server is then a failure) and the connect timeout. Backoff
    between connect retries waits on `clock` (the owner's).
    """

    def __init__(
        self,
        *,
        connector: Any,
        opened: Callable[[Any, float, int], None],
        retire_all: Callable[[], int],
        closing: Callable[[], bool],
        started: Callable[[], bool],
        name: str,
        rng: random.Random | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self._connector = connector
        self._opened = opened
        self._retire_all = retire_all
        self._closing = closing
        self._started = started
        self._name = name
        self._rng = rng or random.Random()
        self._clock = clock
        self.epoch = 0
        """Events handled so far: a connection whose login began at an earlier epoch is
        retired (read-only for others)."""
        self.recoveries = 0
        """Recoveries so far: a connect that began before the last one fails as part of it
        (read-only for others)."""
        self._recovering = False
        self._opened_any = False
        self.events = 0
        """Failovers or restarts detected."""
        self.retired = 0
        """Connections retired because of them."""
        self.read_only_retries = 0
        """Connect attempts that landed on a read-only server and were retried."""
        self.connect_retries = 0
        """Connect attempts retried during recovery, read-only ones included."""
        self.on_event: Callable[[str], None] | None = None
        """Called with the cause when an event begins (the topology monitor refreshes)."""
        # (plan, base connection class, class to connect with, wants the writer) of the
        # last connect: read on every connect, worked out again only when either changes.
        self._classes: tuple[Any, Any, type, bool] = (None, None, object, False)
        self._watched: _Watched | None = None
        self.on_lost: Callable[[Any], bool] | None = None
        """Called with a connection the server or network dropped; True when that loss
        concerns its host alone (a reader that left), so it is not a pool-wide event."""

    @property
    def wants_writer(self) -> bool:
        """Whether the pool's connections must be on a server that takes writes."""
        return str(self._connector.plan.target_session_attrs) in WRITER_ATTRS

    # -- connecting ---------------------------------------------------------------------------

    def _classes_for(self, base: Any) -> tuple[Any, Any, type, bool]:
        """Work out (and keep) `_classes` for the current plan and `base`: the class to
        connect with lets closes be told apart (and, on an owner that wants the writer,
        reports query errors)."""
        plan = self._connector.plan
        writer = str(plan.target_session_attrs) in WRITER_ATTRS
        make = reporting_connection_class if writer else marked_connection_class
        self._classes = (plan, base, make(base or asyncpg.Connection), writer)
        return self._classes

    def open(self, *_args: Any, **kwargs: Any) -> Coroutine[Any, Any, Any]:
        """Open a connection through the connector, retrying what a failover explains.

        A pool's ``connect=`` callable: asyncpg calls it with its own connect arguments, of
        which only ``loop``, ``connection_class`` and ``record_class`` are kept (connection
        arguments set on the asyncpg side, by ``asyncpg.Pool.set_connect_args`` called on the
        pool, never reach the connect: the plan's are used). The opened connection is handed
        to `opened` (which calls `watch`) before it is returned; a `CredentialsError` while
        the owner closes becomes asyncpg's "pool is closing".

        Retries pass what is left of the connect timeout as ``timeout``. The timeout is one
        budget spent two ways: connect attempts in real time (asyncpg bounds its own waits by
        the event loop's clock, so their cost is read there) and backoff on the pool's clock.
        With the system clock the two are the same time; with a manual one, backoff spends only
        the clock time that passes while it waits.
        """
        extra = {}
        for key in _POOL_CONNECT_EXTRAS:  # a loop, not a comprehension: one call less
            if key in kwargs:
                extra[key] = kwargs[key]
        # A ``connection_class`` that tells closes apart (`_classes_for`), worked out again
        # only when the plan or the caller's class changed: this runs on every connect.
        base = extra.get("connection_class")
        classes = self._classes
        if classes[0] is not self._connector.plan or classes[1] is not base:
            classes = self._classes_for(base)
        extra["connection_class"] = classes[2]
        # The first attempt is the connector's (`Connector.open_watched`): a login to one
        # endpoint does the guard's part itself (`first_opened`, `first_failed`), so one
        # coroutine, not two, is resumed at every await inside asyncpg's connect.
        opening: Coroutine[Any, Any, Any] = self._connector.open_watched(extra, self)
        return opening

    async def first_attempt(
        self, attempt: Awaitable[tuple[Any, float]], kwargs: dict[str, Any]
    ) -> Any:
        """Await `attempt`, the first connect attempt of `open` (for the connects that do not
        do the guard's part themselves), and return its connection."""
        epoch, recoveries = self.epoch, self.recoveries
        began = asyncio.get_running_loop().time()
        try:
            con, started = await attempt
        except Exception as exc:
            failure = exc
        else:
            return self.first_opened(con, started, epoch)
        return await self.first_failed(failure, epoch, recoveries, began, kwargs)

    def first_opened(self, con: Any, started: float, epoch: int) -> Any:
        """Hand `con`, opened by a login that began at clock time `started` and at `epoch`,
        to the owner; return it."""
        # Anything else (a connect= callback's mistake) goes to asyncpg's pool unwatched: it
        # refuses it with its own error.
        if type(con) is self._classes[2] or isinstance(con, asyncpg.Connection):
            # Signals from it belong to the epoch its login began in.
            self._opened(con, started, epoch)
        return con

    def first_failed(
        self,
        exc: Exception,
        epoch: int,
        recoveries: int,
        began: float,
        kwargs: dict[str, Any],
    ) -> Coroutine[Any, Any, Any]:
        """Raise `exc`, the failure of `open`'s first attempt (begun at `epoch`, after
        `recoveries`, at loop time `began`), or return the retries to await when a failover
        explains it."""
        timeout = kwargs.get("timeout", self._connector.plan_timeout)
        remaining = _DEFAULT_CONNECT_TIMEOUT if timeout is None else timeout
        remaining -= asyncio.get_running_loop().time() - began
        wait = self._retry_wait(exc, epoch, recoveries, remaining, _FIRST_BACKOFF)
        return self._retry(exc, wait, remaining, kwargs)

    async def _retry(
        self, exc: Exception, wait: float, remaining: float, kwargs: dict[str, Any]
    ) -> Any:
        """Retry a connect that failed with `exc` after `wait` seconds, with backoff, within
        `remaining` seconds of its timeout."""
        loop = asyncio.get_running_loop()
        delay = _FIRST_BACKOFF
        while True:
            waited_from = self._clock.monotonic()
            await self._clock.sleep(wait)
            remaining -= self._clock.monotonic() - waited_from
            if self._closing():
                # Nothing outlives close(): no retry starts once the pool is closing.
                raise asyncpg.InterfaceError("pool is closing") from exc
            delay = min(delay * 2, _MAX_BACKOFF)
            kwargs["timeout"] = max(remaining, 0.001)
            epoch, recoveries = self.epoch, self.recoveries
            attempt_began = loop.time()  # real time: asyncpg's waits are real
            try:
                con, started = await self._connector.open(**kwargs)
            except Exception as failure:
                remaining -= loop.time() - attempt_began
                if isinstance(failure, asyncio.TimeoutError) and remaining < _SPENT:
                    # The attempt had only what was left of the timeout, and ran out of it:
                    # the caller gets the failure that was being retried, not the timeout.
                    raise exc from failure
                wait = self._retry_wait(failure, epoch, recoveries, remaining, delay)
                exc = failure
            else:
                return self.first_opened(con, started, epoch)

    def _retry_wait(
        self, exc: Exception, epoch: int, recoveries: int, remaining: float, delay: float
    ) -> float:
        """Return the backoff before retrying a connect that failed with `exc`, with
        `remaining` seconds of its timeout left; raise `exc` when it is not retried."""
        kind = _connect_failure(exc)
        if kind is None or not self._is_retryable(kind, epoch, recoveries):
            if isinstance(exc, CredentialsError) and self._closing():
                raise asyncpg.InterfaceError("pool is closing") from exc
            raise exc
        wait = delay * (0.5 + self._rng.random() / 2)
        if remaining <= wait:
            raise exc
        self._count_retry(kind, exc, wait)
        return wait

    def _is_retryable(self, kind: str, epoch: int, recoveries: int) -> bool:
        """Tell whether a connect that failed as `kind` is retried as part of a failover."""
        if kind == "read_only" and not self.wants_writer:
            return False
        if self.recoveries != recoveries:
            # The pool recovered while this attempt was in flight (it began before the
            # endpoint moved): part of the event it recovered from, retried, not a new one.
            return True
        if kind == "read_only":
            # Outside a failover a read-only server is no sign of one: fail at once, as
            # asyncpg does (its min_size upkeep backs off and tries again).
            return self._recovering
        if not self._recovering:
            # A server that is down while the pool saw no failover: say so at once.
            if not self._opened_any:
                return False
            self.report(f"connect_{kind}", epoch, connect=True)
            return self._recovering
        return True

    def _count_retry(self, kind: str, exc: Exception, wait: float) -> None:
        self.connect_retries += 1
        if kind == "read_only":
            self.read_only_retries += 1
        logger.debug(
            "pool %s: connect landed on a %s server (%s); retrying in %.2f s",
            self._name,
            "read-only" if kind == "read_only" else "unavailable",
            type(exc).__name__,
            wait,
        )

    def watch(self, con: Any, epoch: int) -> Callable[[Any], None]:
        """Watch a connection just opened, whose login began at `epoch`.

        Returns the callable to run with the connection itself (not a pool's proxy of it; None
        if it is gone) when it terminates: the pool's one termination listener per connection
        calls it (one listener costs less than two on every connect), and a SQLAlchemy engine
        adds it as the listener (no proxies there).
        """
        self._opened_any = True
        if self._recovering and epoch == self.epoch:
            # A login begun since the event ends its recovery; one begun before it may have
            # reached the old server (and a pool watches a connection after handing it out).
            self._recovering = False
            self.recoveries += 1
        classes = self._classes
        writer = classes[3] if classes[0] is self._connector.plan else self.wants_writer
        if writer:  # its signal is 25006; other pools skip its per-query cost
            if type(con) in _reporting_classes.values():
                con._asyncpg_iam_on_error = functools.partial(self._on_query_error, epoch)
            else:  # a `connect=` that made its own class: asyncpg's query logger
                con.add_query_logger(functools.partial(self._on_query, epoch))
        watched = self._watched
        if watched is None or watched.epoch != epoch:
            # One per epoch, shared by its connections (it holds nothing of them).
            watched = self._watched = _Watched(self, epoch)
        return watched

    # -- signals ------------------------------------------------------------------------------

    def _on_terminated(self, epoch: int, con: Any) -> None:
        if con is None or _closed_by_client(con) is not False:
            return  # closed by the pool or the caller, or not a connection we can tell about
        if self.on_lost is not None and self.on_lost(con):
            return
        self.report("connection_lost", epoch)

    def _on_query(self, epoch: int, record: Any) -> None:
        self._on_query_error(epoch, record.exception)

    def _on_query_error(self, epoch: int, exc: BaseException | None) -> None:
        kind = classify_error(exc, wants_writer=self.wants_writer)
        if kind is not None:
            self.report(kind, epoch)

    def report_now(self, cause: str) -> bool:
        """Handle a signal that is news whenever it comes (a silent host); see `report`."""
        return self.report(cause, self.epoch)

    def retire_now(self, cause: str) -> int:
        """Retire every connection opened so far, as an event of `cause` (a blue/green
        switchover: they are all on blue); return how many were retired."""
        before = self.retired
        self.report_now(cause)
        return self.retired - before

    def report(self, cause: str, epoch: int, *, connect: bool = False) -> bool:
        """Handle a signal seen at `epoch`; return True when it starts a new event."""
        if self._closing() or not self._started():
            return False
        if epoch < self.epoch or (connect and self._recovering):
            return False  # part of an event already handled
        self.epoch += 1
        self._recovering = True
        self.events += 1
        retired = self._retire_all()
        self.retired += retired
        logger.warning(
            "pool %s: failover or restart detected (%s); retired %d connection(s)",
            self._name,
            cause,
            retired,
        )
        if self.on_event is not None:
            self.on_event(cause)
        return True
