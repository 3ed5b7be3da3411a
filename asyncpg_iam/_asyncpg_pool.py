"""asyncpg's private internals (pool, connect), behind one adapter: the only module that names
them.

`Pool` subclasses `asyncpg.Pool` and relies on what asyncpg does not publish: the hooks it
overrides (``_acquire``, ``_get_new_connection``, ``_async__init__``), the pool's holders
(``_holders``, each with ``_con``, ``_in_use`` and ``_generation``), the free-holder queue
(``_queue``), ``_initialized``, the proxy's ``_con``/``_holder``, and a connection's
``_transport`` and ``_addr`` (`connection_endpoints`, for the health check). They change between
minor versions: this module is where a new asyncpg is adapted, and
``tests/test_asyncpg_internals.py`` pins each of them. ``tests/test_architecture.py`` checks
that no other module of the package names them.

`AsyncpgPool` routes asyncpg's pool start to a method with our name (``_start``) by
assignment when a subclass is made, so asyncpg calls it without a layer in between; the
subclass calls asyncpg's own through `asyncpg_start`. New connections are asyncpg's own
(``_get_new_connection``, no call around it) unless `observe_new_connections` puts one there.
Its ``_acquire`` is asyncpg's acquire, rewritten as one coroutine with the lifetime check in it
(asyncpg's is two, see `AsyncpgPool._acquire`); its ``acquire`` hands out asyncpg's acquire
context, or `TimedAcquireContext` while wait and use times are recorded; its ``release`` is
asyncpg's with a cheaper ``asyncio.shield`` (`AsyncpgPool.release`). Recycling and failover
handling use the holder functions below (retire on release, close an idle connection, retire
them all). `parse_connect` and `connect_parsed` split ``asyncpg.connect`` in two: its argument
parsing, which a connector does once per endpoint, and its connect to one address.
"""

from __future__ import annotations

import asyncio
import contextlib
import operator
import socket
import struct
import sys
import time
import weakref
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from typing import Any

import asyncpg
import asyncpg.compat
import asyncpg.connect_utils
import asyncpg.connection
import asyncpg.pool

__all__ = [
    "PARSE_PARAMETERS",
    "REFILLS_MIN_SIZE",
    "SUPPORTED_ASYNCPG",
    "AsyncpgPool",
    "TimedAcquireContext",
    "add_termination_listener",
    "asyncpg_version",
    "call_termination_listeners",
    "connect_parsed",
    "connection_endpoints",
    "connection_of",
    "empty_idle_holder",
    "find_holder",
    "handed_out",
    "hold_acquires",
    "holder_of",
    "initialized",
    "observe_new_connections",
    "open_holders",
    "parse_connect",
    "parse_connect_arguments",
    "put_back",
    "received_within",
    "reconnect",
    "reserve_hooks",
    "reset_once",
    "retire_connections",
    "retire_on_release",
    "shadow",
    "take_idle",
    "terminate_idle",
    "waiting_acquires",
]

# A holder whose generation differs from its pool's is closed by asyncpg on release and replaced
# on acquire; pool generations start at 0 and only grow, so -1 never matches.
_STALE_GENERATION = -1
# asyncpg's hook -> the name of the subclass's method that replaces it.
_HOOKS = {
    "_async__init__": "_start",
}

#: What to write instead when a pool is used without being started (a forgotten `await`, a
#: plain `with`).
NOT_STARTED = "use `await create_pool(...)` or `async with create_pool(...)`"

#: The asyncpg versions whose private pool internals this module is tested against.
SUPPORTED_ASYNCPG = ((0, 30), (0, 32))


def asyncpg_version() -> tuple[int, int]:
    """Return the installed asyncpg's (major, minor) version."""
    major, minor = asyncpg.__version__.split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def _check_asyncpg_version() -> None:
    low, high = SUPPORTED_ASYNCPG
    if not low <= asyncpg_version() <= high:
        raise ImportError(
            f"asyncpg-iam supports asyncpg {low[0]}.{low[1]} to {high[0]}.{high[1]}, found "
            f"{asyncpg.__version__}: its pool overrides asyncpg internals that change between "
            "minor versions. Install a supported asyncpg or upgrade asyncpg-iam."
        )


_check_asyncpg_version()

#: Whether asyncpg refills its pool to ``min_size`` itself (0.32+); older ones need our refill.
REFILLS_MIN_SIZE = hasattr(asyncpg.pool.Pool, "_schedule_min_size_maintenance")

#: The connection a pool proxy (what `Pool.acquire` hands out) wraps, or None once released.
connection_of: Callable[[Any], Any] = operator.attrgetter("_con")


class AsyncpgPool(asyncpg.Pool):  # type: ignore[misc]
    """`asyncpg.Pool` with its private hooks under names of ours, and a cheaper acquire.

    A subclass defines ``_start()`` to replace asyncpg's ``_async__init__``: asyncpg then
    calls that very function.
    For the lifetime check on acquire it sets `_deadline_of`, `_now` and `_retire_due`,
    `_acquire_times` while an observer records wait and use times, and `_acquire_gate` while
    acquires are held (`hold_acquires`).

    No method of the acquire and release path is ever shadowed by an instance attribute (see
    `reserve_hooks`): its hooks are data attributes that these methods read.
    """

    asyncpg_new_connection = asyncpg.pool.Pool._get_new_connection
    """asyncpg's connect of a new pool connection (``_get_new_connection()``)."""
    asyncpg_start = asyncpg.pool.Pool._async__init__
    """asyncpg's pool start (``_async__init__()``)."""

    # Set by the subclass: the recycler's deadline lookup by id() of an open connection, the
    # clock's monotonic(), what to do with a due connection (True: it was retired, acquire
    # another; False: hand it out), and where wait times go (None: nowhere).
    _deadline_of: Callable[[int], float | None]
    _now: Callable[[], float]
    _retire_due: Callable[[Any, bool], Awaitable[bool]]
    _acquire_times: Any  # an AcquireTimes (waits, acquired), or None
    _acquire_gate: Callable[[], Awaitable[None]] | None
    _acquire_timeouts: int

    def _check_init(self) -> None:
        # Runs on every acquire and release: an open pool passes with one test, as in asyncpg.
        if self._initialized and not self._closed:
            return
        # asyncpg's own message for a pool used before it started says nothing of the
        # forgotten `await` that is almost always the cause.
        if not self._initialized and not self._initializing and not self._closed:
            raise asyncpg.InterfaceError(f"the pool was never started: {NOT_STARTED}")
        super()._check_init()

    async def _acquire(self, timeout: float | None, gate_passed: bool = False) -> Any:
        """asyncpg's ``Pool._acquire``, that never hands out a connection past its deadline.

        asyncpg's runs a coroutine (``_acquire_impl``, a new closure each time) inside another;
        this is one, with the lifetime check inline: two lookups and a clock read. A timeout
        bounds the whole acquire, replacing due connections included, as asyncpg's
        ``wait_for`` does; ``tests/test_asyncpg_internals.py`` pins the code it follows. While
        acquires are held (`hold_acquires`), each waits for the gate first, once.
        """
        gate = self._acquire_gate
        if gate is not None and not gate_passed:
            timeout = await _through_gate(gate, timeout)
        if timeout is not None:
            try:
                # AsyncpgPool's, not self's: a subclass's override runs once, outside.
                proxy = await asyncpg.compat.wait_for(
                    AsyncpgPool._acquire(self, None, True), timeout=timeout
                )
            except asyncio.TimeoutError:
                self._acquire_timeouts += 1
                raise
            # Recorded, as asyncpg does, as the default timeout of the release.
            proxy._holder._timeout = timeout
            return proxy
        if self._closing:
            raise asyncpg.InterfaceError("pool is closing")
        self._check_init()
        # Read, then called: ``self._now()`` would be a method load of an instance attribute,
        # which CPython 3.11 does not specialize (nor cache), on every acquire.
        deadline_of, now = self._deadline_of, self._now
        while True:
            holder = await self._queue.get()
            con = holder._con
            try:
                proxy = await holder.acquire()
            except (Exception, asyncio.CancelledError):
                self._queue.put_nowait(holder)
                if REFILLS_MIN_SIZE:
                    self._schedule_min_size_maintenance()
                raise
            holder._timeout = None
            deadline = deadline_of(id(proxy._con))
            if deadline is None or now() < deadline:
                break
            # Due: retired (try another), or opened by this very acquire (handed out once).
            if not await self._retire_due(proxy, proxy._con is not con):
                break
        return proxy

    def acquire(self, *, timeout: float | None = None) -> Any:
        """Acquire a connection: ``async with pool.acquire() as con:``, or
        ``con = await pool.acquire()`` and then ``await pool.release(con)``.

        `timeout` bounds the wait for a free connection, a new connection's login included
        (asyncpg's `asyncpg.Pool.acquire`). While wait and use times are recorded (an observer
        installed with `asyncpg_iam.Pool.set_observer` that wants them), the context records
        them itself.
        """
        times = self._acquire_times
        if times is None:
            return asyncpg.pool.PoolAcquireContext(self, timeout)
        return TimedAcquireContext(self, timeout, times)

    async def release(self, connection: Any, *, timeout: float | None = None) -> None:
        """Release a connection back to the pool: asyncpg's `asyncpg.Pool.release`, at less
        cost.

        asyncpg resets the connection in a task of its own behind ``asyncio.shield``, so that
        a cancelled caller still returns it to the pool; `_shielded` keeps that guarantee with
        one event-loop iteration and 30 Python calls less per release under asyncio
        (``tests/test_asyncpg_internals.py`` pins the code this follows). While wait and use
        times are recorded, a connection from ``await pool.acquire()`` gets its use time
        recorded first (``async with pool.acquire()`` records its own).
        """
        if type(connection) is not _PROXY or connection._holder._pool is not self:
            raise asyncpg.InterfaceError(
                f"Pool.release() received invalid connection: {connection!r} is not a member "
                "of this pool"
            )
        times = self._acquire_times
        if times is not None and times.acquired:
            _record_use(times, connection, self._now)
        con = connection._con
        if con is None:  # released already
            return
        self._check_init()
        con._on_release()
        holder = connection._holder
        if timeout is None:
            timeout = holder._timeout
        await _shielded(holder.release, timeout)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for hook, ours in _HOOKS.items():
            method = cls.__dict__.get(ours)
            if method is not None:
                setattr(cls, hook, method)


class TimedAcquireContext(asyncpg.pool.PoolAcquireContext):  # type: ignore[misc]
    """asyncpg's acquire context, for a pool that records wait and use times into `times` (an
    `AcquireTimes`).

    ``async with pool.acquire()``, the common use, keeps its handout's clock time in the
    context and records the use time itself: no lookup by holder. ``await pool.acquire()``
    records the handout's time by holder, where the pool's `AsyncpgPool.release` finds it.
    Both record the wait time.
    """

    # Added to asyncpg's (pool, timeout, connection, done), which mypy does not see as slots.
    __slots__ = ("_began", "_times")
    connection: Any

    def __init__(self, pool: AsyncpgPool, timeout: float | None, times: Any) -> None:
        # asyncpg's __init__, inline: one frame a context, not two.
        self.pool = pool  # type: ignore[misc]  # asyncpg's slots, as below
        self.timeout = timeout  # type: ignore[misc]
        self.connection = None
        self.done = False  # type: ignore[misc]
        self._times = times

    async def __aenter__(self) -> Any:
        if self.connection is not None or self.done:
            raise asyncpg.InterfaceError("a connection is already acquired")
        pool = self.pool
        now = pool._now  # read, then called (see AsyncpgPool._acquire)
        started = now()
        self.connection = proxy = await pool._acquire(self.timeout)
        self._began = began = now()
        self._times.waits.append(began - started)
        return proxy

    async def __aexit__(self, *exc_info: object) -> None:
        self.done = True  # type: ignore[misc]
        proxy, self.connection = self.connection, None
        pool, times = self.pool, self._times
        now = pool._now
        uses = times.uses
        uses.append(now() - self._began)
        if len(uses) >= times.spill_at:
            times.spill()
        await pool.release(proxy)

    def __await__(self) -> Any:
        self.done = True  # type: ignore[misc]
        return _acquire_timed(self.pool, self.timeout, self._times).__await__()


async def _acquire_timed(pool: AsyncpgPool, timeout: float | None, times: Any) -> Any:
    # ``await pool.acquire()``: the handout's time goes by holder to the pool's `release`.
    now = pool._now
    started = now()
    proxy = await pool._acquire(timeout)
    began = now()
    times.waits.append(began - started)
    times.acquired[proxy._holder] = began
    return proxy


def _record_use(times: Any, connection: Any, now: Callable[[], float]) -> None:
    # A release of a connection from ``await pool.acquire()``, while times are recorded.
    began = times.acquired.pop(getattr(connection, "_holder", None), None)
    if began is not None:
        uses = times.uses
        uses.append(now() - began)
        if len(uses) >= times.spill_at:
            times.spill()


async def _through_gate(gate: Callable[[], Awaitable[None]], timeout: float | None) -> float | None:
    # An acquire while acquires are held: wait for the gate, then what is left of `timeout`.
    started = time.monotonic()
    await gate()
    if timeout is None:
        return None
    return max(0.001, timeout - (time.monotonic() - started))


#: What `Pool.acquire` hands out (asyncpg's proxy of a pool connection).
_PROXY = asyncpg.pool.PoolConnectionProxy


def _shielded(
    release: Callable[[float | None], Coroutine[Any, Any, None]], timeout: float | None
) -> asyncio.Future[None]:
    """Run ``release(timeout)`` in a task of its own; return a future of its outcome that a
    cancelled caller cancels without cancelling the task: ``asyncio.shield``, cheaper.

    ``asyncio.shield`` makes its task, then an outer future, and passes the task's outcome on
    through a done-callback, which the loop runs one iteration after the task ends, with
    Python closures on both. Here the task sets the outer future itself as it ends.
    """
    loop = asyncio.get_running_loop()
    outcome = loop.create_future()
    # Not kept: what the release awaits holds the task, as with asyncio.shield's own task.
    loop.create_task(_settle(release, timeout, outcome))  # noqa: RUF006
    return outcome


async def _settle(
    release: Callable[[float | None], Coroutine[Any, Any, None]],
    timeout: float | None,
    outcome: asyncio.Future[None],
) -> None:
    # The task of `_shielded`. Once the caller has gone (`outcome` cancelled) the result, or
    # error, is dropped, as asyncio.shield drops it; a cancelled task cancels `outcome`. The
    # release's coroutine is made here: a task cancelled before it starts (a loop's shutdown)
    # leaves none unawaited.
    try:
        await release(timeout)
    except asyncio.CancelledError:
        outcome.cancel()
        raise
    except Exception as exc:
        if not outcome.done():
            outcome.set_exception(exc)
    else:
        if not outcome.done():
            outcome.set_result(None)


#: asyncpg's connect arguments for one address, parsed (`parse_connect`): (addr, params, config).
ParsedConnect = tuple[Any, Any, Any]

# The parameter names of asyncpg's argument parser, read without `inspect.signature` (a third of
# a millisecond of every cold start); tests/test_asyncpg_internals.py checks they agree.
_PARSE_CODE = asyncpg.connect_utils._parse_connect_arguments.__code__
#: The parameters of asyncpg's argument parser: asyncpg.connect's keywords but ``loop``,
#: ``timeout``, ``connection_class`` and ``record_class``.
PARSE_PARAMETERS: tuple[str, ...] = _PARSE_CODE.co_varnames[
    : _PARSE_CODE.co_argcount + _PARSE_CODE.co_kwonlyargcount
]

_SESSION_ANY = asyncpg.connect_utils.SessionAttribute.any
# Where the password sits in asyncpg's connection parameters (a named tuple): a login's is put
# there with slices and one C call, not the tuple's `_replace` (two Python calls, each connect).
_PASSWORD_AT = asyncpg.connect_utils._ConnectionParameters._fields.index("password")
# asyncpg 0.32 signals a server that cannot accept connections yet (tried next, if any).
_NEXT_HOST: tuple[type[BaseException], ...] = tuple(
    getattr(asyncpg.connect_utils, name)
    for name in ("_NextHostSignal",)
    if hasattr(asyncpg.connect_utils, name)
)


def parse_connect_arguments(arguments: dict[str, Any]) -> tuple[Any, Any, Any]:
    """Parse `arguments` (each of `PARSE_PARAMETERS`, as ``asyncpg.connect`` passes them) as
    ``asyncpg.connect`` does on each call: (addresses, params, config). Raises what asyncpg
    raises for bad ones."""
    addrs, params, config = asyncpg.connect_utils._parse_connect_arguments(**arguments)
    return addrs, params, config


def parse_connect(arguments: dict[str, Any]) -> ParsedConnect | None:
    """`parse_connect_arguments` for `connect_parsed`; None when `arguments` name more than
    one address (``asyncpg.connect`` then tries each)."""
    addrs, params, config = parse_connect_arguments(arguments)
    if len(addrs) != 1:
        return None
    return addrs[0], params, config


async def connect_parsed(parsed: ParsedConnect, password: Any, kwargs: dict[str, Any]) -> Any:
    """``asyncpg.connect(**kwargs)``, whose parse is `parsed`, with `password`: asyncpg's
    connect to one address without parsing its arguments again, in one coroutine (asyncpg's
    are two, each resumed at every await of a login).

    Kept from asyncpg: the checks of ``connection_class`` and ``record_class`` (read from
    `kwargs`, with ``loop`` and ``timeout``), the timeout over the whole connect, the check of
    ``target_session_attrs`` (a connection that fails it is terminated) and the errors;
    ``tests/test_asyncpg_internals.py`` pins the code this follows.
    """
    addr, params, config = parsed
    connection_class = kwargs.get("connection_class", asyncpg.Connection)
    if not issubclass(connection_class, asyncpg.Connection):
        raise asyncpg.InterfaceError(
            "connection_class is expected to be a subclass of "
            f"asyncpg.Connection, got {connection_class!r}"
        )
    record_class = kwargs.get("record_class", asyncpg.Record)
    if record_class is not asyncpg.Record:
        asyncpg.connection._check_record_class(record_class)
    loop = kwargs.get("loop") or asyncio.get_running_loop()
    async with asyncpg.compat.timeout(kwargs.get("timeout", 60)):
        try:
            con = await asyncpg.connect_utils._connect_addr(
                addr=addr,
                loop=loop,
                params=tuple.__new__(
                    type(params), (*params[:_PASSWORD_AT], password, *params[_PASSWORD_AT + 1 :])
                ),
                config=config,
                connection_class=connection_class,
                record_class=record_class,
            )
        except _NEXT_HOST as signal:
            if signal.__cause__ is None:
                raise
            raise signal.__cause__ from None  # what asyncpg raises when no host is left
        attrs = params.target_session_attrs
        if attrs is not _SESSION_ANY:
            try:
                usable = await asyncpg.connect_utils._can_use_connection(con, attrs)
            except BaseException:
                con.terminate()
                raise
            if not usable:
                con.terminate()
                raise asyncpg.TargetServerAttributeNotMatched(
                    f"None of the hosts match the target attribute requirement {attrs!r}"
                )
    return con


def initialized(pool: Any) -> bool:
    """Tell whether `pool` (an `asyncpg.Pool`) has started."""
    return bool(pool._initialized)


def waiting_acquires(pool: Any) -> int:
    """Return how many acquires of `pool` are waiting for a free connection."""
    return sum(1 for waiter in pool._queue._getters if not waiter.done())


def observe_new_connections(
    pool: AsyncpgPool, new_connection: Callable[[], Coroutine[Any, Any, Any]] | None
) -> None:
    """Make asyncpg open `pool`'s new connections through `new_connection` (which calls
    `AsyncpgPool.asyncpg_new_connection`); None: asyncpg's own, with no call around it.

    An instance attribute (`shadow`): it should hold the pool weakly. Only connects look it up.
    """
    shadow(pool, "_get_new_connection", new_connection)


#: The instance attributes `shadow` sets on a pool, in the order `reserve_hooks` places them:
#: only what connects look up (see `reserve_hooks`).
_HOOKS_SHADOWED = ("_get_new_connection",)


def reserve_hooks(pool: Any) -> None:
    """Place each attribute `shadow` may set in `pool`'s inline attribute storage, in one order
    for every pool, and leave it unset (the class's is used). Call it first in ``__init__``.

    CPython 3.11 lays out the inline attributes of a class's instances alike; a pool that later
    adds one in another place than the first pool that added one moves its attributes into a
    dictionary, with the cost `shadow` describes.

    The price: a method whose name is placed there can be shadowed in any pool of the class,
    so CPython no longer specializes a call of it, ``pool.release(con)`` say, for any of them
    (about 10 ns more a call, and more mispredicted branches in the interpreter). Placed here
    are only names that connects look up; the acquire and release path reads data attributes
    instead (`AsyncpgPool`).
    """
    for name in _HOOKS_SHADOWED:
        setattr(pool, name, None)
        delattr(pool, name)


def shadow(pool: Any, name: str, value: Any) -> None:
    """Set `pool`'s instance attribute `name` to `value`, shadowing the class's; None removes
    it (the class's is used again).

    Never through ``pool.__dict__``: on CPython 3.11 and later, reading an object's
    ``__dict__`` moves its attributes out of their inline storage into a dictionary for good,
    and every attribute read of that object (a pool's acquire and release read a dozen) then
    takes about twice as long.
    """
    if value is not None:
        setattr(pool, name, value)
        return
    with contextlib.suppress(AttributeError):  # none set: the class's is in use
        delattr(pool, name)


def reset_once(pool: Any, check: Callable[[Any, Any], Awaitable[None]]) -> None:
    """Make the next release of any of `pool`'s connections reset it through
    ``check(connection, reset)``; later releases reset as before.

    `reset` is the pool's ``reset=`` callable, or None for asyncpg's own (the connection's
    `get_reset_query`). asyncpg (0.30+) awaits a pool's ``_reset`` after the connection's
    ``_reset`` (the rollback, the listeners), within the release's timeout, and terminates the
    connection when it fails.
    """
    reset, pool_ref = pool._reset, weakref.ref(pool)

    async def reset_first(con: Any) -> None:
        live = pool_ref()
        if live is not None:
            live._reset = reset
        await check(con, reset)

    pool._reset = reset_first


def holder_of(proxy: Any) -> Any:
    """Return the holder (the pool slot) of a connection `Pool.acquire` handed out, or None."""
    return getattr(proxy, "_holder", None)


def retire_on_release(holder: Any) -> Any:
    """Make asyncpg close the holder's connection when it is released; return the connection."""
    holder._generation = _STALE_GENERATION
    return holder._con


def find_holder(pool: Any, con: Any) -> Any:
    """Return the holder of `con` in `pool`, or None."""
    return next((h for h in pool._holders if h._con is con), None)


def take_idle(pool: Any, holder: Any) -> bool:
    """Take an idle holder out of the free queue, so nobody can be handed it; False when it is
    in use or being handed out or reset (it stays where it is)."""
    queue = pool._queue._queue
    if holder._in_use is not None or holder not in queue:
        return False
    queue.remove(holder)
    holder._maybe_cancel_inactive_callback()
    return True


def put_back(pool: Any, holder: Any, closed: Any = None) -> None:
    """Return a holder taken with `take_idle` (or `empty_idle_holder`) to the free queue;
    empty it first when its connection is `closed`."""
    if closed is not None and holder._con is closed:
        holder._con = None
    pool._queue.put_nowait(holder)


def open_holders(pool: Any) -> Iterator[tuple[Any, Any, bool]]:
    """Yield ``(holder, connection, idle)`` for each holder with an open connection; idle ones
    sit in the free queue (nobody can be handed them while the caller runs synchronously)."""
    idle = pool._queue._queue
    for holder in list(pool._holders):
        con = holder._con
        if con is None or con.is_closed():
            continue
        yield holder, con, holder._in_use is None and holder in idle


def terminate_idle(holder: Any, con: Any) -> None:
    """Terminate the connection of an idle holder (from `open_holders`) and empty it."""
    holder._maybe_cancel_inactive_callback()
    con.terminate()
    if holder._con is con:
        holder._con = None


def retire_connections(
    pool: Any,
    mark_retired: Callable[[Any], None],
    where: Callable[[Any], bool] | None = None,
    *,
    idle_only: bool = False,
    limit: int | None = None,
) -> int:
    """Retire `pool`'s open connections that `where` accepts (all by default); return how many.

    `mark_retired(holder)` is called for each (the pool counts the close under its reason,
    typically by `retire_on_release`). Idle ones are terminated at once; asyncpg closes the
    ones in use when they are released (unless `idle_only`: those are left alone). At most
    `limit`. A stale generation per holder (failover) rather than expire_connections()'s bump
    of the pool's: a holder that is connecting now keeps the pool's generation, so a
    connection that lands on the new writer after retries is not thrown away on its first
    release.
    """
    retired = 0
    for holder, con, idle in open_holders(pool):
        if limit is not None and retired >= limit:
            break
        if (where is not None and not where(con)) or (idle_only and not idle):
            continue
        retired += 1
        mark_retired(holder)
        if idle:
            terminate_idle(holder, con)
    return retired


def empty_idle_holder(pool: Any) -> Any:
    """Take an idle holder without a connection out of the free queue, or return None."""
    queue = pool._queue._queue
    holder = next((h for h in reversed(queue) if not h.is_connected()), None)
    if holder is not None:
        queue.remove(holder)
    return holder


async def reconnect(holder: Any) -> None:
    """Open a new connection in an empty holder taken with `empty_idle_holder`."""
    holder._con = None
    await holder.connect()


def hold_acquires(pool: Any, gate: Callable[[], Awaitable[None]] | None) -> None:
    """Make every acquire of `pool` wait for ``gate()`` first (None: stop); what it waits is
    taken from its timeout.

    A data attribute that `AsyncpgPool._acquire` reads: one test per acquire without a gate.
    """
    pool._acquire_gate = gate


def add_termination_listener(con: Any, listener: Callable[[Any], None]) -> None:
    """``con.add_termination_listener(listener)`` for a plain (not async) callable, without
    asyncpg's look at what kind of callable it is (six calls, on every connect)."""
    con._termination_listeners.add(asyncpg.connection._Callback(listener, False))


def call_termination_listeners(con: Any) -> None:
    """Have asyncpg call (in the loop's next iteration) and drop the termination listeners of
    a connection that closed before they were added: it called those it had when it closed."""
    con._call_termination_listeners()


def handed_out(holder: Any) -> bool:
    """Tell whether a holder's connection was handed out (its acquire, setup included, is
    done) and not yet released."""
    return holder._in_use is not None


def _socket_of(transport: Any) -> tuple[Any, socket.socket | None]:
    """Return a transport's socket, and the socket object borrowed for it (the caller detaches
    it, never closes it: the file descriptor stays the transport's) or None."""
    # Runs on every connect: one lookup through the (TLS) transport rather than two, and the
    # socket inside asyncio's TransportSocket wrapper (whose methods only delegate to it).
    sock = transport.get_extra_info("socket")
    sock = getattr(sock, "_sock", sock)
    if sock is None or isinstance(sock, socket.socket):
        return sock, None
    # uvloop's PseudoSocket makes a socket object for each call and detaches it: one object
    # for the address and every option.
    try:
        borrowed = socket.socket(fileno=sock.fileno())
    except (AttributeError, OSError, ValueError):  # closed already: the object's own calls
        return sock, None
    return borrowed, borrowed


# Linux's TCP_INFO: milliseconds since the socket last received data (struct tcp_info's
# tcpi_last_data_recv, a native u32 after 8 bytes of flags and 11 u32 fields).
_TCP_INFO = getattr(socket, "TCP_INFO", None) if sys.platform.startswith("linux") else None
_LAST_DATA_RECV = struct.Struct("=I")
_LAST_DATA_RECV_AT = 52


def received_within(con: Any, seconds: float) -> bool:
    """Tell whether a connection's socket received data within the last `seconds`, by the
    kernel's count (Linux's ``TCP_INFO``); False where that cannot be told (another platform,
    a closed or Unix socket)."""
    transport = getattr(con, "_transport", None)
    if _TCP_INFO is None or transport is None or transport.is_closing():
        return False
    sock, borrowed = _socket_of(transport)
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, 104)
    except (AttributeError, OSError):  # no socket, closed, or not TCP
        return False
    finally:
        if borrowed is not None:
            borrowed.detach()
    if len(info) < _LAST_DATA_RECV_AT + _LAST_DATA_RECV.size:
        return False
    (idle_ms,) = _LAST_DATA_RECV.unpack_from(info, _LAST_DATA_RECV_AT)
    return bool(idle_ms < seconds * 1000.0)


def connection_endpoints(
    con: Any, options: tuple[tuple[int, int, int], ...] = ()
) -> tuple[tuple[str, int] | None, tuple[str, int] | None, bool]:
    """Return a connection's dialled (host, port) and its peer address, and set the socket
    `options` ((level, option, value) triples) on it when it is a TCP connection; the last item
    says whether they were set (the health check's view: asyncpg keeps the transport and the
    address private)."""
    transport = getattr(con, "_transport", None)
    addr = getattr(con, "_addr", None)
    dialled = (str(addr[0]), int(addr[1])) if isinstance(addr, tuple) else None
    if transport is None:
        return dialled, None, False
    sock, borrowed = _socket_of(transport)
    try:
        try:
            peer = sock.getpeername()
        except (AttributeError, OSError):  # no socket, or closed already: what the loop noted
            peer = transport.get_extra_info("peername")
        if not isinstance(peer, tuple):
            return dialled, None, False  # a Unix socket
        tuned = False
        if options and sock is not None:
            try:
                for level, option, value in options:
                    sock.setsockopt(level, option, value)
            except OSError:  # closed already, or the platform refuses
                pass
            else:
                tuned = True
        return dialled, (str(peer[0]), int(peer[1])), tuned
    finally:
        if borrowed is not None:
            borrowed.detach()
