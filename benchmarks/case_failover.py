"""Failover under load: an IAM pool against a plain asyncpg.Pool through an Aurora-style failover.

Each variant gets its own `asyncpg_iam.testing.FailoverCluster`: a primary and a synchronous
streaming standby, each behind the verifying RDS IAM emulator, behind a cluster endpoint. 64
workers loop acquire, ``INSERT`` of a unique id, release, on a pool of 20 (min_size = max_size).
After a warm-up the primary is stopped (``immediate``), the standby promoted, and the endpoint
switched 5 s after the promotion; meanwhile the old primary comes back read-only (as an Aurora
writer comes back as a reader), so new connections during the lag reach a read-only server.
The run goes on for a few seconds after the switch.

- ``asyncpg_iam.Pool``: IAM, ``target_session_attrs`` read-write by default on the cluster
  endpoint name, failover detection and retries.
- ``asyncpg.Pool``: the plain pool with a password callable that signs a token per connect
  (how IAM is commonly wired by hand) and asyncpg's defaults.

Figures: failed writes (and how many began before the primary stopped, or before the pool saw
the event), time from the promotion to the first write acknowledged afterwards, logins at the
emulators from the stop on, and the ledger check on the new primary: every acknowledged id
exactly once (0 lost, 0 applied twice).

Two more scenarios run on `asyncpg_iam.testing.AuroraCluster` (instances with endpoint names
of their own and ``aurora_replica_status()``), side by side for a plain ``asyncpg.Pool``, the
DNS-only ``asyncpg_iam.Pool`` (``topology=False``, the last release's behaviour) and the
topology-aware one:

- **20 s DNS lag**: 16 writers on a pool of 10; the writer stops, the replica is promoted and
  the cluster endpoint moves 20 s later. Figures: time from the promotion to the first write
  acknowledged on the new writer, failed writes begun after the pool's first failover signal,
  logins from the stop to that first write.
- **a reader added**: a pool of 10 on the reader endpoint over two replicas, light read load;
  a third replica is added. Figure: seconds until it holds 25 % of the pool's connections
  (up to 60 s).

One row times a connect to a silent port (accepts TCP, never answers) with ``timeout=3``
through ``asyncpg_iam.Pool``: when the failing call ends, its failure diagnosis included (the
tests check that nothing of it outlives the call; the time is measured here).

When a separate virtualenv has ``aws-advanced-python-wrapper`` (``.peer-venv/bin/python`` or
``ASYNCPG_IAM_PEER_PYTHON``; `_peer_run`), the DNS-lag scenario also runs AWS's Python wrapper
(async psycopg, plugins ``failover_v2,iam``) on an AuroraCluster of its own: one more row
(otherwise it says "not installed").

``--quick`` is a smoke run: shorter load, a 3 s lag and a 10 s watch of the reader (with a 2 s
topology refresh), figures not comparable with a full run.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import itertools
import logging
import ssl
from collections import Counter
from pathlib import Path
from typing import Any

import asyncpg

import asyncpg_iam
from asyncpg_iam import Credentials
from asyncpg_iam.testing import AuroraCluster, FailoverCluster

from ._harness import CaseResult, new_figure, save_figure
from ._peer_run import aurora_peer, peer_python, peer_version
from ._shared import aws_keys, signer, versus
from ._silent_writer import run_silent_writer

NAME = "failover"
TITLE = "7. Failover under load (64 workers, max_size 20, 5 s DNS lag)"
NEEDS_ENVIRONMENT = False
WORKERS = 64
POOL_SIZE = 20
LAG = 5.0
ACCESS_KEY = "AKIABENCHFAILOVER001"


class _EventTimes(logging.Handler):
    """Record when the pool logs that it detected a failover (loop time)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.times: list[float] = []

    def emit(self, record: logging.LogRecord) -> None:
        if "failover or restart detected" in record.getMessage():
            self.times.append(asyncio.get_running_loop().time())


async def _variant(
    kind: str, *, warmup: float, after: float, credentials: Credentials
) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    async with FailoverCluster(lag=LAG) as cluster:
        cluster.register_key(credentials.access_key, credentials.secret_key)
        common = {"min_size": POOL_SIZE, "max_size": POOL_SIZE}
        pool: Any
        if kind == "asyncpg_iam":
            pool = await asyncpg_iam.create_pool(**cluster.pool_kwargs(**common))
        else:
            kwargs = cluster.pool_kwargs(**common)
            del kwargs["iam"]
            password = signer(cluster.endpoint, cluster.signing_port, cluster.user, credentials)
            pool = await asyncpg.create_pool(**kwargs, password=password)
        handler = _EventTimes()
        logging.getLogger("asyncpg_iam.pool").addHandler(handler)
        ids = itertools.count(1)
        acknowledged: list[tuple[int, float]] = []
        failed: list[tuple[float, str]] = []
        stop = asyncio.Event()
        try:
            await pool.execute("CREATE TABLE ledger (id bigint)")

            async def worker() -> None:
                while not stop.is_set():
                    write_id = next(ids)
                    began = loop.time()
                    try:
                        async with pool.acquire(timeout=30) as con:
                            await con.execute("INSERT INTO ledger VALUES ($1)", write_id)
                    except Exception as exc:
                        failed.append((began, type(exc).__name__))
                    else:
                        acknowledged.append((write_id, loop.time()))

            tasks = [asyncio.ensure_future(worker()) for _ in range(WORKERS)]
            await asyncio.sleep(warmup)
            stopped_wall = dt.datetime.now(dt.timezone.utc)
            timeline = await cluster.failover(old_writer="read_only")
            await asyncio.sleep(after)
            stop.set()
            await asyncio.gather(*tasks)
            stats = pool.stats() if isinstance(pool, asyncpg_iam.Pool) else None
        finally:
            logging.getLogger("asyncpg_iam.pool").removeHandler(handler)
            await pool.close()
        con = await asyncpg.connect(cluster.primary.dsn)
        try:
            stored = Counter(row["id"] for row in await con.fetch("SELECT id FROM ledger"))
        finally:
            await con.close()
        logins = [
            r for emulator in cluster.emulators for r in emulator.records if r.at >= stopped_wall
        ]
    ack_ids = [write_id for write_id, _ in acknowledged]
    after_promotion = [at for _, at in acknowledged if at > timeline.promoted_at]
    first_write = min(after_promotion) - timeline.promoted_at if after_promotion else None
    saw_event = handler.times[0] if handler.times else None
    errors = Counter(name for _, name in failed)
    start = timeline.started_at - warmup
    end = timeline.switched_at + after
    seconds = int(end - start) + 1
    per_second_ok = Counter(int(at - start) for _, at in acknowledged)
    per_second_failed = Counter(int(began - start) for began, _ in failed)
    return {
        "kind": kind,
        "acknowledged": len(ack_ids),
        "failed": len(failed),
        "failed_began_before_stop": sum(1 for began, _ in failed if began < timeline.stopped_at),
        "failed_began_after_event": (
            None if saw_event is None else sum(1 for began, _ in failed if began > saw_event)
        ),
        "errors": dict(errors),
        "first_write_after_promotion_s": first_write,
        "logins_after_stop": len(logins),
        "logins_accepted_after_stop": sum(1 for r in logins if r.accepted),
        "lost": sum(1 for write_id in ack_ids if stored[write_id] == 0),
        "applied_twice": sum(1 for write_id in ack_ids if stored[write_id] > 1),
        "rows_stored": sum(stored.values()),
        "stats": None
        if stats is None
        else {
            "failover_events": stats.failover_events,
            "failover_retired": stats.failover_retired,
            "read_only_retries": stats.read_only_retries,
            "connect_retries": stats.connect_retries,
            "connections_opened": stats.connections_opened,
        },
        "timeline": {
            "stopped_after_s": timeline.stopped_at - timeline.started_at,
            "promoted_after_s": timeline.promoted_at - timeline.started_at,
            "switched_after_s": timeline.switched_at - timeline.started_at,
            "event_seen_after_s": None if saw_event is None else saw_event - timeline.started_at,
        },
        "warmup_s": warmup,
        "ok_per_second": [per_second_ok.get(i, 0) for i in range(seconds)],
        "failed_per_second": [per_second_failed.get(i, 0) for i in range(seconds)],
    }


# -- Aurora: DNS lag with three pools ---------------------------------------------------------

AURORA_WRITERS = 16
AURORA_POOL = 10
AURORA_LAG = 20.0
AURORA_KINDS = ("asyncpg", "dns_only", "topology")


def _aurora_pool(kind: str, cluster: AuroraCluster, credentials: Credentials, **kw: Any) -> Any:
    """Open the pool of `kind` on `cluster` (``reader=True`` for the reader endpoint)."""
    reader = kw.pop("reader", False)
    topology = kw.pop("topology", None)
    if kind == "asyncpg":
        kwargs = cluster.pool_kwargs(reader=reader, **kw)
        del kwargs["iam"], kwargs["topology"]
        signing = cluster.reader_endpoint if reader else cluster.endpoint
        password = signer(signing, 5432, cluster.user, credentials)
        return asyncpg.create_pool(**kwargs, password=password)
    if kind == "dns_only":
        return asyncpg_iam.create_pool(**cluster.pool_kwargs(reader=reader, topology=False, **kw))
    return asyncpg_iam.create_pool(**cluster.pool_kwargs(reader=reader, topology=topology, **kw))


async def _aurora_lag(kind: str, *, lag: float, warmup: float, credentials: Credentials) -> dict:
    """One failover with a DNS lag of `lag` s under 16 writers; what the pool of `kind` saw."""
    loop = asyncio.get_running_loop()
    handler = _EventTimes()
    async with AuroraCluster(replicas=1, lag=lag) as cluster:
        cluster.register_key(credentials.access_key, credentials.secret_key)
        size = {"min_size": AURORA_POOL, "max_size": AURORA_POOL}
        pool = await _aurora_pool(kind, cluster, credentials, **size)
        logging.getLogger("asyncpg_iam.pool").addHandler(handler)
        acknowledged: list[float] = []
        failed: list[float] = []
        stop = asyncio.Event()
        try:
            await pool.execute("CREATE TABLE ledger (at timestamptz)")

            async def worker() -> None:
                while not stop.is_set():
                    began = loop.time()
                    try:
                        async with pool.acquire(timeout=30) as con:
                            await con.execute("INSERT INTO ledger VALUES (now())")
                    except Exception:
                        failed.append(began)
                        await asyncio.sleep(0.01)
                    else:
                        acknowledged.append(loop.time())

            tasks = [asyncio.ensure_future(worker()) for _ in range(AURORA_WRITERS)]
            await asyncio.sleep(warmup)
            logins_before = cluster.logins()
            failover = asyncio.ensure_future(cluster.failover(old_writer="read_only"))
            promoted_by: float | None = None
            logins_to_first: int | None = None
            deadline = loop.time() + lag + 15.0
            while logins_to_first is None and loop.time() < deadline:
                if promoted_by is None and cluster.writer_instance.id != "instance-1":
                    promoted_by = loop.time()
                if promoted_by is not None and acknowledged and acknowledged[-1] > promoted_by:
                    logins_to_first = cluster.logins() - logins_before
                await asyncio.sleep(0.01)
            timeline = await failover
            await asyncio.sleep(1.0)
            stop.set()
            await asyncio.gather(*tasks)
        finally:
            logging.getLogger("asyncpg_iam.pool").removeHandler(handler)
            await pool.close()
    after = [at for at in acknowledged if at > timeline.promoted_at]
    signal = handler.times[0] if handler.times else None
    return {
        "kind": kind,
        "first_write_after_promotion_s": min(after) - timeline.promoted_at if after else None,
        "failed": len(failed),
        "failed_began_after_signal": (
            None if signal is None else sum(1 for began in failed if began >= signal)
        ),
        "logins_stop_to_first_write": logins_to_first,
        "acknowledged": len(acknowledged),
    }


async def _reader_added(kind: str, *, watch: float, quick: bool, credentials: Credentials) -> dict:
    """A third replica joins a reader pool of 10; seconds until it holds 25 % (or None)."""
    loop = asyncio.get_running_loop()
    async with AuroraCluster(replicas=2, lag=0.0) as cluster:
        cluster.register_key(credentials.access_key, credentials.secret_key)
        extra: dict[str, Any] = {"min_size": AURORA_POOL, "max_size": AURORA_POOL}
        if quick and kind == "topology":
            extra["topology"] = asyncpg_iam.AuroraTopology(refresh_interval=2.0)
        pool = await _aurora_pool(kind, cluster, credentials, reader=True, **extra)
        stop = asyncio.Event()

        async def reader() -> None:
            while not stop.is_set():
                async with pool.acquire(timeout=30) as con:
                    await con.fetchval("SELECT pg_sleep(0.02)")
                await asyncio.sleep(0.01)

        try:
            tasks = [asyncio.ensure_future(reader()) for _ in range(3)]
            added = await cluster.add_replica()
            began = loop.time()
            reached: float | None = None
            share = 0.0
            while loop.time() - began < watch:
                share = added.emulator.open_connections / max(
                    sum(e.open_connections for e in cluster.emulators), 1
                )
                if share >= 0.25:
                    reached = loop.time() - began
                    break
                await asyncio.sleep(0.1)
            stop.set()
            await asyncio.gather(*tasks)
        finally:
            await pool.close()
    return {"kind": kind, "seconds_to_25_percent": reached, "share_at_end": share}


async def run(env: Any, quick: bool) -> CaseResult:
    """Run the failover once with each pool and compare."""
    warmup, after = (1.0, 2.0) if quick else (3.0, 5.0)
    result = CaseResult(NAME, TITLE)
    variants: dict[str, dict[str, Any]] = {}
    with aws_keys(ACCESS_KEY) as credentials:
        for kind in ("asyncpg_iam", "asyncpg"):
            variants[kind] = await _variant(
                kind, warmup=warmup, after=after, credentials=credentials
            )
        lag = 3.0 if quick else AURORA_LAG
        aurora = {
            kind: await _aurora_lag(kind, lag=lag, warmup=warmup, credentials=credentials)
            for kind in AURORA_KINDS
        }
        python = peer_python()
        peer: dict[str, Any] = {"kind": "peer", "skipped": "not installed"}
        if python is not None:
            peer = await aurora_peer(
                python,
                lag=lag,
                warmup=warmup,
                writers=AURORA_WRITERS,
                pool=AURORA_POOL,
                credentials=credentials,
            )
            peer["version"] = peer_version(python)
        watch = 10.0 if quick else 60.0
        readers = {
            kind: await _reader_added(kind, watch=watch, quick=quick, credentials=credentials)
            for kind in AURORA_KINDS
        }
    result.figures = {"lag_s": LAG, "workers": WORKERS, "pool_size": POOL_SIZE, **variants}
    ours, plain = variants["asyncpg_iam"], variants["asyncpg"]
    stats = ours["stats"] or {}

    def both(key: str, fmt: str = "{}") -> str:
        return versus(ours, plain, key, fmt)

    result.add("writes acknowledged (asyncpg_iam.Pool vs asyncpg.Pool)", both("acknowledged"))
    result.add(
        "writes failed / of them begun before the primary stopped",
        f"{ours['failed']} / {ours['failed_began_before_stop']} vs "
        f"{plain['failed']} / {plain['failed_began_before_stop']}",
    )
    late = ours["failed_began_after_event"]
    result.add(
        "asyncpg_iam.Pool: failed writes begun after the pool saw the event",
        "no event seen" if late is None else str(late),
        "0",
        late == 0,
    )
    first = ours["first_write_after_promotion_s"]
    result.add(
        "time from promotion to first acknowledged write",
        both("first_write_after_promotion_s", "{:.2f} s"),
        f"<= {LAG + 1:g} s (lag + 1 s)",
        first is not None and first <= LAG + 1,
    )
    bound = POOL_SIZE + stats.get("connect_retries", 0)
    result.add(
        "logins from the stop on (accepted by the emulators)",
        f"{ours['logins_after_stop']} ({ours['logins_accepted_after_stop']}) vs "
        f"{plain['logins_after_stop']} ({plain['logins_accepted_after_stop']})",
        f"<= pool size + counted retries ({POOL_SIZE} + {stats.get('connect_retries', 0)})",
        ours["logins_after_stop"] <= bound,
    )
    result.add(
        "asyncpg_iam.Pool stats: events / retired / read-only retries / connect retries",
        f"{stats.get('failover_events')} / {stats.get('failover_retired')} / "
        f"{stats.get('read_only_retries')} / {stats.get('connect_retries')}",
    )
    result.add(
        "acknowledged writes lost / applied twice",
        f"{ours['lost']} / {ours['applied_twice']} vs {plain['lost']} / {plain['applied_twice']}",
        "0 / 0",
        ours["lost"] == ours["applied_twice"] == plain["lost"] == plain["applied_twice"] == 0,
    )
    _aurora_rows(result, aurora, readers, lag=lag, watch=watch)
    _peer_row(result, peer, lag=lag)
    result.add("errors (asyncpg_iam.Pool)", _errors(ours["errors"]))
    result.add("errors (asyncpg.Pool)", _errors(plain["errors"]))
    result.notes.append(
        f"Each variant runs on its own FailoverCluster: {warmup:g} s of load, then the primary "
        f"stops (immediate) and comes back read-only, the standby is promoted, the endpoint "
        f"switches {LAG:g} s after the promotion, and the load goes on {after:g} s more. "
        "Replication is synchronous, so an acknowledged write is on the new primary unless it "
        "was lost; writes that failed may or may not have been applied (their outcome is "
        "unknown to the client) and are not counted. The plain pool's connections that "
        "reached the read-only old writer during the lag stay there until they are closed, "
        "so its writes keep failing with ReadOnlySQLTransactionError after the switch. "
        "Timings are from a 2-core machine shared with other work: noisy."
    )
    await run_silent_writer(result, quick=quick)
    with aws_keys(ACCESS_KEY) as credentials:
        await _silent_connect(result, credentials)
    return result


SILENT_CONNECT_TIMEOUT = 3.0
# What a connect to a silent port may take beyond its `timeout`: the loop's own delays (the
# diagnosis's probe runs within the timeout).
SILENT_CONNECT_MARGIN = 0.5


async def _silent_connect(result: CaseResult, credentials: Credentials) -> None:
    """Time a pool's connect to a port that accepts TCP and never answers, diagnosis included."""

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.CancelledError, OSError):
            while await reader.read(4096):
                pass
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = int(server.sockets[0].getsockname()[1])
    auth = asyncpg_iam.IAMAuth(
        region="us-east-1",
        signing_host="silent.abcdefghijkl.us-east-1.rds.amazonaws.com",
        credentials=credentials,
    )
    loop = asyncio.get_running_loop()
    error, began = "none", loop.time()
    try:
        async with asyncpg_iam.create_pool(
            host="127.0.0.1",
            port=port,
            user="app",
            iam=auth,
            min_size=0,
            timeout=SILENT_CONNECT_TIMEOUT,
            ssl=ssl.create_default_context(),
        ) as pool:
            began = loop.time()
            await pool.fetchval("SELECT 1")
    except Exception as exc:
        error = type(exc).__name__
    elapsed = loop.time() - began
    server.close()
    await server.wait_closed()
    bound = SILENT_CONNECT_TIMEOUT + SILENT_CONNECT_MARGIN
    result.figures["silent_connect"] = {
        "timeout_s": SILENT_CONNECT_TIMEOUT,
        "elapsed_s": elapsed,
        "error": error,
    }
    result.add(
        f"connect to a silent port, timeout={SILENT_CONNECT_TIMEOUT:g}: the call ends after "
        "(its failure diagnosis included), error",
        f"{elapsed:.2f} s, {error}",
        f"<= {bound:g} s (timeout + {SILENT_CONNECT_MARGIN:g} s)",
        elapsed <= bound and error != "none",
    )


def _aurora_rows(
    result: CaseResult,
    aurora: dict[str, dict[str, Any]],
    readers: dict[str, dict[str, Any]],
    *,
    lag: float,
    watch: float,
) -> None:
    """Add the AuroraCluster scenarios' rows: asyncpg.Pool vs DNS-only vs topology-aware."""
    result.figures["aurora_lag"] = {"lag_s": lag, **aurora}
    result.figures["reader_added"] = {"watch_s": watch, **readers}
    result.notes.append(
        f"The Aurora rows run on AuroraCluster (one cluster per pool): 16 writers on a pool of "
        f"10, the old writer back read-only, the cluster endpoint moving {lag:g} s after the "
        "promotion; and a pool of 10 on the reader endpoint over two replicas under light "
        "read load, a third added (its share counts the connections open at its emulator; "
        "the topology-aware pool's own monitoring connection is one of the pool's 11). "
        "DNS-only is asyncpg_iam.Pool with topology=False."
    )

    def three(table: dict[str, dict[str, Any]], key: str, fmt: str) -> str:
        values = [table[kind][key] for kind in AURORA_KINDS]
        return " / ".join("none" if v is None else fmt.format(v) for v in values)

    topo = aurora["topology"]
    first = topo["first_write_after_promotion_s"]
    result.add(
        f"Aurora, {lag:g} s DNS lag: first write after promotion "
        "(asyncpg.Pool / DNS-only / topology)",
        three(aurora, "first_write_after_promotion_s", "{:.2f} s"),
        "<= 2 s (topology)",
        first is not None and first <= 2.0,
    )
    late = topo["failed_began_after_signal"]
    result.add(
        "Aurora: failed writes begun after the pool's first failover signal (topology)",
        "no signal seen" if late is None else str(late),
        "0",
        late == 0,
    )
    logins = topo["logins_stop_to_first_write"]
    result.add(
        "Aurora: logins from the stop to the first write (asyncpg.Pool / DNS-only / topology)",
        three(aurora, "logins_stop_to_first_write", "{}"),
        f"<= {2 * AURORA_POOL} (topology)",
        logins is not None and logins <= 2 * AURORA_POOL,
    )
    reached = readers["topology"]["seconds_to_25_percent"]
    result.add(
        f"Aurora: a reader added holds 25 % of a pool of 10 after (asyncpg.Pool / DNS-only / "
        f"topology; none: not within {watch:g} s)",
        three(readers, "seconds_to_25_percent", "{:.1f} s"),
        f"<= {watch:g} s (topology)",
        reached is not None,
    )


def _peer_row(result: CaseResult, peer: dict[str, Any], *, lag: float) -> None:
    """Add AWS's Python wrapper's row for the DNS-lag scenario (or why it did not run)."""
    result.figures["aurora_lag_peer"] = peer
    version = peer.get("version", "")
    metric = (
        f"Aurora, {lag:g} s DNS lag, AWS Python wrapper {version} (async psycopg, failover_v2 + "
        "iam): first write after promotion / failed writes / logins from the stop to the first "
        "write"
    )
    if "skipped" in peer:
        result.add(metric, str(peer["skipped"]))
        return
    first = peer["first_write_after_promotion_s"]
    stuck = f"; {peer['stuck']} writes still hanging at the end" if peer["stuck"] else ""
    result.add(
        metric,
        f"{'none' if first is None else f'{first:.2f} s'} / {peer['failed']} "
        f"({_errors(peer['errors'])}) / {peer['logins_stop_to_first_write']}{stuck}",
    )
    result.notes.append(
        "The AWS Python wrapper row runs aws-advanced-python-wrapper in a separate virtualenv "
        "(benchmarks/_peer_wrapper.py; ASYNCPG_IAM_PEER_PYTHON or .peer-venv/bin/python) on its "
        "own AuroraCluster: 16 writers share 10 wrapper connections (AsyncAwsWrapperConnection, "
        "plugins failover_v2,iam, defaults otherwise), each write an autocommit INSERT. A write "
        "that raises FailoverSuccessError (the wrapper's signal to retry on the new connection) "
        "counts as failed. The wrapper resolves names through the OS and reaches instances at "
        "port 5432, so it runs in a mount namespace with a private /etc/hosts mapping the "
        "cluster's names to forwarders on loopback."
    )


def _errors(errors: dict[str, int]) -> str:
    if not errors:
        return "none"
    return ", ".join(f"{name} {count}" for name, count in sorted(errors.items()))


def plot(result: CaseResult, out: Path) -> None:
    """Plot acknowledged and failed writes per second for both pools."""
    if "asyncpg_iam" not in result.figures:
        return
    figure, axes = new_figure(9, 6, rows=2)
    for ax, kind, label in (
        (axes[0], "asyncpg_iam", "asyncpg_iam.Pool"),
        (axes[1], "asyncpg", "asyncpg.Pool"),
    ):
        variant = result.figures[kind]
        ok = variant["ok_per_second"][:-1]
        bad = variant["failed_per_second"][:-1]
        ax.plot(range(len(ok)), ok, label="acknowledged writes")
        ax.plot(range(len(bad)), bad, ":", label="failed writes")
        warmup = variant["warmup_s"]
        timeline = variant["timeline"]
        ax.axvline(warmup + timeline["stopped_after_s"], color="red", linewidth=0.8)
        ax.axvline(warmup + timeline["switched_after_s"], color="green", linewidth=0.8)
        ax.set_title(f"{label}: primary stops (red), endpoint switches (green)")
        ax.set_ylabel("writes in that second")
        ax.legend(fontsize=7)
        ax.grid(True, alpha=0.3)
    axes[1].set_xlabel("seconds since the load started")
    result.plots.append(save_figure(figure, out / "failover.png"))
