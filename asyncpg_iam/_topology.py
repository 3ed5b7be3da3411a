"""Aurora as a topology: which instances a cluster has, and where each connect goes.

A pool on an Aurora cluster or reader endpoint asks the cluster which instances it has
(``aurora_replica_status()``, the query the AWS wrappers use; ``rds_tools.show_topology()`` on
an RDS Multi-AZ DB cluster), and from then on dials instance endpoints itself:

- the **pure core** (`topology_from_rows`, `instance_host_pattern`): rows in, a frozen
  `Topology` out (the writer, the readers, their instance endpoint names). Rows not updated for
  300 s are stale and ignored; when several rows claim the writer the newest wins; an instance
  identifier becomes a host name only if it is one DNS label;
- the **router** (`Router`): for each connect, which (host, port, signing name) to dial. A
  pool that wants the writer dials the writer's instance endpoint, with a token signed for that
  name, so a failover does not wait for the cluster endpoint's DNS (15-20 s by AWS's guide).
  A pool that wants readers spreads its connections over the readers by a strategy (least
  connections by default, or round robin), optionally leaving out readers that lag;
- the **monitor** (`TopologyMonitor`): a background task on the pool's clock that refreshes
  the topology every 30 s, every 0.1 s while a failover is looking for its new writer and
  every 1 s for 30 s after one was found, and on every failover signal. Its queries run on a
  connection of its own (one login when the pool starts, one more per failover), never on
  the acquire path. It holds the pool's callbacks weakly and stops with the pool.

When the cluster has no topology functions (a Multi-AZ DB cluster without ``rds_tools``, a
plain PostgreSQL behind an Aurora-like name), the pool keeps connecting through DNS as
before, without an error. A pool pointed at an instance endpoint stays on it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import itertools
import logging
import re
import weakref
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal

import asyncpg
from asyncpg.exceptions import TargetServerAttributeNotMatched

from . import _options
from ._auth import SigningTarget
from ._clock import SYSTEM_CLOCK, Clock
from ._errors import ConfigurationError, NoWriterError
from ._signing import instance_host_pattern

__all__ = [
    "AuroraTopology",
    "Instance",
    "Router",
    "Topology",
    "TopologyMonitor",
    "instance_host_pattern",
    "topology_from_rows",
]

logger = logging.getLogger("asyncpg_iam.topology")

#: Rows of aurora_replica_status() not updated for this long are stale (the wrappers' rule).
STALE_AFTER = 300.0
WRITER_SESSION = "MASTER_SESSION_ID"
READER_STRATEGIES = ("least_connections", "round_robin")

# While a failover looks for its writer, and for a while after a new writer was found.
_SEARCH_INTERVAL = 0.1
_FAST_INTERVAL = 1.0
_FAST_PERIOD = 30.0
# The same failed writer candidate is probed again at most this often.
_REPROBE_INTERVAL = 1.0
# How long the monitor's own login or query may take.
_MONITOR_TIMEOUT = 5.0
# A reader whose connect failed gets no new connections for this long.
_EXCLUDE_FOR = 10.0
# Rebalancing retires at most one idle connection per step.
_REBALANCE_INTERVAL = 1.0

_LABEL = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$", re.IGNORECASE)
_AURORA_QUERY = (
    "SELECT server_id, session_id, replica_lag_in_msec, last_update_timestamp "
    "FROM aurora_replica_status()"
)
# RDS Multi-AZ DB clusters: the instances, and (on a reader) which one is the writer.
_MULTI_AZ_QUERY = "SELECT id, endpoint, port FROM rds_tools.show_topology()"
_MULTI_AZ_WRITER = (
    "SELECT coalesce("
    "(SELECT multi_az_db_cluster_source_dbi_resource_id "
    "FROM rds_tools.multi_az_db_cluster_source_dbi_resource_id()), "
    "(SELECT dbi_resource_id FROM rds_tools.dbi_resource_id()))"
)


# -- settings ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class AuroraTopology:
    """How a pool uses an Aurora cluster's topology (``create_pool(topology=...)``).

    `instance_host_pattern` names an instance endpoint, ``?`` standing for the instance
    identifier (``"?.abc123.us-east-1.rds.amazonaws.com"``, optionally ``:port``); by default
    it is derived from the cluster endpoint's name. `resolve(name, port)` says where to dial
    an instance endpoint when DNS cannot (custom DNS, a tunnel, a test bed): the token is still
    signed for the name. `reader_strategy` spreads a reader pool's connections:
    ``"least_connections"`` (default) or ``"round_robin"``; `max_reader_lag` (seconds) leaves
    out readers that lag more, unless every reader does. `refresh_interval` is the steady
    refresh period. `no_writer_timeout`: after a failover signal, when for this long every
    instance the topology lists answers but none accepts writes, connects fail at once with
    `NoWriterError` instead of retrying for the whole connect timeout.
    """

    instance_host_pattern: str | None = None
    resolve: Callable[[str, int], tuple[str, int]] | None = None
    reader_strategy: Literal["least_connections", "round_robin"] = "least_connections"
    max_reader_lag: float | None = None
    refresh_interval: float = 30.0
    no_writer_timeout: float = 10.0

    def __post_init__(self) -> None:
        if self.reader_strategy not in READER_STRATEGIES:
            raise ConfigurationError(
                f"reader_strategy must be one of {', '.join(READER_STRATEGIES)}, "
                f"not {self.reader_strategy!r}"
            )
        _options.positive_seconds("refresh_interval", self.refresh_interval)
        _options.positive_seconds("no_writer_timeout", self.no_writer_timeout)
        if self.max_reader_lag is not None:
            _options.seconds("max_reader_lag", self.max_reader_lag, hint=" (or None)")
        if self.resolve is not None and not callable(self.resolve):
            raise ConfigurationError(
                f"resolve must be a function (name, port) -> (host, port), not {self.resolve!r}"
            )
        if self.instance_host_pattern is not None:
            _split_pattern(self.instance_host_pattern)


def _split_pattern(pattern: str) -> tuple[str, int | None]:
    """Return (host pattern, port or None) of an `instance_host_pattern`."""
    host, _, port = _options.host("instance_host_pattern", pattern).partition(":")
    if host.count("?") != 1 or not host.startswith("?."):
        raise ConfigurationError(
            f"instance_host_pattern must start with '?.' (the instance identifier, then the "
            f"DNS suffix), as in '?.abc123.us-east-1.rds.amazonaws.com', not {pattern!r}"
        )
    if not port:
        return host, None
    if not (port.isascii() and port.isdigit()):
        raise ConfigurationError(f"the port of instance_host_pattern {pattern!r} is not a number")
    return host, _options.port("the port of instance_host_pattern", int(port))


# -- the pure core ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Instance:
    """One instance of the cluster: its identifier and endpoint name, as the server lists it."""

    id: str
    host: str
    """The instance endpoint's name (what its tokens are signed for)."""
    port: int
    is_writer: bool
    lag: float | None = None
    """Replica lag in seconds (None for the writer or when unknown)."""
    updated: dt.datetime | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class Topology:
    """The cluster's instances at one refresh."""

    writer: Instance | None
    readers: tuple[Instance, ...]
    source: str = "aurora_replica_status"

    @property
    def instances(self) -> tuple[Instance, ...]:
        """The writer (when there is one) and the readers."""
        return ((self.writer,) if self.writer else ()) + self.readers

    def find(self, instance_id: str) -> Instance | None:
        """Return the instance named `instance_id`, or None."""
        return next((i for i in self.instances if i.id == instance_id), None)


def _as_utc(value: Any) -> dt.datetime | None:
    if not isinstance(value, dt.datetime):
        return None
    return value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)


def topology_from_rows(
    rows: Iterable[Sequence[Any]],
    *,
    pattern: str,
    port: int,
    now: dt.datetime,
    source: str = "aurora_replica_status",
) -> Topology:
    """Build a `Topology` from ``(server_id, session_id, replica_lag_in_msec,
    last_update_timestamp)`` rows.

    Rows updated more than 300 s before `now` are dropped; of several writers the most
    recently updated wins (the others are dropped: a writer that lost its role and is not yet
    back as a reader); identifiers that are not one DNS label are dropped (they would change
    which name a token is signed for). `pattern` is an instance host pattern (``?.suffix``,
    optionally ``:port``, which overrides `port`).
    """
    host_pattern, pattern_port = _split_pattern(pattern)
    port = pattern_port or port
    writers: list[Instance] = []
    readers: dict[str, Instance] = {}
    for server_id, session_id, lag_ms, updated in rows:
        server_id = str(server_id)
        if not _LABEL.match(server_id):
            logger.warning(
                "topology: ignoring instance identifier %r (not one DNS label)", server_id
            )
            continue
        when = _as_utc(updated)
        if when is not None and (now - when).total_seconds() > STALE_AFTER:
            continue
        is_writer = session_id == WRITER_SESSION
        instance = Instance(
            id=server_id,
            host=host_pattern.replace("?", server_id.lower()),
            port=port,
            is_writer=is_writer,
            lag=None if is_writer or lag_ms is None else float(lag_ms) / 1000,
            updated=when,
        )
        if is_writer:
            writers.append(instance)
        else:
            readers[server_id] = instance
    oldest = dt.datetime.min.replace(tzinfo=dt.timezone.utc)
    writer = max(writers, key=lambda w: w.updated or oldest, default=None)
    if writer is not None:
        readers.pop(writer.id, None)
    ordered = tuple(sorted(readers.values(), key=lambda r: r.id))
    return Topology(writer=writer, readers=ordered, source=source)


def multi_az_rows(
    rows: Iterable[Sequence[Any]], writer_id: Any, *, now: dt.datetime
) -> list[tuple[str, str, None, dt.datetime]]:
    """Turn ``rds_tools.show_topology()`` rows (id, endpoint, port) into replica-status rows."""
    out = []
    for resource_id, endpoint, _port in rows:
        label = str(endpoint).split(".", 1)[0]
        session = WRITER_SESSION if resource_id == writer_id else "replica"
        out.append((label, session, None, now))
    return out


def fair_shares(counts: Mapping[str, int], readers: Sequence[str]) -> dict[str, int]:
    """Return how many connections each reader holds beyond its fair share (negative: short)."""
    total = sum(counts.get(r, 0) for r in readers)
    if not readers:
        return {}
    share, extra = divmod(total, len(readers))
    # The readers holding most keep the remainder, so a balanced pool is left alone.
    ranked = sorted(readers, key=lambda r: -counts.get(r, 0))
    fair = {r: share + (1 if i < extra else 0) for i, r in enumerate(ranked)}
    return {r: counts.get(r, 0) - fair[r] for r in readers}


# -- the router ------------------------------------------------------------------------------


class Router:
    """Choose where each connect goes, from the latest topology.

    `base` is the plan's own signing target (the cluster or reader endpoint): what its tokens
    are signed for, the region, and where the name is dialled. `role` is ``"writer"`` or
    ``"reader"`` (``"prefer_reader"`` falls back to the writer when no reader is listed).
    """

    def __init__(
        self,
        base: SigningTarget,
        *,
        role: Literal["writer", "reader", "prefer_reader"],
        settings: AuroraTopology,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.base = base
        self.role = role
        self.settings = settings
        pattern = settings.instance_host_pattern or instance_host_pattern(base.signing_host)
        if pattern is None:
            raise ConfigurationError(
                f"no instance_host_pattern for {base.signing_host!r}: pass "
                "AuroraTopology(instance_host_pattern='?.<the cluster DNS suffix>')"
            )
        self.pattern = pattern
        self._clock = clock
        self.topology: Topology | None = None
        self._targets: dict[str, SigningTarget] = {}
        self._by_con: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()
        self._turn = itertools.count()
        self._excluded: dict[str, float] = {}
        # Connects routed and not yet finished, by instance: least connections counts them.
        self._pending: Counter[str] = Counter()
        # A failover signal: until a writer is confirmed, writer connects wait (see `wait`).
        self._searching: asyncio.Event | None = None
        self._no_writer: str | None = None
        self.routed = 0
        """Connects sent to an instance endpoint."""

    # -- state the monitor sets ------------------------------------------------------------

    def use(self, topology: Topology) -> None:
        """Route by `topology` from now on."""
        self.topology = topology
        self._targets = {i.id: self._target_for(i) for i in topology.instances}

    def _target_for(self, instance: Instance) -> SigningTarget:
        resolve = self.settings.resolve
        host, port = (
            resolve(instance.host, instance.port) if resolve else (instance.host, instance.port)
        )
        return self.base.replace(
            host=host,
            port=port,
            signing_host=instance.host,
            signing_port=instance.port,
        )

    @property
    def searching(self) -> bool:
        """Whether writer connects wait for the monitor to confirm a writer."""
        return self._searching is not None

    def start_search(self) -> None:
        """A failover signal: hold writer connects until a writer is confirmed."""
        if self.role == "writer" and self._searching is None:
            self._searching = asyncio.Event()
            self._no_writer = None

    def confirm_writer(self) -> None:
        """The topology's writer accepted a read-write login: release the waiting connects."""
        event, self._searching, self._no_writer = self._searching, None, None
        if event is not None:
            event.set()

    def no_writer(self, reason: str) -> None:
        """Fail writer connects at once with `reason` until a writer is confirmed."""
        self._no_writer = reason
        if self._searching is not None:
            self._searching.set()

    # -- choosing ----------------------------------------------------------------------------

    def route(self) -> SigningTarget | None:
        """Return the target of the next connect, or None for the plan's own endpoint."""
        topology = self.topology
        if topology is None:
            return None
        if self.role == "writer":
            chosen = topology.writer
        else:
            chosen = self._pick_reader(topology)
            if chosen is None and self.role == "prefer_reader":
                chosen = topology.writer
        if chosen is None:
            return None
        self.routed += 1
        self._pending[chosen.id] += 1
        return self._targets[chosen.id]

    def failed(self, target: SigningTarget) -> SigningTarget | None:
        """A connect to `target` failed: leave its reader out for a while and return another
        reader's target (None for a writer, or when there is no other)."""
        if self.role == "writer":
            return None
        instance_id = target.signing_host.split(".", 1)[0]
        self.settle(target)
        self._excluded[instance_id] = self._clock.monotonic() + _EXCLUDE_FOR
        other = self.route()
        return None if other is None or other.signing_host == target.signing_host else other

    def _pick_reader(self, topology: Topology) -> Instance | None:
        readers = list(topology.readers)
        if self._excluded:
            now = self._clock.monotonic()
            self._excluded = {i: t for i, t in self._excluded.items() if t > now}
            readers = [r for r in readers if r.id not in self._excluded] or readers
        limit = self.settings.max_reader_lag
        if limit is not None:
            fresh = [r for r in readers if r.lag is None or r.lag <= limit]
            readers = fresh or readers
        if not readers:
            return None
        if self.settings.reader_strategy == "round_robin":
            return readers[next(self._turn) % len(readers)]
        counts = self.connections_by_instance()
        counts.update(self._pending)
        # Ties go round robin, so connects opened together spread too.
        start = next(self._turn)
        ring = readers[start % len(readers) :] + readers[: start % len(readers)]
        return min(ring, key=lambda r: counts.get(r.id, 0))

    async def wait(self, timeout: float | None) -> SigningTarget | None:
        """Wait for a confirmed writer (at most `timeout` s), then return `route()`.

        Raises `NoWriterError` when the monitor found none to confirm.
        """
        event = self._searching
        if event is not None:
            try:
                await asyncio.wait_for(event.wait(), timeout)
            except asyncio.TimeoutError:
                raise asyncio.TimeoutError(
                    f"no writer confirmed within {timeout} s after a failover"
                ) from None
        if self._no_writer is not None:
            raise NoWriterError(
                self._no_writer,
                host=self.base.signing_host,
                port=self.base.signing_port,
                phase="topology",
                hint="The cluster has no instance that accepts writes: a failover may still "
                "be promoting one (retry later), or the cluster was left without a writer",
            )
        return self.route()

    # -- what it routed -----------------------------------------------------------------------

    def settle(self, target: SigningTarget, con: Any = None) -> None:
        """A connect `route()` sent to `target` finished: with `con` opened, else failed."""
        instance_id = target.signing_host.split(".", 1)[0]
        if self._pending[instance_id] > 0:
            self._pending[instance_id] -= 1
        if con is not None:
            self._by_con[con] = instance_id

    def connections_by_instance(self) -> Counter[str]:
        """Open connections routed to each instance (by identifier)."""
        counts: Counter[str] = Counter()
        for con, instance_id in list(self._by_con.items()):
            if not con.is_closed():
                counts[instance_id] += 1
        return counts

    def instance_of(self, con: Any) -> str | None:
        """Return the identifier of the instance `con` was routed to, or None."""
        return self._by_con.get(con)


# -- the monitor -----------------------------------------------------------------------------


class TopologyMonitor:
    """Refresh a router's topology in the background, on the pool's clock.

    `open_connection(target, attrs, timeout)` opens the monitor's own connection through the
    pool's connector (counted in `logins`). `retire(predicate, idle_only, limit)` retires
    the pool's connections whose identifier `predicate` accepts and returns how many (the
    callable is held weakly through the pool). Start it with `start()` (awaits the first
    refresh), stop it with `aclose()`.
    """

    def __init__(
        self,
        router: Router,
        *,
        open_connection: Callable[..., Any],
        retire: Callable[[Callable[[Any], bool], bool, int | None], int] | None,
        name: str,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.router = router
        self._open = open_connection
        self._retire = retire
        self._name = name
        self._clock = clock
        self._link: Any = None  # the monitor's own connection, for the topology queries
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._closed = False
        self._fast_until = float("-inf")
        self._search_began: float | None = None
        self._probed: dict[str, float] = {}
        self._probes: set[asyncio.Task[None]] = set()
        self._last_rebalance = float("-inf")
        self.available: bool | None = None
        """Whether the cluster answers a topology query (None: not asked yet)."""
        self.refreshes = 0
        """Topology queries answered."""
        self.logins = 0
        """Logins of the monitor's own connection and of its writer probes."""
        self.rebalanced = 0
        """Idle connections retired to move them to an under-served reader."""

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Read the topology once (errors fall back to DNS), then refresh in the background."""
        try:
            await self.refresh()
        except Exception as exc:  # the pool still works through DNS
            logger.info("pool %s: topology not read at start (%s): using DNS", self._name, exc)
        if self.available is False or self._closed:
            return
        self._task = asyncio.get_running_loop().create_task(
            _run(weakref.ref(self)), name=f"asyncpg_iam topology {self._name}"
        )

    async def aclose(self) -> None:
        """Stop refreshing and close the monitor's connection (idempotent)."""
        self.close()

    def close(self) -> None:
        """Stop refreshing and terminate the monitor's connection (idempotent)."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            self._task = None
        for probe in list(self._probes):
            probe.cancel()
        con, self._link = self._link, None
        if con is not None and not con.is_closed():
            con.terminate()

    def signal(self, cause: str = "failover") -> None:
        """A failover signal: refresh now, and hold writer connects until a writer is found."""
        self.router.start_search()
        if self._search_began is None:
            self._search_began = self._clock.monotonic()
        self._probed.clear()
        self._wake.set()
        logger.debug("pool %s: topology refresh on a failover signal (%s)", self._name, cause)

    def wake(self) -> None:
        """Refresh now (an instance may have left)."""
        self._wake.set()

    def lost(self, con: Any) -> bool:
        """A reader pool's connection was dropped: refresh now; True when the router sent it
        to one reader (that reader's loss, not a pool-wide event). `FailoverGuard.on_lost`."""
        if self.router.instance_of(con) is None:
            return False
        self.wake()
        return True

    def follow(self, guard: Any) -> None:
        """Hook into a `FailoverGuard` (the pool's or the engine's): its events refresh the
        topology, and on a reader pool a lost connection is that reader's loss (`lost`)."""
        guard.on_event = self.signal
        guard.on_lost = self.lost if self.router.role != "writer" else None

    def next_interval(self) -> float:
        """Seconds until the next refresh."""
        if self.router.searching:
            return _SEARCH_INTERVAL
        now = self._clock.monotonic()
        if now < self._fast_until or self._unbalanced():
            return min(_FAST_INTERVAL, self.router.settings.refresh_interval)
        return self.router.settings.refresh_interval

    # -- one refresh ---------------------------------------------------------------------------

    async def refresh(self) -> Topology | None:
        """Query the topology once and route by it; None when the cluster has none."""
        con = await self._connection()
        topology = await self._query(con)
        if topology is None:
            return None
        self.refreshes += 1
        previous = self.router.topology
        self.router.use(topology)
        writer = topology.writer
        old = previous.writer if previous is not None else None
        if writer is not None and old is not None and writer.id != old.id:
            self._fast_until = self._clock.monotonic() + _FAST_PERIOD
            logger.warning(
                "pool %s: the cluster's writer is now %s (was %s)", self._name, writer.id, old.id
            )
            if self.router.role == "writer":
                self._retire_matching(lambda i: i == old.id, idle_only=False, limit=None)
        if previous is not None:
            gone = {i.id for i in previous.instances} - {i.id for i in topology.instances}
            if gone:
                logger.info("pool %s: instances left the topology: %s", self._name, sorted(gone))
        if self.router.searching:
            self._probe_writer(topology)
        elif self.router.role != "writer":
            self._rebalance(topology)
        return topology

    async def _connection(self) -> Any:
        con = self._link
        if con is not None and not con.is_closed():
            return con
        self._link = None
        last: BaseException | None = None
        for target in self._candidates():
            self.logins += 1
            try:
                opened, _ = await self._open(target, "any", _MONITOR_TIMEOUT)
            except (OSError, asyncio.TimeoutError, asyncpg.PostgresError) as exc:
                last = exc
                continue
            self._link = opened
            return opened
        raise last or ConnectionError("no instance to read the topology from")

    def _candidates(self) -> list[SigningTarget | None]:
        """Where the monitor may read the topology: readers first, then the writer, then the
        plan's own endpoint (None)."""
        topology = self.router.topology
        if topology is None:
            return [None]
        order = [*topology.readers, *([topology.writer] if topology.writer else [])]
        return [self.router._targets[i.id] for i in order] + [None]

    async def _query(self, con: Any) -> Topology | None:
        now = self._clock.now()
        base = self.router.base
        try:
            rows = await con.fetch(_AURORA_QUERY, timeout=_MONITOR_TIMEOUT)
            source = "aurora_replica_status"
        except asyncpg.UndefinedFunctionError:
            try:
                raw = await con.fetch(_MULTI_AZ_QUERY, timeout=_MONITOR_TIMEOUT)
                writer_id = await con.fetchval(_MULTI_AZ_WRITER, timeout=_MONITOR_TIMEOUT)
            except (asyncpg.UndefinedFunctionError, asyncpg.InvalidSchemaNameError):
                self._unavailable()
                return None
            rows = multi_az_rows(raw, writer_id, now=now)
            source = "rds_tools.show_topology"
        except (OSError, asyncio.TimeoutError, asyncpg.InterfaceError) as exc:
            self._drop_connection()
            raise ConnectionError(f"topology query failed: {exc}") from exc
        self.available = True
        return topology_from_rows(
            rows, pattern=self.router.pattern, port=base.signing_port, now=now, source=source
        )

    def _unavailable(self) -> None:
        if self.available is None:
            logger.info(
                "pool %s: %s lists no topology (neither aurora_replica_status() nor "
                "rds_tools.show_topology()): connecting through DNS",
                self._name,
                self.router.base.signing_host,
            )
        self.available = False
        self._drop_connection()

    def _drop_connection(self) -> None:
        con, self._link = self._link, None
        if con is not None and not con.is_closed():
            con.terminate()

    # -- failover: confirm the new writer -----------------------------------------------------

    def _probe_writer(self, topology: Topology) -> None:
        """Log in to the listed writer read-write (in a task); waiting connects are released
        when it accepts."""
        writer = topology.writer
        now = self._clock.monotonic()
        if writer is None:
            self._check_no_writer(now, "the topology lists no writer")
            return
        last = self._probed.get(writer.id)
        if last is not None and now - last < _REPROBE_INTERVAL:
            return
        self._probed[writer.id] = now
        # In a task of its own: a probe of a host that does not answer must not hold up the
        # refreshes that will name the next writer.
        probe = asyncio.get_running_loop().create_task(self._probe(writer))
        self._probes.add(probe)
        probe.add_done_callback(self._probes.discard)

    async def _probe(self, writer: Instance) -> None:
        router = self.router
        self.logins += 1
        try:
            con, _ = await self._open(router._targets[writer.id], "read-write", _MONITOR_TIMEOUT)
        except TargetServerAttributeNotMatched:
            self._check_no_writer(
                self._clock.monotonic(), f"the listed writer {writer.id} is read-only"
            )
            return
        except (OSError, asyncio.TimeoutError, asyncpg.PostgresError) as exc:
            logger.debug("pool %s: writer probe of %s failed: %s", self._name, writer.id, exc)
            return
        current = router.topology.writer if router.topology is not None else None
        if self._closed or not router.searching or current is None or current.id != writer.id:
            con.terminate()  # the topology moved on while it logged in
            return
        # The probe stays as the monitor's connection: the writer knows the topology.
        self._drop_connection()
        now = self._clock.monotonic()
        self._link = con
        self._search_began = None
        self._probed.clear()
        self._fast_until = now + _FAST_PERIOD
        router.confirm_writer()
        logger.info("pool %s: writer %s confirmed after a failover", self._name, writer.id)

    def _check_no_writer(self, now: float, reason: str) -> None:
        began = self._search_began if self._search_began is not None else now
        if now - began >= self.router.settings.no_writer_timeout:
            self.router.no_writer(
                f"no writer in cluster {self.router.base.signing_host} "
                f"{now - began:.0f} s after a failover signal: {reason}"
            )

    # -- readers: move connections to under-served readers ------------------------------------

    def _unbalanced(self) -> bool:
        topology = self.router.topology
        if topology is None or self.router.role == "writer" or len(topology.readers) < 2:
            return False
        shares = fair_shares(
            self.router.connections_by_instance(), [r.id for r in topology.readers]
        )
        return any(v < 0 for v in shares.values()) and any(v > 0 for v in shares.values())

    def _rebalance(self, topology: Topology) -> None:
        """Retire one idle connection of the most over-served reader when another is short."""
        now = self._clock.monotonic()
        if now - self._last_rebalance < _REBALANCE_INTERVAL or not self._unbalanced():
            return
        self._last_rebalance = now
        shares = fair_shares(
            self.router.connections_by_instance(), [r.id for r in topology.readers]
        )
        richest = max(shares, key=lambda r: shares[r])
        if self._retire_matching(lambda i: i == richest, idle_only=True, limit=1):
            self.rebalanced += 1
            logger.debug("pool %s: moving a connection off reader %s", self._name, richest)

    def _retire_matching(
        self, match: Callable[[str], bool], *, idle_only: bool, limit: int | None
    ) -> int:
        retire = self._retire
        if retire is None:
            return 0
        router = self.router

        def where(con: Any) -> bool:
            instance = router.instance_of(con)
            return instance is not None and match(instance)

        return retire(where, idle_only, limit)


async def _run(monitor_ref: weakref.ref[TopologyMonitor]) -> None:
    """Refresh until the monitor is closed or collected (it is held weakly between waits)."""
    while True:
        monitor = monitor_ref()
        if monitor is None or monitor._closed:
            return
        wake, clock, interval = monitor._wake, monitor._clock, monitor.next_interval()
        del monitor
        sleeper = asyncio.ensure_future(clock.sleep(interval))
        waker = asyncio.ensure_future(wake.wait())
        try:
            await asyncio.wait({sleeper, waker}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleeper.cancel()
            waker.cancel()
        wake.clear()
        monitor = monitor_ref()
        if monitor is None or monitor._closed:
            return
        try:
            await monitor.refresh()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            logger.debug("pool %s: topology refresh failed: %s", monitor._name, exc)
        if monitor.available is False:
            return
        del monitor


# -- wiring --------------------------------------------------------------------------------

_READER_ATTRS = {"read-only": "reader", "standby": "reader", "prefer-standby": "prefer_reader"}


def topology_for(
    connector: Any,
    setting: bool | AuroraTopology,
    *,
    retire: Callable[[Callable[[Any], bool], bool, int | None], int] | None,
    name: str,
    clock: Clock = SYSTEM_CLOCK,
) -> TopologyMonitor | None:
    """Give `connector` a `Router` and return its monitor, or None where DNS is kept.

    Kept on DNS: ``topology=False``, a plan without IAM or with several hosts, a name that is
    not an Aurora cluster or reader endpoint (an instance endpoint, a custom endpoint, a CNAME)
    unless `instance_host_pattern` is given, and a plan that dials another name than it signs
    for (a tunnel or CNAME) unless `resolve` says where the instances are.
    """
    if setting is False:
        return None
    if setting is True:
        settings = AuroraTopology()
    elif isinstance(setting, AuroraTopology):
        settings = setting
    else:
        raise ConfigurationError(
            f"topology must be True, False or an AuroraTopology(...), not {setting!r}"
        )
    if connector.provider is None or len(connector.targets) != 1:
        return None
    base: SigningTarget = connector.targets[0]
    signing = base.signing_host.lower().rstrip(".")
    if base.service != "rds" or ".cluster-custom-" in signing:
        return None
    if settings.instance_host_pattern is None and instance_host_pattern(signing) is None:
        return None
    if settings.resolve is None and base.host.lower().rstrip(".") != signing:
        logger.info(
            "pool %s: dials %s for %s: topology off (pass AuroraTopology(resolve=...) to say "
            "where the instance endpoints are reached)",
            name,
            base.host,
            base.signing_host,
        )
        return None
    attrs = str(connector.plan.target_session_attrs)
    role: Literal["writer", "reader", "prefer_reader"]
    if attrs in _READER_ATTRS:
        role = "reader" if _READER_ATTRS[attrs] == "reader" else "prefer_reader"
    elif ".cluster-ro-" in signing and attrs in ("any", "prefer-standby"):
        role = "reader"
    else:
        role = "writer"
    router = Router(base, role=role, settings=settings, clock=clock)
    connector.router = router
    return TopologyMonitor(
        router, open_connection=connector.open_to, retire=retire, name=name, clock=clock
    )
