"""Run a transaction again when the database says a retry will work.

Aurora DSQL uses optimistic concurrency: a transaction that conflicts with another fails at
``COMMIT`` with SQLSTATE 40001 and the client is expected to run it again. PostgreSQL (RDS,
Aurora) raises the same SQLSTATE for serialization failures under ``REPEATABLE READ`` and
``SERIALIZABLE``. `run_transaction` runs a function in a transaction and retries it, with
jittered exponential backoff, on exactly these errors:

- SQLSTATE 40001 (``serialization_failure``; DSQL names its conflicts OC000 and OC001 in the
  message, and the codes themselves are accepted too) from the function or from ``COMMIT``:
  the server rolled the transaction back, so running it again is safe;
- SQLSTATE 53400 (``configuration_limit_exceeded``, DSQL's connection rate limit) and 53300
  (``too_many_connections``) while taking a connection from a pool: nothing ran yet.

It never retries a transaction whose commit outcome is unknown (the connection broke while
``COMMIT`` was in flight): that raises `CommitOutcomeUnknownError`, since running it again could
apply it twice.

Retrying only helps where the server reports the conflicts: under PostgreSQL's default READ
COMMITTED, two read-then-write transactions both commit and one update is lost, with nothing
to retry. So with no `isolation` given, a transaction on PostgreSQL (RDS, Aurora) runs
SERIALIZABLE; on a hot standby, which refuses SERIALIZABLE ("cannot use serializable mode in
a hot standby") and takes no writes, REPEATABLE READ (a consistent snapshot, the most a
standby offers); on Aurora DSQL, the server's own level (repeatable read with optimistic
concurrency, conflicts reported at COMMIT).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import asyncpg
import asyncpg.pool

from ._clock import SYSTEM_CLOCK, Clock
from ._errors import CommitOutcomeUnknownError, ConfigurationError
from ._options import count, seconds
from ._signing import is_dsql_host

__all__ = ["CONFLICT_SQLSTATES", "RETRYABLE_CONNECT_SQLSTATES", "in_recovery", "run_transaction"]

logger = logging.getLogger("asyncpg_iam.retry")

T = TypeVar("T")

#: A transaction lost to a concurrent one and was rolled back: running it again is safe.
CONFLICT_SQLSTATES = frozenset({"40001", "OC000", "OC001"})
#: Refusals of a new connection that say "try again later" (DSQL: rate and count limits).
RETRYABLE_CONNECT_SQLSTATES = frozenset({"53400", "53300"})
# The server ended the session (shutdown, crash recovery): what happened to COMMIT is unknown.
_ENDED_SQLSTATES = frozenset({"57P01", "57P02", "57P03"})
_ISOLATION_LEVELS = (None, "serializable", "repeatable_read", "read_uncommitted", "read_committed")


def _sqlstate(exc: BaseException) -> str | None:
    state = getattr(exc, "sqlstate", None)
    return state if isinstance(state, str) else None


def _check(retries: int, backoff: float, max_backoff: float, isolation: str | None) -> None:
    count("retries", retries, maximum=1000)
    seconds("backoff", backoff)
    seconds("max_backoff", max_backoff)
    if isolation not in _ISOLATION_LEVELS:
        raise ConfigurationError(
            f"isolation must be one of {', '.join(map(str, _ISOLATION_LEVELS))}, not {isolation!r}"
        )


def backoff_delay(attempt: int, *, backoff: float, max_backoff: float, rng: random.Random) -> float:
    """Return the wait before retry number `attempt` (1-based): full jitter, capped."""
    ceiling = min(max_backoff, backoff * 2 ** (attempt - 1))
    return rng.uniform(0.0, ceiling)


def _outcome_unknown(what: str) -> CommitOutcomeUnknownError:
    return CommitOutcomeUnknownError(
        f"the connection broke ({what}) while COMMIT was in flight: the transaction may or may "
        "not have committed, so it was not retried. Check the data before running it again"
    )


async def in_recovery(con: Any) -> bool:
    """Tell whether `con` is on a standby (the server's report, else pg_is_in_recovery())."""
    reported = getattr(con.get_settings(), "in_hot_standby", None)
    if reported is not None:
        return bool(reported == "on")
    return bool(await con.fetchval("SELECT pg_catalog.pg_is_in_recovery()"))


async def _default_isolation(connection: Any, *, dsql: bool) -> str | None:
    """Return the isolation level for a transaction that asked for none (see the module)."""
    if dsql:
        return None
    if await in_recovery(connection):
        return "repeatable_read"
    return "serializable"


def _on_dsql(target: Any) -> bool:
    """Tell whether `target` (a pool of ours, or a connection) talks to Aurora DSQL."""
    connector = getattr(target, "_connector", None)
    if connector is not None:
        return bool(connector.plan.dsql)  # the plan assembly decided it
    address = getattr(target, "_addr", None)  # asyncpg's connection: the address it dialled
    return isinstance(address, tuple) and is_dsql_host(str(address[0]))


async def _attempt(
    connection: Any, fn: Callable[[Any], Awaitable[T]], isolation: str | None, *, dsql: bool
) -> T:
    """Run `fn` in one transaction on `connection`; translate an unknown commit outcome."""
    if isolation is None:
        isolation = await _default_isolation(connection, dsql=dsql)
    transaction = connection.transaction(isolation=isolation)
    await transaction.start()
    try:
        result = await fn(connection)
    except BaseException:
        if not connection.is_closed():
            # Fails when the connection is broken or the server already ended the transaction.
            with contextlib.suppress(asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
                await transaction.rollback()
        raise
    try:
        await transaction.commit()
    except asyncpg.PostgresError as exc:
        state = _sqlstate(exc) or ""
        if not (state.startswith("08") or state in _ENDED_SQLSTATES):
            raise  # the server refused the COMMIT: the transaction did not commit
        raise _outcome_unknown(f"SQLSTATE {state}") from exc
    except (OSError, asyncio.TimeoutError, asyncpg.InterfaceError) as exc:
        raise _outcome_unknown(type(exc).__name__) from exc
    return result


async def run_transaction(
    target: asyncpg.pool.Pool | asyncpg.Connection,
    fn: Callable[[Any], Awaitable[T]],
    *,
    retries: int = 5,
    backoff: float = 0.02,
    max_backoff: float = 1.0,
    isolation: str | None = None,
    timeout: float | None = None,
    clock: Clock = SYSTEM_CLOCK,
    rng: random.Random | None = None,
) -> T:
    """Run ``await fn(connection)`` in a transaction and return its result, retrying conflicts.

    `target` is a pool (each attempt acquires a connection, within `timeout`) or a connection
    outside any transaction. Retried, at most `retries` times after the first attempt: SQLSTATE
    40001 from `fn` or ``COMMIT``, and SQLSTATE 53400 / 53300 while acquiring a pool
    connection. Retry n waits a random time in ``[0, min(max_backoff, backoff * 2**(n-1))]``
    on `clock`. `fn` may run several times: keep side effects outside the database out of it.
    When the last retry fails too, its error is raised; any other error is raised at once.
    A connection lost during ``COMMIT`` raises `CommitOutcomeUnknownError` and is never retried.
    `isolation` is passed to ``Connection.transaction()``; None (the default) means
    ``"serializable"`` on PostgreSQL, ``"repeatable_read"`` on a hot standby and the server's
    own level on Aurora DSQL, so that a read-then-write cannot lose an update unretried.
    """
    _check(retries, backoff, max_backoff, isolation)
    if rng is None:
        rng = random.Random()
    is_pool = isinstance(target, asyncpg.pool.Pool)
    dsql = _on_dsql(target)
    if not is_pool and target.is_in_transaction():
        raise ConfigurationError(
            "run_transaction needs a connection outside a transaction: a conflict aborts the "
            "enclosing transaction, which a retry inside it cannot repair"
        )
    attempt = 0
    while True:
        try:
            if is_pool:
                try:
                    connection = await target.acquire(timeout=timeout)
                except asyncpg.PostgresError as exc:
                    if _sqlstate(exc) not in RETRYABLE_CONNECT_SQLSTATES:
                        raise
                    error: BaseException = exc
                else:
                    try:
                        return await _attempt(connection, fn, isolation, dsql=dsql)
                    finally:
                        await target.release(connection)
            else:
                return await _attempt(target, fn, isolation, dsql=dsql)
        except asyncpg.PostgresError as exc:
            if _sqlstate(exc) not in CONFLICT_SQLSTATES:
                raise
            error = exc
        attempt += 1
        if attempt > retries:
            logger.warning(
                "transaction failed with SQLSTATE %s after %d retries; giving up",
                _sqlstate(error),
                retries,
            )
            raise error
        delay = backoff_delay(attempt, backoff=backoff, max_backoff=max_backoff, rng=rng)
        logger.debug(
            "transaction got SQLSTATE %s; retry %d of %d in %.3f s",
            _sqlstate(error),
            attempt,
            retries,
            delay,
        )
        await clock.sleep(delay)
