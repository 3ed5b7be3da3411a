"""Following a blue/green deployment, once a pool's database has the metadata (`_bluegreen`).

The phases and the metadata rows (`Phase`, `parse_rows`), the routing decision (`decide`,
pure), the `Tracker` (rollbacks, completion observed without metadata), the `Follower` (the
poller, the bounded hold, the reroute to green with the signed-for name pinned for TLS) and
`BlueGreenSettings`. `_bluegreen`'s docstring tells the whole story; this module loads only
when a pool finds a deployment's metadata, or a caller names `BlueGreenSettings`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import ipaddress
import logging
import re
import socket
import ssl
import weakref
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping
from typing import Any

from asyncpg.exceptions import InvalidAuthorizationSpecificationError, PostgresError

from ._auth import SigningTarget
from ._clock import Clock
from ._errors import ConfigurationError, SwitchoverTimeoutError
from ._options import BLUE_GREEN_HOLD

__all__ = [
    "HOLD",
    "PASS",
    "REROUTE",
    "SOURCE_ROLE",
    "TARGET_ROLE",
    "BlueGreenSettings",
    "Deployment",
    "Follower",
    "Member",
    "Phase",
    "Resolver",
    "Tracker",
    "blue_name_of",
    "decide",
    "parse_rows",
    "poll_interval",
    "run",
]

logger = logging.getLogger("asyncpg_iam.bluegreen")

SOURCE_ROLE = "BLUE_GREEN_DEPLOYMENT_SOURCE"
TARGET_ROLE = "BLUE_GREEN_DEPLOYMENT_TARGET"
METADATA_VERSION = "1.0"
GREEN_STATE = "SELECT pg_catalog.pg_is_in_recovery(), current_setting('transaction_read_only')"
# Green endpoint names are the blue ones with "-green-<random>" after the first part.
_GREEN_SUFFIX = r"-green-[a-z0-9]+(?=\.)"  # compiled on use (re's cache)


class Phase(enum.IntEnum):
    """Where a deployment is; higher is further along the switchover."""

    NOT_CREATED = 0
    CREATED = 1
    PREPARATION = 2
    IN_PROGRESS = 3
    POST = 4
    COMPLETED = 5


_STATUS_PHASES = {
    "AVAILABLE": Phase.CREATED,
    "SWITCHOVER_INITIATED": Phase.PREPARATION,
    "SWITCHOVER_IN_PROGRESS": Phase.IN_PROGRESS,
    "SWITCHOVER_IN_POST_PROCESSING": Phase.POST,
    "SWITCHOVER_COMPLETED": Phase.COMPLETED,
}


class Member:
    """One endpoint of a deployment, as a metadata row names it.

    A plain slotted class (as `_tls.TLSSetting` says why), never changed once made.
    """

    __slots__ = ("endpoint", "green", "phase", "port")

    def __init__(self, endpoint: str, port: int, green: bool, phase: Phase) -> None:
        self.endpoint = endpoint
        self.port = port
        self.green = green
        self.phase = phase


class Deployment:
    """What one poll of the metadata said: the phase and the endpoints (never changed)."""

    __slots__ = ("members", "phase")

    def __init__(self, phase: Phase, members: tuple[Member, ...] = ()) -> None:
        self.phase = phase
        self.members = members

    def green_for(self, blue_endpoint: str) -> Member | None:
        """Return the green member that takes `blue_endpoint`'s name at the switch."""
        wanted = blue_endpoint.lower().rstrip(".")
        for member in self.members:
            if member.green and blue_name_of(member.endpoint) == wanted:
                return member
        return None


NO_DEPLOYMENT = Deployment(Phase.NOT_CREATED)


def blue_name_of(green_endpoint: str) -> str:
    """Return the blue name a green endpoint takes at the switch (``app-green-x1.c..`` ->
    ``app.c..``)."""
    return re.sub(_GREEN_SUFFIX, "", green_endpoint.lower().rstrip("."), count=1)


def parse_rows(rows: Iterable[Mapping[str, Any] | tuple[Any, ...]]) -> Deployment:
    """Read metadata rows (``version, endpoint, port, role, status``) into a `Deployment`.

    Rows of another version or with an unknown role or status are skipped; no usable row
    means no deployment.
    """
    members: list[Member] = []
    for row in rows:
        if isinstance(row, Mapping):
            version, endpoint, port, role, status = (
                row["version"],
                row["endpoint"],
                row["port"],
                row["role"],
                row["status"],
            )
        else:
            version, endpoint, port, role, status = tuple(row)[:5]
        phase = _STATUS_PHASES.get(str(status).upper())
        if (
            str(version) != METADATA_VERSION
            or phase is None
            or role
            not in (
                SOURCE_ROLE,
                TARGET_ROLE,
            )
        ):
            continue
        members.append(Member(str(endpoint), int(port), role == TARGET_ROLE, phase))
    if not members:
        return NO_DEPLOYMENT
    return Deployment(max(m.phase for m in members), tuple(members))


# -- the decision -----------------------------------------------------------------------------

PASS = "pass"
"""Connect as the plan says."""
HOLD = "hold"
"""Wait for the switch to end (or the hold's bound)."""
REROUTE = "reroute"
"""Dial green's address, signed for the green name, then the blue one."""


def decide(
    phase: Phase,
    *,
    completed: bool,
    held_since: float | None,
    now: float,
    hold: float,
    green_known: bool,
    dns_caught_up: bool,
) -> str:
    """Return what a new connect (or acquire) does now: `PASS`, `HOLD` or `REROUTE`.

    `completed`: completion was observed without the metadata. `held_since`: when the
    current switch began to hold traffic. `green_known`: green's address was learned.
    `dns_caught_up`: the blue name resolves to green's address.
    """
    done = completed or phase >= Phase.POST
    if done:
        return REROUTE if green_known and not dns_caught_up else PASS
    if phase == Phase.IN_PROGRESS and (held_since is None or now < held_since + hold):
        return HOLD
    return PASS


def poll_interval(phase: Phase, *, switching: bool) -> float:
    """Return seconds until the next poll: 60 without a deployment, 1 with one, 0.1 during
    a switchover."""
    if switching or phase in (Phase.PREPARATION, Phase.IN_PROGRESS, Phase.POST):
        return 0.1
    if phase == Phase.NOT_CREATED:
        return 60.0
    return 1.0


class Tracker:
    """The deployment as polled so far: phase, rollbacks, the hold, completion observed.

    Pure: `update` and `observe` take the time; the follower acts on what they return.
    """

    __slots__ = (
        "completed",
        "deployment",
        "green_seen_read_only",
        "held_since",
        "hold",
        "rollbacks",
        "switches",
    )

    def __init__(self, hold: float = BLUE_GREEN_HOLD) -> None:
        self.hold = hold
        self.deployment = NO_DEPLOYMENT
        self.held_since: float | None = None
        self.completed = False
        self.green_seen_read_only = False
        self.rollbacks = 0
        self.switches = 0

    @property
    def phase(self) -> Phase:
        return self.deployment.phase

    def update(self, deployment: Deployment, now: float) -> list[str]:
        """Take a new poll; return the events it makes (``"rollback"``, ``"hold"``, ``"done"``)."""
        events: list[str] = []
        old = self.deployment.phase
        new = deployment.phase
        self.deployment = deployment
        if new < old and not (old == Phase.COMPLETED and new == Phase.NOT_CREATED):
            self.rollbacks += 1
            events.append("rollback")
            self.held_since, self.completed, self.green_seen_read_only = None, False, False
        if new == Phase.IN_PROGRESS and self.held_since is None and not self.completed:
            self.held_since = now
            events.append("hold")
        if new >= Phase.POST and old < Phase.POST and not self.completed:
            self.completed = True
            events.append("done")
        if new == Phase.NOT_CREATED:
            self.held_since, self.completed, self.green_seen_read_only = None, False, False
        return events

    def observe_green(self, *, writable: bool) -> bool:
        """Note green's state; return True when it shows the switch has happened (a green
        seen read-only in this deployment now takes writes)."""
        if not writable:
            self.green_seen_read_only = True
            return False
        return self._observed_done(self.green_seen_read_only)

    def observe_dns(self, *, blue_on_green: bool) -> bool:
        """Note where the blue name resolves; return True when that ends the switch."""
        return self._observed_done(blue_on_green)

    def _observed_done(self, signal: bool) -> bool:
        if not signal or self.completed or self.phase < Phase.IN_PROGRESS:
            return False
        self.completed = True
        return True

    def action(self, now: float, *, green_known: bool, dns_caught_up: bool) -> str:
        return decide(
            self.phase,
            completed=self.completed,
            held_since=self.held_since,
            now=now,
            hold=self.hold,
            green_known=green_known,
            dns_caught_up=dns_caught_up,
        )


# -- TLS to an address, verified for a name ----------------------------------------------------


class _PinnedNames(ssl.SSLObject):
    """TLS objects that verify the name pinned for the address dialled (see `pin_name`)."""

    names: dict[str, str] = {}  # noqa: RUF012 (each context gets its own subclass)

    @classmethod
    def _create(
        cls,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
        server_side: bool = False,
        server_hostname: str | None = None,
        session: ssl.SSLSession | None = None,
        context: ssl.SSLContext | None = None,
    ) -> ssl.SSLObject:
        if server_hostname is not None:
            server_hostname = cls.names.get(server_hostname, server_hostname)
        created: ssl.SSLObject = super()._create(  # type: ignore[misc]
            incoming, outgoing, server_side, server_hostname, session, context
        )
        return created


def pin_name(context: Any, address: str, name: str) -> None:
    """Make `context`'s TLS connections to the IP `address` verify (and send SNI for) `name`.

    asyncpg verifies the host it dials; green is dialled by address (DNS still gives the blue
    name blue's), so the certificate is checked for the name the token is signed for. Only
    for a verifying context and an IP address: a name dialled is verified as itself.
    """
    if not isinstance(context, ssl.SSLContext) or not context.check_hostname:
        return
    try:
        ipaddress.ip_address(address)
    except ValueError:
        return
    found = context.__dict__.get("sslobject_class")
    if isinstance(found, type) and issubclass(found, _PinnedNames):
        pinned: type[_PinnedNames] = found
    else:
        pinned = type("PinnedNames", (_PinnedNames,), {"names": {}})
        context.sslobject_class = pinned
    pinned.names[address] = name


# -- settings ---------------------------------------------------------------------------------

Resolver = Callable[[str, int], Awaitable["tuple[str, int] | None"]]


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class BlueGreenSettings:
    """How a pool follows a blue/green switchover (``create_pool(blue_green=...)``).

    `hold`: seconds at most that new connects and acquires wait while a switch is in
    progress (then `SwitchoverTimeoutError`, and traffic flows again). `resolver`: an async
    ``(name, port) -> (address, port) | None`` used to learn green's address and to see the
    blue name move (DNS by default; the test bed passes its own).
    """

    hold: float = BLUE_GREEN_HOLD
    resolver: Resolver | None = None

    def __post_init__(self) -> None:
        hold = self.hold
        if isinstance(hold, bool) or not isinstance(hold, (int, float)) or not 0 < hold < 3600:
            raise ConfigurationError(
                f"BlueGreenSettings(hold=...) must be seconds in (0, 3600) (default 30), "
                f"not {hold!r}"
            )


# -- the follower -----------------------------------------------------------------------------


async def resolve_with_dns(name: str, port: int) -> tuple[str, int] | None:
    """Return the first TCP address DNS gives for `name`, or None when it does not resolve."""
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(name, port, type=socket.SOCK_STREAM)
    except OSError:
        return None
    return (str(infos[0][4][0]), int(infos[0][4][1])) if infos else None


class _Gate:
    """Where held connects and acquires wait: released by the switch's end or the bound."""

    def __init__(self, clock: Clock, deadline: float) -> None:
        self._released = asyncio.get_running_loop().create_future()
        self._clock = clock
        self.deadline = deadline
        self.timed_out = False

    def release(self) -> None:
        if not self._released.done():
            self._released.set_result(None)

    async def wait(self) -> None:
        if self._released.done():
            return
        bound = asyncio.ensure_future(self._clock.sleep(self.deadline - self._clock.monotonic()))
        try:
            await asyncio.wait({self._released, bound}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            bound.cancel()
        if not self._released.done():
            self.timed_out = True
            raise SwitchoverTimeoutError(
                "a blue/green switchover held this connect or acquire for the hold's bound "
                "without the switch completing: retry, or raise "
                "BlueGreenSettings(hold=...) if your switchovers take longer"
            )


class Follower:
    """Follow a deployment for one pool and route its connects (`_bluegreen.BlueGreenMonitor`
    makes it once the metadata is found; its arguments are the monitor's)."""

    def __init__(
        self,
        pool_ref: weakref.ref[Any],
        *,
        connector: Any,
        query: str,
        tag: str,
        counters: Any,
        retire: Callable[[], int],
        hold_acquires: Callable[[Callable[[], Awaitable[None]] | None], None],
        hold: float,
        resolver: Resolver | None,
        clock: Clock,
        name: str,
    ) -> None:
        self._pool_ref = pool_ref
        self._connector = connector
        self._query = query
        self._tag = tag
        self.counters = counters  # the monitor's `_bluegreen.BlueGreenCounters`
        self._retire = retire
        self._hold_acquires = hold_acquires
        self._resolve = resolver or resolve_with_dns
        self._clock = clock
        self._name = name
        self.tracker = Tracker(hold=hold)
        self._gate: _Gate | None = None
        self._poll_con: Any = None
        self._con_on_green = False
        self.first_hold_at: float | None = None
        """When the pool first held traffic for a switch (the clock's monotonic time)."""
        self._green: tuple[Member, tuple[str, int]] | None = None
        self._dns_caught_up = False
        self._names: list[str] = []
        self._settled: str | None = None
        """The name green accepts, known to stay so for now (logins sign for it at once)."""
        self._finding = asyncio.Lock()
        self._routing = False

    def stop(self) -> None:
        """Release anything held; close the follower's connection."""
        self._set_gate(None)
        self._connector.route = None
        if self._poll_con is not None:
            self._poll_con.terminate()
            self._poll_con = None

    @property
    def base_target(self) -> SigningTarget:
        return self._connector.targets[0]  # type: ignore[no-any-return]

    # -- polling ------------------------------------------------------------------------------

    async def _read(self, con: Any) -> Deployment:
        return parse_rows(await con.fetch(self._query, self._tag))

    async def poll(self) -> None:
        """Read the metadata (and green's state during a switch) once; act on it."""
        con = await self._connection()
        deployment = await self._read(con)
        self.counters.polls += 1
        now = self._clock.monotonic()
        for event in self.tracker.update(deployment, now):
            self._on(event)
        self._apply()  # hold at once: what follows awaits
        if deployment.phase >= Phase.CREATED:
            await self._learn(deployment)
        if self.tracker.phase >= Phase.PREPARATION and self._green is not None:
            in_recovery, read_only = (
                await con.fetchrow(GREEN_STATE)
                if self._on_green
                else (
                    None,
                    None,
                )
            )
            if in_recovery is not None and self.tracker.observe_green(
                writable=not in_recovery and read_only == "off"
            ):
                self._on("done")
            blue = await self._resolve(self.base_target.signing_host, self.base_target.port)
            on_green = blue is not None and blue == self._green[1]
            if self.tracker.observe_dns(blue_on_green=on_green):
                self._on("done")
            if on_green and self.tracker.completed and not self._dns_caught_up:
                self._dns_caught_up = True
                logger.info("pool %s: the blue name now resolves to green", self._name)
        self._apply()

    async def _learn(self, deployment: Deployment) -> None:
        """Learn green's endpoint and address (before the switch renames them)."""
        target = self.base_target
        member = deployment.green_for(target.signing_host)
        if member is None or (
            self._green is not None and self._green[0].endpoint == member.endpoint
        ):
            return
        address = await self._resolve(member.endpoint, member.port)
        if address is None:
            return
        self._green = (member, address)
        self._names = [member.endpoint, target.signing_host]
        logger.info(
            "pool %s: blue/green deployment found; green for %s is %s at %s:%s",
            self._name,
            target.signing_host,
            member.endpoint,
            *address,
        )

    @property
    def _on_green(self) -> bool:
        return self._poll_con is not None and self._con_on_green

    async def _connection(self) -> Any:
        con = self._poll_con
        if con is not None and not con.is_closed():
            if self._green is None or self._on_green or self._dns_caught_up:
                return con
            con.terminate()  # move the poller to green once it is known
        self._poll_con = None
        if self._green is not None and not self._dns_caught_up:
            con, _ = await self._login_green(("any",))
        else:
            con, _ = await self._connector.open_planned({}, attrs="any")
        self._poll_con = con
        self._con_on_green = self._green is not None and not self._dns_caught_up
        return con

    # -- acting -------------------------------------------------------------------------------

    def _on(self, event: str) -> None:
        if event == "rollback":
            self.counters.rollbacks += 1
            logger.warning("pool %s: blue/green switchover rolled back", self._name)
        elif event == "hold":
            self.counters.switchovers += 1
            if self.first_hold_at is None:
                self.first_hold_at = self._clock.monotonic()
            logger.warning("pool %s: blue/green switchover in progress: holding", self._name)
        elif event == "done":
            logger.warning("pool %s: blue/green switchover completed", self._name)
            # Green takes the blue names at the switch: find which one it answers to now.
            self._settled = None
            self.counters.retired += self._retire()

    def _apply(self) -> None:
        """Install or remove the hold and the route as the tracker now decides."""
        now = self._clock.monotonic()
        action = self.tracker.action(
            now, green_known=self._green is not None, dns_caught_up=self._dns_caught_up
        )
        if action == HOLD:
            if self._gate is None:
                held_since = self.tracker.held_since or now
                self._set_gate(_Gate(self._clock, held_since + self.tracker.hold))
        elif self._gate is not None:
            if now >= self._gate.deadline:
                self.counters.holds_timed_out += 1
            self._set_gate(None)
        reroute = action == REROUTE
        if reroute != self._routing:
            self._routing = reroute
            logger.info(
                "pool %s: new connections %s",
                self._name,
                "go to green" if reroute else "follow the plan",
            )
        self._connector.route = self._route if (reroute or self._gate is not None) else None

    def _set_gate(self, gate: _Gate | None) -> None:
        old, self._gate = self._gate, gate
        if old is not None and old is not gate:
            old.release()
        self._hold_acquires(None if gate is None else self._wait)

    async def _wait(self) -> None:
        gate = self._gate
        if gate is None:
            return
        self.counters.held += 1
        try:
            await gate.wait()
        except SwitchoverTimeoutError:
            self.counters.hold_timeouts += 1
            if self._gate is gate:
                self.counters.holds_timed_out += 1
                self._set_gate(None)  # the bound: traffic flows again
                self._apply()
            raise

    def _route(self, extra: dict[str, Any]) -> Coroutine[Any, Any, tuple[Any, float]]:
        return self._routed(extra)

    async def _routed(self, extra: dict[str, Any]) -> tuple[Any, float]:
        await self._wait()
        if self._routing and self._green is not None:
            self.counters.rerouted += 1
            return await self._login_green((), extra)
        opened: tuple[Any, float] = await self._connector.open_planned(extra)
        return opened

    async def _login_green(
        self, attrs: tuple[str, ...], extra: Mapping[str, Any] | None = None
    ) -> tuple[Any, float]:
        """Log in at green's address, signed for the name green accepts.

        Once a name is settled, logins sign for it side by side. Until then (and again after
        the switch, or once a settled name is refused) one login at a time finds it, the
        green name first, then the blue one, while the other connects wait for that probe (at
        most their connect timeout, then they try on their own): a pool costs at most one
        refused login per switchover, however many connects race. A green name accepted after
        the switch does not settle: the rename to the blue name is still to come, and logins
        signed for it stay one at a time until green takes the blue name.
        """
        name = self._settled
        if name is not None:
            try:
                return await self._login_as(name, attrs, extra)
            except _REFUSED:
                self._unsettle(name)
        bound = self._connector.connect_timeout(extra or {})
        try:
            await asyncio.wait_for(self._finding.acquire(), bound)
        except asyncio.TimeoutError:
            return await self._find_name(attrs, extra)  # the probe takes too long: try alone
        try:
            if self._settled is not None:
                name = self._settled
                try:
                    return await self._login_as(name, attrs, extra)
                except _REFUSED:
                    self._unsettle(name)
            return await self._find_name(attrs, extra)
        finally:
            self._finding.release()

    def _unsettle(self, name: str) -> None:
        """Count a refused login for a settled name: green was renamed since; the other name
        is tried first from now on."""
        self.counters.fallback_refusals += 1
        if self._settled == name:
            self._settled = None
        if name in self._names and self._names[-1] != name:
            self._names.remove(name)
            self._names.append(name)

    async def _find_name(
        self, attrs: tuple[str, ...], extra: Mapping[str, Any] | None
    ) -> tuple[Any, float]:
        """Log in signed for each name in turn (the one that worked last first)."""
        assert self._green is not None
        last: BaseException | None = None
        for name in list(self._names):
            try:
                opened = await self._login_as(name, attrs, extra)
            except _REFUSED as exc:
                self.counters.fallback_refusals += 1
                last = exc
                continue
            if self._names[0] != name:
                self._names.remove(name)
                self._names.insert(0, name)
                logger.info("pool %s: green accepts tokens signed for %s", self._name, name)
            switched = self.tracker.completed or self.tracker.phase >= Phase.POST
            if not (switched and name == self._green[0].endpoint):
                self._settled = name
            return opened
        assert last is not None
        raise last

    async def _login_as(
        self, name: str, attrs: tuple[str, ...], extra: Mapping[str, Any] | None
    ) -> tuple[Any, float]:
        """Log in at green's address with a token signed for `name`."""
        assert self._green is not None
        member, (host, port) = self._green
        target = self.base_target.replace(
            host=host, port=port, signing_host=name, signing_port=member.port
        )
        pin_name(self._connector.plan.tls.context, host, name)
        opened: tuple[Any, float] = await self._connector.open_at(target, dict(extra or {}), *attrs)
        return opened


# A login green refuses for the name it was signed for (the token, or the certificate).
_REFUSED = (InvalidAuthorizationSpecificationError, ssl.SSLCertVerificationError)


async def run(follower_ref: weakref.ref[Follower]) -> None:
    """Poll at the phase's cadence until the pool goes away."""
    follower = follower_ref()
    if follower is None:
        return
    clock = follower._clock
    name = follower._name
    del follower
    failures = 0
    while True:
        follower = follower_ref()
        pool = None if follower is None else follower._pool_ref()
        if follower is None or pool is None or pool.is_closing():
            return
        del pool
        try:
            await follower.poll()
            failures = 0
        except (OSError, asyncio.TimeoutError, PostgresError, ConnectionError) as exc:
            failures += 1
            if follower._poll_con is not None:
                follower._poll_con.terminate()
                follower._poll_con = None
            follower._apply()  # the hold's bound still applies while polls fail
            if failures == 1:
                logger.info("pool %s: blue/green poll failed: %r", name, exc)
        except Exception:
            logger.exception("pool %s: blue/green poll failed", name)
            failures += 1
        wait = poll_interval(follower.tracker.phase, switching=follower._gate is not None)
        if failures:
            wait = min(wait, 0.1 if follower.tracker.phase >= Phase.PREPARATION else wait)
        del follower
        await clock.sleep(wait)
