"""A writer that goes silent under load: the part of case `failover` about silent hosts.

One PostgreSQL server behind a forwarder; 8 workers loop ``SELECT pg_sleep(0.1)`` on a pool of
8 that wants the writer (``target_session_attrs="read-write"``). After a warm-up the writer
goes silent for a while, then comes back. Two forms:

- **hung**: the forwarder stops relaying (``ClusterEndpoint.silence()``): sockets stay open and
  acknowledged, new ones are accepted and held;
- **dropped**: every packet dropped between two network namespaces (`NetworkPartition`; needs
  root, ``ip`` and ``nft``, else skipped with the reason).

Variants: a plain ``asyncpg.Pool`` with ``command_timeout=5``; ``asyncpg_iam.Pool`` with
``health_check=None`` (the last release's behaviour) and ``command_timeout=5``; and
``asyncpg_iam.Pool`` on defaults, with and without ``command_timeout=5``.

Figures per variant: how long the query calls in flight at the silence took to end and with
what error; the longest query call of the run; workers still stuck when the run ends; the time
from the host answering again to the first query that succeeds; WARNING lines; the pool's
silent-host and failover counts.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg

import asyncpg_iam
from asyncpg_iam.testing import ClusterEndpoint, NetworkPartition, PostgresCluster

from ._harness import CaseResult

WORKERS = 8
COMMAND_TIMEOUT = 5.0
VARIANTS = (
    ("asyncpg, command_timeout=5", "asyncpg", COMMAND_TIMEOUT),
    ("asyncpg_iam, health_check=None, command_timeout=5", "off", COMMAND_TIMEOUT),
    ("asyncpg_iam, defaults, command_timeout=5", "default", COMMAND_TIMEOUT),
    ("asyncpg_iam, defaults", "default", None),
)
# Workers still in a call this long after the load stops are counted as stuck and cancelled.
_STUCK_AFTER = 15.0


class _Warnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1


async def _pool(kind: str, address: tuple[str, int], server: PostgresCluster, ct: Any) -> Any:
    kwargs: dict[str, Any] = {
        "host": address[0],
        "port": address[1],
        "user": server.user,
        "database": server.database,
        "min_size": WORKERS,
        "max_size": WORKERS,
        "command_timeout": ct,
        "target_session_attrs": "read-write",
    }
    if kind == "asyncpg":
        return await asyncpg.create_pool(**kwargs)
    health = None if kind == "off" else asyncpg_iam.HealthCheck()
    return await asyncpg_iam.create_pool(**kwargs, iam=False, health_check=health)


async def _load(
    kind: str,
    ct: float | None,
    address: tuple[str, int],
    server: PostgresCluster,
    silence: Callable[[], Awaitable[None]],
    restore: Callable[[], Awaitable[None]],
    *,
    warmup: float,
    silent_for: float,
    after: float,
) -> dict[str, Any]:
    """Run the load on this thread's loop; silence and restore the host on the way."""
    pool = await _pool(kind, address, server, ct)
    # (began, seconds in the query call, error); and the seconds until it was released
    calls: list[tuple[float, float, str | None]] = []
    blocks: list[tuple[float, float]] = []
    stop = asyncio.Event()

    async def worker() -> None:
        while not stop.is_set():
            began = time.monotonic()
            try:
                async with pool.acquire(timeout=60) as con:
                    began = time.monotonic()
                    try:
                        await con.fetchval("SELECT pg_sleep(0.1)")
                    except Exception as exc:
                        calls.append((began, time.monotonic() - began, type(exc).__name__))
                        raise
                    calls.append((began, time.monotonic() - began, None))
            except Exception:
                await asyncio.sleep(0.05)
            finally:
                blocks.append((began, time.monotonic() - began))

    tasks = [asyncio.ensure_future(worker()) for _ in range(WORKERS)]
    await asyncio.sleep(warmup)
    silenced = time.monotonic()
    await silence()
    await asyncio.sleep(silent_for)
    await restore()
    restored = time.monotonic()
    await asyncio.sleep(after)
    stop.set()
    _done, pending = await asyncio.wait(tasks, timeout=_STUCK_AFTER)
    for task in pending:
        task.cancel()
    stats = pool.stats() if isinstance(pool, asyncpg_iam.Pool) else None
    pool.terminate()
    in_flight = [
        (seconds, error)
        for began, seconds, error in calls
        if began < silenced < began + seconds  # the calls the silence caught
    ]
    released = [seconds for began, seconds in blocks if began < silenced < began + seconds]
    ok_after = [began + seconds for began, seconds, error in calls if error is None]
    first_ok = min((at for at in ok_after if at > restored), default=None)
    return {
        "in_flight_calls": len(in_flight) + len(pending),
        "in_flight_max_s": max((s for s, _ in in_flight), default=None),
        "in_flight_errors": dict(Counter(e or "ok" for _, e in in_flight)),
        "in_flight_released_max_s": max(released, default=None),
        "longest_call_s": max((s for _, s, _ in calls), default=None),
        "stuck_at_end": len(pending),
        "first_ok_after_restore_s": None if first_ok is None else first_ok - restored,
        "errors": dict(Counter(e for _, _, e in calls if e is not None)),
        "silent_hosts": None if stats is None else stats.silent_hosts,
        "failover_events": None if stats is None else stats.failover_events,
        "health_probes": None if stats is None else stats.health_probes,
    }


async def _hung(server: PostgresCluster, kind: str, ct: float | None, **times: float) -> Any:
    async with ClusterEndpoint((server.host, server.port)) as endpoint:

        async def silence() -> None:
            endpoint.silence()

        async def restore() -> None:
            endpoint.resume()

        address = (endpoint.host, endpoint.port)
        return await _load(kind, ct, address, server, silence, restore, **times)


async def _dropped(server: PostgresCluster, kind: str, ct: float | None, **times: float) -> Any:
    main = asyncio.get_running_loop()
    async with NetworkPartition((server.host, server.port)) as partition:

        def on_main(coro: Any) -> Awaitable[None]:
            return asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, main))

        async def silence() -> None:
            await on_main(partition.drop())

        async def restore() -> None:
            await on_main(partition.restore())

        address = (partition.host, partition.port)
        return await partition.run_client(
            lambda: _load(kind, ct, address, server, silence, restore, **times)
        )


async def run_silent_writer(result: CaseResult, *, quick: bool) -> None:
    """Run every variant in each form available; add the rows and figures to `result`."""
    times = (
        {"warmup": 1.0, "silent_for": 6.0, "after": 3.0}
        if quick
        else {"warmup": 2.0, "silent_for": 10.0, "after": 5.0}
    )
    forms: dict[str, Any] = {"hung": _hung}
    unavailable = NetworkPartition.unavailable()
    if unavailable is None:
        forms["dropped"] = _dropped
    else:
        result.notes.append(f"Silent writer, dropped packets: skipped ({unavailable}).")
    server = PostgresCluster()
    await asyncio.to_thread(server.start)
    handler = _Warnings()
    logging.getLogger("asyncpg_iam").addHandler(handler)
    figures: dict[str, dict[str, Any]] = {}
    try:
        for form, run in forms.items():
            for label, kind, ct in VARIANTS:
                handler.count = 0
                figure = await run(server, kind, ct, **times)
                figure["warnings"] = handler.count
                figure["health_check"] = kind == "default"
                figures[f"{form}: {label}"] = figure
    finally:
        logging.getLogger("asyncpg_iam").removeHandler(handler)
        await asyncio.to_thread(server.stop)
    result.figures["silent_writer"] = {"times": times, **figures}
    for name, f in figures.items():
        ours = f["health_check"]
        worst = f["in_flight_max_s"]
        stuck = f["stuck_at_end"]
        result.add(
            f"silent writer ({name}): query calls in flight end after (max), errors",
            f"{'stuck' if stuck else _s(worst)}, {_errors(f['in_flight_errors'])}",
            "<= 10 s (aim 5 s), ConnectionDoesNotExistError" if ours else "",
            (not stuck and worst is not None and worst <= 10.0) if ours else None,
        )
        result.add(
            f"silent writer ({name}): ... and released (max) / longest query call / stuck",
            f"{_s(f['in_flight_released_max_s'])} / {_s(f['longest_call_s'])} / {stuck}",
        )
        first = f["first_ok_after_restore_s"]
        result.add(
            f"silent writer ({name}): first success after the host answers again",
            "none" if first is None else _s(first),
            "<= 2 s" if ours else "",
            (first is not None and first <= 2.0) if ours else None,
        )
        result.add(
            f"silent writer ({name}): WARNINGs / silent hosts / failover events / probes",
            f"{f['warnings']} / {f['silent_hosts']} / {f['failover_events']} / "
            f"{f['health_probes']}",
            "1 / 1 / 1 / -" if ours else "",
            (f["warnings"] == 1 and f["silent_hosts"] == 1 and f["failover_events"] == 1)
            if ours
            else None,
        )
    result.notes.append(
        f"Silent writer: {WORKERS} workers on a pool of {WORKERS}, "
        f"{times['warmup']:g} s of load, the writer silent for {times['silent_for']:g} s, "
        f"then {times['after']:g} s more; calls still running {_STUCK_AFTER:g} s after the "
        "load stops count as stuck. 'hung' keeps TCP up (the forwarder holds everything); "
        "'dropped' loses every packet between two network namespaces."
    )


def _s(value: float | None) -> str:
    return "none" if value is None else f"{value:.2f} s"


def _errors(errors: dict[str, int]) -> str:
    if not errors:
        return "none"
    return ", ".join(f"{name} {count}" for name, count in sorted(errors.items()))
