"""`Pool`, an `asyncpg.Pool` that signs a fresh IAM token for every new connection.

Per connect the password is a callable bound to the host and port being dialled: it takes
frozen credentials from the cache and signs (microseconds, no I/O in the steady state). Every
connection lives at most `max_lifetime` seconds (see `_lifetime`), new connections are
rate-limited with `max_connect_rate`, and a refused login becomes an `IAMAuthenticationError`
that says what was signed for whom and what most likely went wrong.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import functools
import inspect
import logging
import os
import ssl as ssl_module
import urllib.parse
import weakref
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import asyncpg
import asyncpg.connect_utils
import asyncpg.pool
from asyncpg.exceptions import (
    CannotConnectNowError,
    ClientConfigurationError,
    InvalidAuthorizationSpecificationError,
    TargetServerAttributeNotMatched,
)

from ._auth import IAMAuth, SigningTarget, TokenProvider, TokenRecord, failure_context
from ._clock import SYSTEM_CLOCK, Clock
from ._errors import (
    ConfigurationError,
    IAMAuthenticationError,
    diagnose_auth_failure,
)
from ._lifetime import Recycler, TokenBucket
from ._tls import default_ssl_context

__all__ = ["Pool", "PoolStats", "create_pool"]

logger = logging.getLogger("asyncpg_iam.pool")

#: The asyncpg versions whose private pool internals this module is tested against.
SUPPORTED_ASYNCPG = ((0, 30), (0, 32))


def _asyncpg_version() -> tuple[int, int]:
    major, minor = asyncpg.__version__.split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def _check_asyncpg_version() -> None:
    low, high = SUPPORTED_ASYNCPG
    if not low <= _asyncpg_version() <= high:
        raise ImportError(
            f"asyncpg-iam supports asyncpg {low[0]}.{low[1]} to {high[0]}.{high[1]}, found "
            f"{asyncpg.__version__}: its pool overrides asyncpg internals that change between "
            "minor versions. Install a supported asyncpg or upgrade asyncpg-iam."
        )


_check_asyncpg_version()

_POOL_DEFAULTS = {
    name: param.default
    for name, param in inspect.signature(asyncpg.create_pool).parameters.items()
    if param.kind is inspect.Parameter.KEYWORD_ONLY
}
_CONNECT_DEFAULTS = {
    name: param.default
    for name, param in inspect.signature(asyncpg.connect).parameters.items()
    if param.default is not inspect.Parameter.empty
}
_PARSE_PARAMETERS = tuple(
    inspect.signature(asyncpg.connect_utils._parse_connect_arguments).parameters
)
_INSECURE_SSLMODES = {"disable", "allow", "prefer"}
# How long closing a connection found due on acquire may take before it is terminated.
_DISCARD_CLOSE_TIMEOUT = 5.0


@dataclasses.dataclass(frozen=True, slots=True)
class PoolStats:
    """A snapshot of what a pool has done since it was created.

    `connections_closed` counts closes by reason: ``"max_lifetime"`` (retired by the
    recycler, idle or on release), ``"discarded_on_acquire"`` (due when it was about to be
    handed out) and ``"other"`` (errors, asyncpg's idle timeout, ``max_queries``, pool close).
    """

    connections_opened: int
    """Connections opened and added to the pool."""
    connections_closed: Mapping[str, int]
    """Connections closed, by reason."""
    connect_attempts: int
    """Calls to open a connection (each may try several hosts)."""
    connect_failures: int
    """Connection attempts that raised, authentication failures included."""
    auth_failures: int
    """Logins the server refused (each raised as `IAMAuthenticationError`)."""
    tokens_signed: int
    """Tokens signed."""
    token_reuses: int
    """Connects that presented a recently signed token again (``token_reuse``)."""
    credential_fetches: int
    """Fetches from the AWS credential source (successful or not)."""
    connects_rate_limited: int
    """Login attempts that waited for ``max_connect_rate``."""
    open_connections: int
    """Connections open when the snapshot was taken."""


class _Counters:
    __slots__ = (
        "auth_failures",
        "closed",
        "connect_attempts",
        "connect_failures",
        "connects_rate_limited",
        "opened",
    )

    def __init__(self) -> None:
        self.opened = 0
        self.closed: Counter[str] = Counter()
        self.connect_attempts = 0
        self.connect_failures = 0
        self.auth_failures = 0
        self.connects_rate_limited = 0


@dataclasses.dataclass(frozen=True, slots=True)
class _ConnectPlan:
    """The parsed connection settings a pool dials with."""

    addrs: tuple[tuple[str, int], ...]
    user: str
    database: str | None
    target_session_attrs: str
    connect_kwargs: dict[str, Any]


def _validate_pool_options(
    max_lifetime: float | None, jitter: float, max_connect_rate: float | None
) -> None:
    if max_lifetime is not None and (
        isinstance(max_lifetime, bool)
        or not isinstance(max_lifetime, (int, float))
        or not 0 < max_lifetime < float("inf")
    ):
        raise ConfigurationError(
            f"max_lifetime must be seconds > 0 (900 matches the token's validity) or None to "
            f"keep connections forever, not {max_lifetime!r}"
        )
    if isinstance(jitter, bool) or not isinstance(jitter, (int, float)) or not 0 <= jitter < 1:
        raise ConfigurationError(
            f"max_lifetime_jitter must be a fraction in [0, 1) (0.1 spreads reconnects over "
            f"the last 10% of the lifetime), not {jitter!r}"
        )
    if max_connect_rate is not None and (
        isinstance(max_connect_rate, bool)
        or not isinstance(max_connect_rate, (int, float))
        or not 0 < max_connect_rate < float("inf")
    ):
        raise ConfigurationError(
            f"max_connect_rate must be new connections per second > 0, or None for no limit, "
            f"not {max_connect_rate!r}"
        )


def _dsn_query(dsn: str | None) -> dict[str, list[str]]:
    if not dsn:
        return {}
    try:
        return urllib.parse.parse_qs(urllib.parse.urlsplit(dsn).query)
    except (ValueError, TypeError) as exc:
        raise ConfigurationError(
            f"invalid dsn: {exc}; pass one like 'postgresql://user@host:5432/database'"
        ) from exc


def _tls_kwargs(dsn: str | None, connect_kwargs: dict[str, Any]) -> dict[str, Any]:
    """Return `connect_kwargs` with verify-full TLS filled in when the caller chose nothing."""
    query = _dsn_query(dsn)
    chose_tls = (
        "ssl" in connect_kwargs
        or "sslmode" in query
        or "ssl" in query
        or os.environ.get("PGSSLMODE")
    )
    if chose_tls:
        return connect_kwargs
    if "sslrootcert" in query or os.environ.get("PGSSLROOTCERT"):
        # asyncpg loads the given root certificate for a verify-full string, not for a context.
        return {**connect_kwargs, "ssl": "verify-full"}
    try:
        context = default_ssl_context()
    except (OSError, ssl_module.SSLError) as exc:
        raise ConfigurationError(
            f"cannot load the CA bundle for verify-full TLS ({exc.__class__.__name__}): check "
            "$ASYNCPG_IAM_CA_BUNDLE, run `asyncpg-iam ca-bundle`, or pass ssl=<SSLContext>"
        ) from exc
    return {**connect_kwargs, "ssl": context}


def _parse(dsn: str | None, connect_kwargs: dict[str, Any]) -> tuple[Any, Any]:
    """Parse connection settings exactly as asyncpg will, without connecting."""
    arguments = {
        name: connect_kwargs.get(name, _CONNECT_DEFAULTS.get(name)) for name in _PARSE_PARAMETERS
    }
    arguments["dsn"] = dsn
    try:
        addrs, params, _config = asyncpg.connect_utils._parse_connect_arguments(**arguments)
    except (ClientConfigurationError, ValueError, TypeError, AttributeError) as exc:
        # asyncpg's parser fails on wrongly typed values (host=1) with AttributeError too.
        raise ConfigurationError(f"invalid connection settings: {exc}") from exc
    return addrs, params


def _plan(dsn: str | None, connect_kwargs: dict[str, Any], *, iam: bool) -> _ConnectPlan:
    if iam:
        dsn_password = None
        if dsn:
            try:
                dsn_password = urllib.parse.urlsplit(dsn).password
            except ValueError:
                dsn_password = None  # _parse reports the malformed DSN
        if connect_kwargs.get("password") is not None or dsn_password:
            raise ConfigurationError(
                "password cannot be combined with IAM authentication: the token is the "
                "password. Drop password=..., or pass iam=False for a static password"
            )
        connect_kwargs = _tls_kwargs(dsn, connect_kwargs)
    addrs, params = _parse(dsn, connect_kwargs)
    tcp_addrs: list[tuple[str, int]] = []
    for addr in addrs:
        if isinstance(addr, str):
            if iam:
                raise ConfigurationError(
                    f"IAM authentication needs TLS over TCP, but {addr!r} is a Unix socket: "
                    "pass host='<endpoint>'"
                )
            continue
        tcp_addrs.append((str(addr[0]), int(addr[1])))
    if iam:
        sslmode = getattr(params, "sslmode", None)
        mode = getattr(sslmode, "name", str(sslmode)).replace("_", "-")
        # asyncpg < 0.32 labels an explicit SSLContext "disable"; it still insists on TLS.
        explicit_context = isinstance(connect_kwargs.get("ssl"), ssl_module.SSLContext)
        if not explicit_context and (not params.ssl or mode in _INSECURE_SSLMODES):
            raise ConfigurationError(
                f"sslmode {mode!r} could send the IAM token over an unencrypted connection, "
                "where anyone on the path could use it for 15 minutes. Use ssl='verify-full' "
                "(the default when ssl is not given), 'verify-ca', 'require', or an "
                "ssl.SSLContext"
            )
    tsa = getattr(params.target_session_attrs, "value", str(params.target_session_attrs))
    return _ConnectPlan(
        addrs=tuple(tcp_addrs),
        user=str(params.user),
        database=params.database,
        target_session_attrs=str(tsa),
        connect_kwargs=connect_kwargs,
    )


async def open_any_host(
    targets: Sequence[SigningTarget],
    open_target: Callable[[SigningTarget, dict[str, Any]], Awaitable[Any]],
    kwargs: dict[str, Any],
    target_session_attrs: str,
) -> Any:
    """Open a connection to the first of `targets` that answers and has the wanted role.

    asyncpg calls the password callable without saying which host it dials, so each host
    gets its own connect call (``open_target(target, per_host_kwargs)``) with its own token;
    `target_session_attrs` is applied the way asyncpg applies it across hosts.
    """
    loop = asyncio.get_running_loop()
    timeout = kwargs.get("timeout", _CONNECT_DEFAULTS.get("timeout"))
    deadline = None if timeout is None else loop.time() + float(timeout)
    passes = (
        ["standby", "any"] if target_session_attrs == "prefer-standby" else [target_session_attrs]
    )
    last_error: BaseException | None = None
    for attrs in passes:
        for target in targets:
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                raise asyncio.TimeoutError("connect timed out trying every host")
            per_host = {**kwargs, "target_session_attrs": attrs}
            if remaining is not None:
                per_host["timeout"] = remaining
            try:
                return await open_target(target, per_host)
            except (
                OSError,
                asyncio.TimeoutError,
                CannotConnectNowError,
                TargetServerAttributeNotMatched,
            ) as exc:
                last_error = exc
    assert last_error is not None
    raise last_error


def explain_auth_failure(
    exc: InvalidAuthorizationSpecificationError,
    target: SigningTarget,
    record: TokenRecord,
    *,
    provider: TokenProvider,
    database: str | None,
    now: dt.datetime,
    owner: str,
) -> IAMAuthenticationError:
    """Turn a refused login into an `IAMAuthenticationError` with ranked hints, and log it.

    `owner` names what was connecting (``"pool app@host:5432"``) in the log line.
    """
    context = failure_context(
        exc, target, record, credentials=provider.credentials, database=database, now=now
    )
    error = IAMAuthenticationError(context, diagnose_auth_failure(context))
    logger.warning(
        "%s: IAM login refused for %s at %s:%s (region %s): %s",
        owner,
        target.user,
        target.host,
        target.port,
        target.region,
        error.hints[0],
    )
    return error


class Pool(asyncpg.Pool):  # type: ignore[misc]
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
        max_lifetime: float | None = 900.0,
        max_lifetime_jitter: float = 0.1,
        max_connect_rate: float | None = None,
        name: str | None = None,
        clock: Clock = SYSTEM_CLOCK,
        **kwargs: Any,
    ) -> None:
        _validate_pool_options(max_lifetime, max_lifetime_jitter, max_connect_rate)
        if not isinstance(iam, (bool, IAMAuth)):
            raise ConfigurationError(
                f"iam must be True (the default AWS credential chain), False (no IAM) or an "
                f"asyncpg_iam.IAMAuth, not {type(iam).__name__}"
            )
        pool_kwargs = {k: kwargs.pop(k, default) for k, default in _POOL_DEFAULTS.items()}
        user_connect = pool_kwargs.pop("connect") or asyncpg.connect
        auth = IAMAuth() if iam is True else (iam or None)
        self._plan = _plan(dsn, kwargs, iam=auth is not None)
        self._provider = TokenProvider(auth, clock=clock) if auth is not None else None
        self._targets: tuple[SigningTarget, ...] = ()
        if self._provider is not None:
            self._targets = tuple(
                self._provider.target(host, port, self._plan.user)
                for host, port in self._plan.addrs
            )
        self._clock = clock
        self._user_connect: Callable[..., Any] = user_connect
        self._counters = _Counters()
        self._bucket = (
            TokenBucket(max_connect_rate, clock=clock, stagger=True) if max_connect_rate else None
        )
        self._max_lifetime = max_lifetime
        first = self._plan.addrs[0] if self._plan.addrs else ("<socket>", 0)
        self._name = name or f"{self._plan.user}@{first[0]}:{first[1]}"
        try:
            super().__init__(
                dsn,
                connect=_bound_connect(weakref.ref(self)),
                **pool_kwargs,
                **self._plan.connect_kwargs,
            )
        except (ValueError, TypeError) as exc:  # asyncpg's checks of min_size, max_size, ...
            raise ConfigurationError(f"invalid pool settings: {exc}") from exc
        self._recycler = Recycler(
            self,
            max_lifetime=max_lifetime,
            jitter=max_lifetime_jitter,
            on_closed=weakref.WeakMethod(self._on_connection_closed),
            clock=clock,
        )
        self._own_refill = not hasattr(asyncpg.pool.Pool, "_schedule_min_size_maintenance")
        self._refill_task: asyncio.Task[None] | None = None
        self._shutdown_task: asyncio.Task[None] | None = None
        # Clock time at which each new connection's login began (read once it joins the pool).
        self._login_started: weakref.WeakKeyDictionary[Any, float] = weakref.WeakKeyDictionary()

    # -- introspection ---------------------------------------------------------------------

    @property
    def name(self) -> str:
        """The pool's name, used in its repr and log lines (``user@host:port`` by default)."""
        return self._name

    @property
    def iam(self) -> IAMAuth | None:
        """The IAM settings, or None for a pool without IAM."""
        return self._provider.auth if self._provider is not None else None

    def stats(self) -> PoolStats:
        """Return a snapshot of the pool's counters."""
        counters = self._counters
        provider = self._provider
        return PoolStats(
            connections_opened=counters.opened,
            connections_closed=dict(counters.closed),
            connect_attempts=counters.connect_attempts,
            connect_failures=counters.connect_failures,
            auth_failures=counters.auth_failures,
            tokens_signed=provider.tokens_signed if provider else 0,
            token_reuses=provider.token_reuses if provider else 0,
            credential_fetches=provider.credentials.fetches if provider else 0,
            connects_rate_limited=counters.connects_rate_limited,
            open_connections=self.get_size(),
        )

    def __repr__(self) -> str:
        return (
            f"<asyncpg_iam.Pool {self._name!r} iam={self._provider is not None} "
            f"max_lifetime={self._max_lifetime} size={self.get_size()}"
            f"/{self.get_max_size()}>"
        )

    # -- connecting ------------------------------------------------------------------------

    async def _get_new_connection(self) -> Any:
        con = await super()._get_new_connection()
        self._counters.opened += 1
        # The lifetime starts at the login, so connect and init time count against it.
        self._recycler.track(con, self._login_started.pop(con, None))
        logger.debug("pool %s: opened connection (pid %s)", self._name, con.get_server_pid())
        return con

    async def _throttle(self) -> None:
        """Take a slot of the connect rate limit; every login attempt takes one."""
        if self._bucket is not None and await self._bucket.acquire() > 0:
            self._counters.connects_rate_limited += 1

    async def _open(self, *args: Any, **kwargs: Any) -> Any:
        """Open one connection: a token per host tried, each login within the rate limit."""
        self._counters.connect_attempts += 1
        try:
            if self._provider is None:
                await self._throttle()
                started = self._clock.monotonic()
                con = await self._user_connect(*args, **kwargs)
                self._login_started[con] = started
                return con
            if len(self._targets) == 1:
                return await self._open_target(self._targets[0], args, kwargs, override=False)
            return await self._open_multi_host(args, kwargs)
        except BaseException:
            self._counters.connect_failures += 1
            raise

    async def _open_multi_host(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return await open_any_host(
            self._targets,
            lambda target, per_host: self._open_target(target, args, per_host, override=True),
            kwargs,
            self._plan.target_session_attrs,
        )

    async def _open_target(
        self,
        target: SigningTarget,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        *,
        override: bool,
    ) -> Any:
        assert self._provider is not None
        await self._throttle()
        record = TokenRecord()
        password = functools.partial(self._provider.token, target, record)
        kwargs = {**kwargs, "password": password}
        if override:
            kwargs.update(host=target.host, port=target.port)
        started = self._clock.monotonic()
        try:
            con = await self._user_connect(*args, **kwargs)
        except InvalidAuthorizationSpecificationError as exc:
            if isinstance(exc, IAMAuthenticationError):
                raise
            self._counters.auth_failures += 1
            raise self._explain(exc, target, record) from exc
        self._login_started[con] = started
        return con

    def _explain(
        self,
        exc: InvalidAuthorizationSpecificationError,
        target: SigningTarget,
        record: TokenRecord,
    ) -> IAMAuthenticationError:
        assert self._provider is not None
        return explain_auth_failure(
            exc,
            target,
            record,
            provider=self._provider,
            database=self._plan.database,
            now=self._clock.now(),
            owner=f"pool {self._name}",
        )

    # -- lifetime --------------------------------------------------------------------------

    async def _acquire(self, timeout: float | None) -> Any:
        started = self._loop.time()
        proxy = await super()._acquire(timeout)
        while self._recycler.is_due(proxy._con):
            # Due while it waited to be handed out: retire it and try again within the
            # caller's timeout.
            self._recycler.retire_on_release(proxy._holder, "discarded_on_acquire")
            remaining = None if timeout is None else started + timeout - self._loop.time()
            close_timeout = _DISCARD_CLOSE_TIMEOUT
            if remaining is not None:
                close_timeout = min(close_timeout, max(remaining, 0.1))
            await super().release(proxy, timeout=close_timeout)
            if timeout is not None:
                remaining = max(0.0, started + timeout - self._loop.time())
            proxy = await super()._acquire(remaining)
        return proxy

    def _on_connection_closed(self, reason: str) -> None:
        self._counters.closed[reason] += 1
        if self._own_refill:
            self._schedule_refill()

    def _schedule_refill(self) -> None:
        if (
            self._refill_task is not None
            or self.is_closing()
            or not self._initialized
            or self.get_min_size() == 0
        ):
            return
        self._refill_task = asyncio.get_running_loop().create_task(
            _refill(weakref.ref(self)), name=f"asyncpg_iam refill {self._name}"
        )

    # -- opening and closing ---------------------------------------------------------------

    async def _async__init__(self) -> Any:
        starting = not self._initialized
        try:
            result = await super()._async__init__()
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
                self._provider.credentials.source if self._provider is not None else "off",
                self._max_lifetime,
            )
        return result

    async def close(self) -> None:
        """Wait for every connection to be released, close them all, then the pool."""
        self._recycler.cancel()
        try:
            await super().close()
        finally:
            await self._shutdown()
            logger.info("pool %s: closed; %s", self._name, self.stats())

    def terminate(self) -> None:
        """Terminate every connection at once (no waiting for them to be released)."""
        self._recycler.cancel()
        super().terminate()
        if self._refill_task is not None:
            self._refill_task.cancel()
        if self._provider is not None and self._shutdown_task is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return  # no loop to close the credential cache on: it holds no connection
            self._shutdown_task = loop.create_task(self._shutdown())

    async def _shutdown(self) -> None:
        if self._refill_task is not None:
            self._refill_task.cancel()
        if self._provider is not None:
            await self._provider.aclose()  # idempotent


def _bound_connect(pool_ref: weakref.ref[Pool]) -> Callable[..., Any]:
    """Return asyncpg's ``connect=`` callable, holding the pool weakly (no reference cycle)."""

    async def connect(*args: Any, **kwargs: Any) -> Any:
        pool = pool_ref()
        if pool is None:
            raise asyncpg.InterfaceError("the pool was garbage-collected")
        return await pool._open(*args, **kwargs)

    return connect


async def _refill(pool_ref: weakref.ref[Pool]) -> None:
    """Reconnect idle holders until the pool is back at min_size (asyncpg < 0.32 only)."""
    delay = 1.0
    try:
        while True:
            pool = pool_ref()
            if pool is None or pool.is_closing() or pool.get_size() >= pool.get_min_size():
                return
            queue = pool._queue._queue
            holder = next((h for h in reversed(queue) if not h.is_connected()), None)
            if holder is None:
                return  # every empty holder is being connected by an acquirer
            queue.remove(holder)
            failed = False
            try:
                holder._con = None
                await holder.connect()
            except Exception:
                failed = True
                logger.warning(
                    "pool %s: refilling to min_size failed; retrying in %.0f s",
                    pool.name,
                    delay,
                    exc_info=True,
                )
            finally:
                pool._queue.put_nowait(holder)
            del pool, holder
            if failed:
                await asyncio.sleep(delay)
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
    max_lifetime: float | None = 900.0,
    max_lifetime_jitter: float = 0.1,
    max_connect_rate: float | None = None,
    **asyncpg_kwargs: Any,
) -> Pool:
    """Create an IAM-authenticated connection pool; await it (or ``async with`` it).

    Takes every argument of `asyncpg.create_pool` and `asyncpg.connect` (host, port, user,
    database, min_size, max_size, setup, init, reset, connect, server_settings, ...), plus:

    - `iam`: True signs tokens with the default AWS credential chain; an `IAMAuth` chooses the
      profile, role, region, signing endpoint and token reuse; False disables IAM (a plain
      pool that still recycles).
    - `max_lifetime`: no connection lives longer than this many seconds (None: forever).
      Connections in use are never interrupted; they close when released.
    - `max_lifetime_jitter`: a connection that replaces one retired at its lifetime lives
      ``[max_lifetime * (1 - jitter), max_lifetime]``; any other (the pool filling up,
      growing, reconnecting after a drop) starts with a lifetime spread over the last 75 %
      of `max_lifetime`, so connections opened together do not come due together. 0 makes
      every lifetime exactly `max_lifetime`.
    - `max_connect_rate`: at most this many new connections per second (None: no limit).
      The first connect after a quiet interval waits a random part of one interval, so pools
      that lose their connections together reconnect out of step.
    - `name`: the pool's name in logs and its repr.

    With IAM, TLS defaults to verify-full (against the RDS CA bundle that ``asyncpg-iam
    ca-bundle`` caches, else the system store), and sslmode disable/allow/prefer raise
    `ConfigurationError`, since the token would travel in clear.
    """
    return Pool(
        dsn,
        iam=iam,
        max_lifetime=max_lifetime,
        max_lifetime_jitter=max_lifetime_jitter,
        max_connect_rate=max_connect_rate,
        **asyncpg_kwargs,
    )
