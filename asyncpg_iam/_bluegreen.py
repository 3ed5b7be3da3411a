"""Blue/green switchovers: read the deployment's metadata, follow its phases, route connects.

An RDS Blue/Green Deployment keeps a green copy replicating from blue; a switchover makes blue
read-only, lets green catch up, promotes it and renames the endpoints so that the green
instances answer to the blue names. A client that only follows DNS reaches the old blue
instances for the DNS TTL; with IAM, which name a token must be signed for changes mid-switch.

**The metadata.** Rows of ``version, endpoint, port, role, status`` from Aurora PostgreSQL's
``pg_catalog.get_blue_green_fast_switchover_metadata('<driver>-<version>')`` or RDS
PostgreSQL's ``rds_tools.show_topology('<driver>-<version>')`` (rds_tools 1.7 and later).
Only version ``1.0`` rows are read. Statuses map to `Phase`; the deployment's phase is the most
advanced one any row reports, and a phase lower than the last one seen is a rollback.

**The routing** (`decide`, a pure function of what is known and the time):

- before the switch (`Phase.CREATED`, `Phase.PREPARATION`) connects go where the plan says,
  and the monitor learns the green endpoints and their addresses;
- during it (`Phase.IN_PROGRESS`) new connects and acquires wait (`HOLD`), at most `hold`
  seconds from the start of the switch; at the bound each waiter gets `SwitchoverTimeoutError`
  and traffic flows again (a switch that never reports completion cannot hold a pool forever);
- after it (`Phase.POST`, `Phase.COMPLETED`, or completion observed) new connects go to the
  green address (`REROUTE`), signed for the green name first, then the blue name (the green
  instances take the blue names mid-switch; the name that worked is tried first from then on),
  and every connection opened before is retired (they are on blue). Once DNS gives the blue
  name green's address, connects follow the plan again.

**Completion the metadata never shows** (RDS PostgreSQL has been seen to stay "in progress"):
while the switch is in progress the monitor polls *green* and ends the hold as soon as either
(a) the blue name resolves to green's address, or (b) green, seen read-only earlier in this
deployment, accepts writes (``pg_is_in_recovery()`` false and ``transaction_read_only`` off).
Each is what a client can see of the switch having happened; neither needs the metadata.

**The poller** (`BlueGreenMonitor`): one check, a catalog query sent with the reset query of
the first connection the pool gets back (no round trip, login or pool slot of its own; the
SQLAlchemy engine, with no such reset, sends it on its first new connection before handing it
out); on a database with
neither metadata source (function missing, ``rds_tools`` missing or older than 1.7, no right
to call it) nothing is polled again. With a source it polls every 60 s, every 1 s once a
deployment exists, every 100 ms during a switchover, on one connection of its own opened
through the pool's connector (so its IAM logins count against ``max_connect_rate``). It runs
on the pool's clock, holds the pool weakly and stops when the pool closes.

This module is what every pool on an RDS name loads: the settings' check, the first check and
the counters. What follows a deployment (the phases, the `Tracker`, the routing, the poller,
`BlueGreenSettings`) is in `_switchover`, loaded only once a database has the metadata (or a
caller names `BlueGreenSettings`): a cold start (AWS Lambda) on a database without a switch
pays for none of it.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any

from asyncpg.exceptions import PostgresError

from ._clock import SYSTEM_CLOCK, Clock
from ._errors import ConfigurationError
from ._options import BLUE_GREEN_HOLD

if TYPE_CHECKING:
    from ._switchover import Follower, Resolver, Tracker

#: What a pool runs to reset a released connection (asyncpg's ``reset=``).
ResetHook = Callable[[Any], Awaitable[None]]
#: What resets a released connection in its pool's stead: ``check(connection, reset)``.
ResetCheck = Callable[[Any, "ResetHook | None"], Awaitable[None]]

__all__ = [
    "BlueGreenCounters",
    "BlueGreenMonitor",
    "blue_green_settings",
]

logger = logging.getLogger("asyncpg_iam.bluegreen")

AURORA_QUERY = (
    "SELECT version, endpoint, port, role, status "
    "FROM pg_catalog.get_blue_green_fast_switchover_metadata($1)"
)
RDS_QUERY = "SELECT version, endpoint, port, role, status FROM rds_tools.show_topology($1)"
# One catalog look-up: which metadata source this server has (no privilege needed). The
# answer is the command tag's row count, 1 for Aurora's function plus 2 for rds_tools': a
# simple-protocol query is one round trip and prepares no statement on a connection that has
# just logged in (a cold start's first query would otherwise wait for two).
SOURCE_PROBE = (
    "SELECT FROM generate_series(1, "
    "(to_regprocedure('pg_catalog.get_blue_green_fast_switchover_metadata(text)') IS NOT NULL)"
    "::int + 2 * (to_regprocedure('rds_tools.show_topology(text)') IS NOT NULL)::int)"
)
RDS_SUFFIXES = (".rds.amazonaws.com", ".rds.amazonaws.com.cn")


def blue_green_settings(setting: object, connector: Any) -> tuple[float, Resolver | None] | None:
    """Decide whether a pool follows switchovers; return the hold and the resolver, or None.

    `setting` is the pool's ``blue_green``: None (the default) means yes for an IAM pool whose
    one endpoint signs for an RDS name (not DSQL, not RDS Proxy).
    """
    chosen = None
    if setting is None or isinstance(setting, bool):
        wanted = setting is not False
    else:
        from ._switchover import BlueGreenSettings  # loaded already for a caller's instance

        if not isinstance(setting, BlueGreenSettings):
            raise ConfigurationError(
                f"blue_green must be True, False, None or a BlueGreenSettings, not {setting!r}"
            )
        wanted, chosen = True, setting
    targets = connector.targets
    usable = connector.provider is not None and len(targets) == 1
    if wanted and not usable and setting is not None:
        raise ConfigurationError(
            "blue_green needs an IAM pool with one endpoint (the blue cluster or instance name)"
        )
    if not wanted or not usable:
        return None
    target = targets[0]
    name = target.signing_host.lower()
    if setting is None and (
        target.service != "rds" or not name.endswith(RDS_SUFFIXES) or ".proxy-" in name
    ):
        return None
    return (BLUE_GREEN_HOLD, None) if chosen is None else (chosen.hold, chosen.resolver)


def driver_tag() -> str:
    """Return the ``<driver>-<version>`` argument the metadata functions take."""
    from importlib import metadata

    try:
        return f"asyncpg_iam-{metadata.version('asyncpg-iam')}"
    except metadata.PackageNotFoundError:
        return "asyncpg_iam-0"


class BlueGreenCounters:
    """What the monitor did (the pool's stats read them).

    `switchovers`: switches that began to hold traffic (holds begun); `held`: connects and
    acquires that waited for a hold; `hold_timeouts`: of those, the ones the hold's bound
    ended with `SwitchoverTimeoutError`; `holds_timed_out`: holds ended by their bound rather
    than by the switch's end or a rollback; `rerouted`: new connections sent to green's
    address; `fallback_refusals`: logins refused while finding the name green accepts (the
    fallback's first tries).
    """

    __slots__ = (
        "fallback_refusals",
        "held",
        "hold_timeouts",
        "holds_timed_out",
        "polls",
        "rerouted",
        "retired",
        "rollbacks",
        "switchovers",
    )

    def __init__(self) -> None:
        self.polls = 0
        self.switchovers = 0
        self.rollbacks = 0
        self.held = 0
        self.hold_timeouts = 0
        self.holds_timed_out = 0
        self.rerouted = 0
        self.fallback_refusals = 0
        self.retired = 0


class BlueGreenMonitor:
    """Check a pool's database for blue/green metadata; follow a deployment once found.

    `connector` is the pool's `Connector` (the monitor installs its ``route`` for the first
    check, and the follower while a switch needs one). `retire()` retires every open
    connection of the pool; `hold_acquires(gate)` makes the pool's acquires await ``gate()``
    first (None removes it). `start()` arms the first check: in the reset of the first
    connection released (`arm_reset(check)` installs it), else on the next new connection.
    `follower` (`_switchover.Follower`) exists once the metadata was found: it holds the
    tracker, the hold and the routing.
    """

    def __init__(
        self,
        pool: Any,
        *,
        connector: Any,
        retire: Callable[[], int],
        hold_acquires: Callable[[Callable[[], Awaitable[None]] | None], None],
        hold: float = BLUE_GREEN_HOLD,
        resolver: Resolver | None = None,
        clock: Clock = SYSTEM_CLOCK,
        name: str = "",
        arm_reset: Callable[[ResetCheck], None] | None = None,
    ) -> None:
        self._pool_ref: weakref.ref[Any] = weakref.ref(pool)
        self._connector = connector
        self._retire = retire
        self._hold_acquires = hold_acquires
        self._hold = float(hold)
        self._resolver = resolver
        self._clock = clock
        self._name = name
        self.counters = BlueGreenCounters()
        self.source: str | None = None
        """``"aurora"``, ``"rds"``, or None (not checked yet, or neither exists)."""
        self.follower: Follower | None = None
        self._task: asyncio.Task[None] | None = None
        self._checked = False
        self._stopped = False
        self._arm = arm_reset

    @property
    def tracker(self) -> Tracker:
        """The follower's tracker (a deployment not created while nothing is followed)."""
        if self.follower is not None:
            return self.follower.tracker
        from ._switchover import Tracker

        return Tracker(self._hold)

    def phase_name(self) -> str | None:
        """The deployment's phase for the stats (None: no metadata, or not checked yet)."""
        if self.source is None:
            return None
        return self.tracker.phase.name.lower()

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Check the database for metadata once.

        With `arm_reset` (a pool's: it makes the next release of a connection reset it through
        the check it is given, `_asyncpg_pool.reset_once`) the probe follows the reset query of
        the first connection released, in the same round trip. Without it (the SQLAlchemy
        engine) the next new connection carries the check before it is handed out.
        """
        if self._checked or self._stopped:
            return
        if self._arm is not None:
            self._arm(self._reset_and_check)
        else:
            self._connector.route = self._first_connect

    async def _reset_and_check(self, con: Any, reset: ResetHook | None) -> None:
        """Reset `con` as its pool would (`reset`, or the connection's reset query) and check
        for metadata in the same round trip."""
        if self._checked or self._stopped:
            await (reset(con) if reset is not None else con.reset())
            return
        self._checked = True
        try:
            if reset is not None:
                await reset(con)
                found = await self.first_check(con)
            else:
                found = await self.first_check(con, before=con.get_reset_query())
        except BaseException as exc:
            # asyncpg terminates a connection whose reset failed; the next release checks again.
            self._checked = False
            if isinstance(exc, Exception):
                logger.debug("pool %s: blue/green check failed: %r", self._name, exc)
            self.start()
            raise
        if found and not self._stopped:
            self._follow()

    def _first_connect(self, extra: dict[str, Any]) -> Coroutine[Any, Any, tuple[Any, float]]:
        if self._checked:  # connects that began together: only the first one checks
            return self._connector.open_planned(extra)  # type: ignore[no-any-return]
        self._checked = True
        self._connector.route = None
        return self._open_and_check(extra)

    async def _open_and_check(self, extra: dict[str, Any]) -> tuple[Any, float]:
        opened: tuple[Any, float] = await self._connector.open_planned(extra)
        try:
            found = await self.first_check(opened[0])
        except BaseException as exc:
            # The check must never cost the connect: the next new connection checks again.
            self._checked = False
            if self._connector.route is None:
                self.start()
            if not isinstance(exc, Exception):
                opened[0].terminate()  # cancelled: asyncpg never gets it
                raise
            logger.debug("pool %s: blue/green check failed: %r", self._name, exc)
            return opened
        if found:
            self._follow()
        return opened

    def _follow(self) -> None:
        """Load the follower and start polling."""
        from ._switchover import Follower, run

        assert self.source is not None
        self.follower = Follower(
            self._pool_ref,
            connector=self._connector,
            query=metadata_query(self.source),
            tag=driver_tag(),
            counters=self.counters,
            retire=self._retire,
            hold_acquires=self._hold_acquires,
            hold=self._hold,
            resolver=self._resolver,
            clock=self._clock,
            name=self._name,
        )
        self._task = asyncio.get_running_loop().create_task(
            run(weakref.ref(self.follower)), name=f"asyncpg_iam blue/green {self._name}"
        )

    def stop(self) -> None:
        """Stop polling; release anything held; close the follower's connection."""
        self._stopped = True
        if self._task is not None:
            self._task.cancel()
        if self.follower is not None:
            self.follower.stop()
        self._connector.route = None

    async def first_check(self, con: Any, *, before: str = "") -> bool:
        """Find the metadata source on `con` (new, or being reset: `before` is its reset
        query, sent with the probe in one round trip); return whether there is one that this
        user may read."""
        try:
            try:
                # "\n;" ends the reset query whatever it ends with (a reset query of a
                # connection class's own may lack the semicolon, or end in a comment).
                tag = await con.execute(f"{before}\n;{SOURCE_PROBE}" if before else SOURCE_PROBE)
            except PostgresError:
                if before:  # the probe failed and took the reset with it: reset alone
                    await con.execute(before)
                raise
            found = int(tag.rpartition(" ")[2])  # "SELECT n"
            self.source = "aurora" if found & 1 else "rds" if found & 2 else None
            if self.source is not None:  # a right to call it, too
                await con.fetch(metadata_query(self.source), driver_tag())
        except PostgresError as exc:
            logger.info(
                "pool %s: blue/green metadata not readable (%s): switchovers are not followed",
                self._name,
                exc.sqlstate,
            )
            self.source = None
        if self.source is None:
            logger.debug("pool %s: no blue/green metadata on this database", self._name)
        return self.source is not None


def metadata_query(source: str) -> str:
    """Return the query that reads the metadata from `source` (``"aurora"`` or ``"rds"``)."""
    return AURORA_QUERY if source == "aurora" else RDS_QUERY
