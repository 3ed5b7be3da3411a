"""Pin the private asyncpg internals `asyncpg_iam._asyncpg_pool` relies on (the one module that
names them), so an asyncpg change fails here first."""

from __future__ import annotations

import asyncio
import inspect
import re

import asyncpg
import asyncpg.connect_utils
import asyncpg.pool

import asyncpg_iam
from asyncpg_iam import _asyncpg_pool


def test_supported_version() -> None:
    """The installed asyncpg is inside the range the pool states it supports."""
    low, high = _asyncpg_pool.SUPPORTED_ASYNCPG
    assert low <= _asyncpg_pool.asyncpg_version() <= high


def test_pool_methods_we_override_exist() -> None:
    """Pool._get_new_connection, _acquire, _async__init__ and release keep their shapes."""
    pool_cls = asyncpg.pool.Pool
    assert list(inspect.signature(pool_cls._acquire).parameters) == ["self", "timeout"]
    assert list(inspect.signature(pool_cls._get_new_connection).parameters) == ["self"]
    assert "timeout" in inspect.signature(pool_cls.release).parameters
    assert list(inspect.signature(pool_cls._async__init__).parameters) == ["self"]
    assert list(inspect.signature(pool_cls._check_init).parameters) == ["self"]
    pinned = ("_holders", "_queue", "_generation", "_initialized", "_initializing", "_closed")
    for name in (*pinned, "_minsize"):
        assert name in pool_cls.__slots__ or name in inspect.getsource(pool_cls.__init__)


def test_the_adapter_routes_asyncpg_hooks_to_the_pool_without_a_layer() -> None:
    """asyncpg's _get_new_connection and _async__init__ are the Pool's own methods, and the
    adapter's asyncpg_* names are asyncpg's originals."""
    for hook, ours in _asyncpg_pool._HOOKS.items():
        assert callable(getattr(asyncpg.pool.Pool, hook))
        assert getattr(asyncpg_iam.Pool, hook) is getattr(asyncpg_iam.Pool, ours)
    assert _asyncpg_pool.AsyncpgPool.asyncpg_new_connection is asyncpg.pool.Pool._get_new_connection
    assert _asyncpg_pool.AsyncpgPool.asyncpg_start is asyncpg.pool.Pool._async__init__


# asyncpg's Pool._acquire, comments and blank lines dropped: what AsyncpgPool._acquire rewrites
# as one coroutine. 0.32 also schedules its min_size refill after a failed holder acquire.
_ACQUIRE_SOURCE = """
async def _acquire(self, timeout):
async def _acquire_impl():
ch = await self._queue.get()
try:
proxy = await ch.acquire()
except (Exception, asyncio.CancelledError):
self._queue.put_nowait(ch)
self._schedule_min_size_maintenance()
raise
else:
ch._timeout = timeout
return proxy
if self._closing:
raise exceptions.InterfaceError('pool is closing')
self._check_init()
if timeout is None:
return await _acquire_impl()
else:
return await compat.wait_for(
_acquire_impl(), timeout=timeout)
"""


def test_pool_acquire_is_the_code_the_adapter_rewrites() -> None:
    """asyncpg's Pool._acquire is, statement for statement, what AsyncpgPool._acquire follows."""
    lines = [
        line.split("#", 1)[0].strip()
        for line in inspect.getsource(asyncpg.pool.Pool._acquire).splitlines()
    ]
    expected = _ACQUIRE_SOURCE.strip().splitlines()
    if not _asyncpg_pool.REFILLS_MIN_SIZE:
        expected.remove("self._schedule_min_size_maintenance()")
    assert [line for line in lines if line] == expected


# asyncpg's Pool.release, docstring, comments and blank lines dropped: what AsyncpgPool.release
# follows, with `_shielded` for asyncio.shield.
_RELEASE_SOURCE = """
async def release(self, connection, *, timeout=None):
if (type(connection) is not PoolConnectionProxy or
connection._holder._pool is not self):
raise exceptions.InterfaceError(
'Pool.release() received invalid connection: '
'{connection!r} is not a member of this pool'.format(
connection=connection))
if connection._con is None:
return
self._check_init()
connection._con._on_release()
ch = connection._holder
if timeout is None:
timeout = ch._timeout
return await asyncio.shield(ch.release(timeout))
"""


def test_pool_release_is_the_code_the_adapter_follows() -> None:
    """asyncpg's Pool.release is, statement for statement, what AsyncpgPool.release follows."""
    lines, in_docstring = [], False
    for line in inspect.getsource(asyncpg.pool.Pool.release).splitlines():
        statement = line.split("#", 1)[0].strip()
        if statement.startswith('"""') or in_docstring:
            in_docstring = not (statement.endswith('"""') and (in_docstring or len(statement) > 3))
        elif statement:
            lines.append(statement)
    assert lines == _RELEASE_SOURCE.strip().splitlines()
    assert asyncpg.pool.PoolConnectionProxy is _asyncpg_pool._PROXY


def test_acquire_context_is_what_the_timed_context_follows() -> None:
    """asyncpg's acquire context has the four slots `TimedAcquireContext` sets itself, and
    enters, leaves and awaits the way it rewrites."""
    context = asyncpg.pool.PoolAcquireContext
    assert set(context.__slots__) == {"pool", "timeout", "connection", "done"}
    assert "return PoolAcquireContext(self, timeout)" in inspect.getsource(
        asyncpg.pool.Pool.acquire
    )
    assert "await self.pool._acquire(self.timeout)" in inspect.getsource(context.__aenter__)
    assert "await self.pool.release(con)" in inspect.getsource(context.__aexit__)
    assert "self.pool._acquire(self.timeout).__await__()" in inspect.getsource(context.__await__)


def test_pool_queue_keeps_its_waiting_getters() -> None:
    """An asyncio queue keeps the futures of waiting get() calls in _getters (waiting_acquires)."""
    queue: asyncio.Queue[int] = asyncio.LifoQueue()
    assert len(queue._getters) == 0  # type: ignore[attr-defined]


def test_pool_connection_proxy_keeps_its_connection_and_holder() -> None:
    """A proxy handed out by acquire keeps _con and _holder, which the adapter reads."""
    assert {"_con", "_holder"} <= set(asyncpg.pool.PoolConnectionProxy.__slots__)


def test_holder_attributes_and_generation_check() -> None:
    """Holders keep _con, _in_use, _generation, and close on release when generations differ."""
    holder = asyncpg.pool.PoolConnectionHolder
    for name in ("_con", "_in_use", "_generation", "_pool"):
        assert name in holder.__slots__
    assert callable(holder._maybe_cancel_inactive_callback)
    # The holder compares its generation with its pool's (asyncpg's code, not ours).
    generation_check = re.compile(r"self\._generation != self\._pool\._generation")
    assert generation_check.search(inspect.getsource(holder.release))
    assert generation_check.search(inspect.getsource(holder.acquire))


def test_pool_queue_is_a_lifo_queue_of_holders() -> None:
    """The pool's free-holder queue is an asyncio.LifoQueue whose items live in a list."""
    source = inspect.getsource(asyncpg.pool.Pool._initialize)
    assert "Queue(maxsize=self._maxsize)" in source
    queue = asyncio.LifoQueue()
    assert isinstance(queue._queue, list)  # type: ignore[attr-defined]


def test_connection_supports_weakrefs_and_termination_listeners() -> None:
    """Connections accept weak references and termination listeners."""
    assert "__weakref__" in dir(asyncpg.Connection)
    assert callable(asyncpg.Connection.add_termination_listener)


def test_termination_listeners_are_a_set_of_callbacks_with_an_async_flag() -> None:
    """A listener added as asyncpg's ``_Callback(cb, False)`` is the one its public method adds."""
    import asyncpg.connection

    def listener(con: object) -> None:
        return None

    assert asyncpg.connection._Callback.from_callable(listener) == asyncpg.connection._Callback(
        listener, False
    )
    source = inspect.getsource(asyncpg.Connection.add_termination_listener)
    assert "self._termination_listeners.add(" in source
    source = inspect.getsource(asyncpg.Connection._call_termination_listeners)
    assert "self._termination_listeners" in source
    assert "cb.is_async" in source


def test_parse_connect_arguments_takes_connect_keywords() -> None:
    """_parse_connect_arguments's parameters are all keywords that asyncpg.connect takes."""
    parse = inspect.signature(asyncpg.connect_utils._parse_connect_arguments).parameters
    connect = inspect.signature(asyncpg.connect).parameters
    assert set(parse) - set(connect) <= {"dsn"}
    assert "target_session_attrs" in parse
    assert "ssl" in parse


def test_connect_is_what_connect_parsed_follows() -> None:
    """asyncpg.connect checks its classes and bounds the whole connect by its timeout; its
    _connect parses the arguments, connects each address with _connect_addr and checks
    target_session_attrs: `connect_parsed` does the same for one address, with asyncpg's
    error. _connect_addr calls a callable password itself ("any" accepts every server)."""
    utils = asyncpg.connect_utils
    connect = inspect.getsource(asyncpg.connect)
    for line in (
        "if not issubclass(connection_class, Connection):",
        "if record_class is not protocol.Record:",
        "_check_record_class(record_class)",
        "async with compat.timeout(timeout):",
    ):
        assert line in connect
    inner = inspect.getsource(utils._connect)
    for line in (
        "addrs, params, config = _parse_connect_arguments(**kwargs)",
        "target_attr = params.target_session_attrs",
        "if await _can_use_connection(conn, target_attr):",
        "'None of the hosts match the target attribute requirement '",
    ):
        assert line in inner
    assert list(inspect.signature(utils._connect_addr).parameters) == [
        "addr",
        "loop",
        "params",
        "config",
        "connection_class",
        "record_class",
    ]
    assert "if callable(params.password):" in inspect.getsource(utils._connect_addr)
    assert utils.target_attrs_check[utils.SessionAttribute.any] is utils._accept_any
    assert "password" in utils._ConnectionParameters._fields
    assert asyncpg.Record is asyncpg.protocol.Record


def test_connect_and_create_pool_defaults_read_without_inspect_match_their_signatures() -> None:
    """The defaults and parameter names the plan and the pool read without inspect are the
    signatures' own."""
    from asyncpg_iam import _connect, _pool

    connect = inspect.signature(asyncpg.connect).parameters
    assert {
        name: param.default
        for name, param in connect.items()
        if param.default is not inspect.Parameter.empty
    } == _connect._CONNECT_DEFAULTS
    pool = inspect.signature(asyncpg.create_pool).parameters
    assert {
        name: param.default
        for name, param in pool.items()
        if param.kind is inspect.Parameter.KEYWORD_ONLY
    } == _pool._POOL_DEFAULTS
    assert _pool._POOL_DEFAULTS  # asyncpg's keywords are keyword-only
    parse = inspect.signature(asyncpg.connect_utils._parse_connect_arguments).parameters
    assert tuple(parse) == _asyncpg_pool.PARSE_PARAMETERS


def test_release_resets_through_the_pools_reset_hook() -> None:
    """A release awaits the pool's `_reset` (after the connection's `_reset`) when set, else
    `Connection.reset`, which sends `get_reset_query()` (what `reset_once` relies on)."""
    source = inspect.getsource(asyncpg.pool.PoolConnectionHolder.release)
    assert "self._pool._reset is not None" in source
    assert "await self._con._reset()" in source
    assert "await self._pool._reset(self._con)" in source
    assert "reset" in inspect.signature(asyncpg.pool.Pool).parameters
    assert "self.get_reset_query()" in inspect.getsource(asyncpg.Connection.reset)


def test_failover_hooks_exist() -> None:
    """Query loggers, close(timeout=) and terminate() exist; holders keep the idle-timer hook."""
    assert callable(asyncpg.Connection.add_query_logger)
    assert "timeout" in inspect.signature(asyncpg.Connection.close).parameters
    assert list(inspect.signature(asyncpg.Connection.terminate).parameters) == ["self"]
    assert "_maybe_cancel_inactive_callback" in dir(asyncpg.pool.PoolConnectionHolder)
    assert "_holders" in inspect.getsource(asyncpg.pool.Pool.__init__)


def test_connection_queries_go_through_execute_and_executemany() -> None:
    """Every fetch runs through Connection._execute and executemany through _executemany, the
    methods the failover guard's reporting connection class wraps."""
    con = asyncpg.Connection
    for method in (con.fetch, con.fetchval, con.fetchrow):
        assert "self._execute(" in inspect.getsource(method)
    assert "self._execute(" in inspect.getsource(con.execute)
    assert "self._executemany(" in inspect.getsource(con.executemany)
    assert inspect.iscoroutinefunction(con._execute)
    assert inspect.iscoroutinefunction(con._executemany)


def test_reset_query_and_jit_switch_for_rds_proxy() -> None:
    """What `_proxy.adopt` changes: get_reset_query returns `_reset_query` once set, and the
    type introspection sets jit only when `_server_caps.jit` says so."""
    connection = asyncpg.connection.Connection
    assert "_reset_query" in connection.__slots__
    assert "_server_caps" in connection.__slots__
    reset_source = inspect.getsource(connection.get_reset_query)
    assert re.search(
        r"if self\._reset_query is not None:\s+return self\._reset_query", reset_source
    )
    introspect = inspect.getsource(connection._introspect_types)
    assert re.search(r"if self\._server_caps\.jit:", introspect)
    assert "jit" in asyncpg.connection.ServerCapabilities._fields


def test_connection_keeps_its_address_and_transport() -> None:
    """Connections keep the dialled address in _addr and the transport in _transport (the
    health check reads the peer address and the socket from them)."""
    source = inspect.getsource(asyncpg.Connection.__init__)
    assert "self._transport = transport" in source
    assert "self._addr = addr" in source
