"""Starlette and FastAPI integration: a lifespan that owns an IAM pool, and a dependency.

    from starlette.applications import Starlette
    import asyncpg_iam.starlette

    app = Starlette(
        routes=[...],
        lifespan=asyncpg_iam.starlette.lifespan(
            host="app.cluster-abc.us-east-1.rds.amazonaws.com", user="app", database="app"
        ),
    )

At startup the lifespan creates the pool and opens a first connection, so a database that
cannot be reached, missing credentials or a refused login fail the startup (with
`CredentialsError`, `IAMAuthenticationError`, `ConfigurationError` or the connect error)
instead of the first request. Handlers find the pool in the lifespan state
(``request.state.pool``, typed by `PoolState`) and in ``app.state.pool``; `connection` hands a
FastAPI handler a pooled connection. At shutdown the pool closes gracefully, waiting for
connections in use for up to `close_timeout` seconds, then terminates what is left.

On AWS Lambda, adapters such as Mangum run the lifespan around every invocation: there the
pool is kept open at shutdown and the next startup in the same event loop reuses it, so an
invocation does not open a pool (`keep_pool`).
Needs the ``starlette`` extra.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager
from typing import Any, TypedDict, cast

try:
    from starlette.requests import HTTPConnection
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "asyncpg_iam.starlette needs Starlette: pip install 'asyncpg-iam[starlette]'"
    ) from exc

import asyncpg

from ._errors import ConfigurationError
from ._options import seconds
from ._pool import Pool, create_pool

__all__ = ["PoolState", "close_pool", "connection", "get_pool", "lifespan"]

logger = logging.getLogger("asyncpg_iam.starlette")

#: The key of the pool in the lifespan state and the attribute on ``app.state``.
STATE_KEY = "pool"

AppLifespan = Callable[[Any], AbstractAsyncContextManager[Mapping[str, Any] | None]]


class PoolState(TypedDict):
    """The lifespan state the pool is published in: ``request.state.pool``.

    With Starlette's typed state, annotate handlers with ``Request[PoolState]`` and read
    ``request.state["pool"]``.
    """

    pool: Pool


def lifespan(
    dsn: str | None = None,
    *,
    close_timeout: float = 10.0,
    app_lifespan: AppLifespan | None = None,
    metrics: Any = False,
    keep_pool: bool | None = None,
    **create_pool_kwargs: Any,
) -> Callable[[Any], AbstractAsyncContextManager[PoolState]]:
    """Return a lifespan for ``Starlette(lifespan=...)`` / ``FastAPI(lifespan=...)``.

    Takes every argument of `asyncpg_iam.create_pool`, plus `close_timeout` (seconds to wait
    at shutdown for connections in use before terminating them) and `app_lifespan`, the
    application's own lifespan: it runs inside this one, after the pool is up (so it can use
    ``app.state.pool``) and before the pool closes, and its state is merged into this one's.
    `metrics` reports the pool's OpenTelemetry metrics (`asyncpg_iam.otel`): True through the
    global MeterProvider, or a MeterProvider; needs the ``otel`` extra.
    `keep_pool` leaves the pool open at shutdown and reuses it at the next startup in the same
    event loop (a lifespan run per invocation, as Mangum does on AWS Lambda); None: on AWS
    Lambda (``AWS_LAMBDA_FUNCTION_NAME`` is set), not elsewhere. Otherwise a new pool is
    created each time the application starts.
    """
    seconds("close_timeout", close_timeout, hint=" to wait for connections in use at shutdown")

    kept = _KeptPool()

    async def open_pool() -> tuple[Pool, Any]:
        # Created here, in the server's event loop: asyncpg pools belong to one loop.
        pool = create_pool(dsn, **create_pool_kwargs)
        instrumentation = None
        if metrics is not False and metrics is not None:
            from .otel import instrument_pool

            instrumentation = instrument_pool(pool, None if metrics is True else metrics)
        try:
            await _start(pool, close_timeout)
        except BaseException:
            if instrumentation is not None:
                instrumentation.uninstrument()
            raise
        return pool, instrumentation

    @contextlib.asynccontextmanager
    async def run(app: Any) -> AsyncIterator[PoolState]:
        keep = _on_lambda() if keep_pool is None else keep_pool
        reused = kept.take()
        pool, instrumentation = reused if reused is not None else await open_pool()
        app_state = getattr(app, "state", None)
        if app_state is not None:
            setattr(app_state, STATE_KEY, pool)
        try:
            if app_lifespan is None:
                yield {"pool": pool}
            else:
                async with app_lifespan(app) as inner:
                    inner = dict(inner or {})
                    if STATE_KEY in inner:
                        raise ConfigurationError(
                            f"the application's lifespan state already has {STATE_KEY!r}: "
                            "rename it, asyncpg_iam.starlette publishes the pool there"
                        )
                    yield cast(PoolState, {**inner, STATE_KEY: pool})
        finally:
            if app_state is not None and getattr(app_state, STATE_KEY, None) is pool:
                delattr(app_state, STATE_KEY)
            if keep and not pool.is_closing():
                kept.keep(pool, instrumentation)
            else:
                await close_pool(pool, close_timeout)
                if instrumentation is not None:
                    instrumentation.uninstrument()

    return run


def _on_lambda() -> bool:
    return bool(os.environ.get("AWS_LAMBDA_FUNCTION_NAME"))


class _KeptPool:
    """The pool a lifespan left open at shutdown, for the next startup in the same loop."""

    def __init__(self) -> None:
        self._kept: tuple[Pool, Any, asyncio.AbstractEventLoop] | None = None

    def keep(self, pool: Pool, instrumentation: Any) -> None:
        self._kept = (pool, instrumentation, asyncio.get_running_loop())
        logger.debug("pool %s: kept open for the next startup (keep_pool)", pool.name)

    def take(self) -> tuple[Pool, Any] | None:
        """Return the kept pool when it can serve this loop, else None (and forget it)."""
        kept, self._kept = self._kept, None
        if kept is None:
            return None
        pool, instrumentation, loop = kept
        if loop is asyncio.get_running_loop() and not pool.is_closing():
            logger.debug("pool %s: reused by this startup (keep_pool)", pool.name)
            return pool, instrumentation
        logger.warning(
            "pool %s: kept from an event loop that is no longer running (asyncio.run() per "
            "invocation?): opening a new pool. Run one event loop for the process's life so "
            "that the pool and its connections are reused",
            pool.name,
        )
        return None


async def _start(pool: Pool, close_timeout: float) -> None:
    """Open the pool and one connection; on failure close it and raise, with a note."""
    try:
        await pool
        # min_size may be 0: connect once anyway, so a bad setup fails the startup.
        async with pool.acquire():
            pass
    except BaseException as exc:
        if isinstance(exc, Exception) and hasattr(exc, "add_note"):
            exc.add_note(f"asyncpg_iam.starlette: startup could not connect with pool {pool.name}")
        logger.error(
            "pool %s: startup failed, could not open a connection: %s: %s",
            pool.name,
            type(exc).__name__,
            str(exc).splitlines()[0] if str(exc) else "",
        )
        await close_pool(pool, close_timeout)
        raise
    logger.info("pool %s: ready (%d connections)", pool.name, pool.get_size())


async def close_pool(pool: Pool, timeout: float) -> bool:
    """Close `pool` gracefully within `timeout` seconds, else terminate it.

    Returns True when every connection was released and closed in time, False when the
    pool had to be terminated (connections still in use are cut off).
    """
    try:
        await asyncio.wait_for(pool.close(), timeout)
    except asyncio.TimeoutError:
        # asyncpg terminates the pool when its close() is cancelled.
        logger.warning(
            "pool %s: connections still in use after %g s at shutdown; terminated them",
            pool.name,
            timeout,
        )
        return False
    logger.info("pool %s: closed", pool.name)
    return True


def get_pool(conn: HTTPConnection) -> Pool:
    """Return the pool the lifespan published, from the lifespan state or ``app.state``."""
    pool = conn.scope.get("state", {}).get(STATE_KEY)
    if pool is None:
        pool = getattr(conn.app.state, STATE_KEY, None)
    if not isinstance(pool, Pool):
        raise ConfigurationError(
            "no asyncpg_iam pool for this request: create the application with "
            "lifespan=asyncpg_iam.starlette.lifespan(...)"
        )
    return pool


async def connection(conn: HTTPConnection) -> AsyncIterator[asyncpg.Connection]:
    """Lend a handler a pooled connection for the request: ``Depends(connection)`` in FastAPI.

    The connection goes back to the pool when the dependency exits.
    """
    async with get_pool(conn).acquire() as con:
        yield con
