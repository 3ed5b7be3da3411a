"""Silent-host detection: a server that stops answering without closing its connections.

A host that is lost without a FIN or RST (a network partition, an instance that froze, packets
dropped by a firewall) leaves every connection to it open: a query in flight waits for the
kernel's retransmission limit (minutes), an idle connection looks fine until it is handed out,
and asyncpg's ``command_timeout`` sends its cancel request into the same hole. Two mechanisms
bound that, each covering what the other cannot:

- **The kernel** (`socket_options`): TCP keepalive and ``TCP_USER_TIMEOUT`` on every connection's
  socket. Data or keepalives left unacknowledged for ``tcp_user_timeout`` seconds make the
  kernel drop the connection, idle or in use, at no cost to the client or the server. It cannot
  see a server that is hung while its kernel still acknowledges (a stopped process, a full
  disk, a proxy that accepts and holds).
- **A probe per host** (`HealthMonitor`): every ``interval`` seconds, for each host that has a
  connection in use, open a TCP connection and send a GSSENCRequest (8 bytes, no login, no IAM
  token). PostgreSQL answers ``G`` or ``N`` at once, before any authentication, even when every
  backend is busy; a hung server, or a black hole, does not. (An SSLRequest would do as well,
  but a server with TLS on logs "could not accept SSL connection: EOF detected" for each probe
  that hangs up after the ``S``; after a GSSENCRequest it logs nothing.) After ``count``
  probes in a row that get no answer within ``timeout``, the host is declared silent: the
  pool terminates its connections (queries in flight fail with asyncpg's
  `ConnectionDoesNotExistError`), a silent writer counts as a failover, and new logins to it
  wait until a probe is answered again. A host that a pool's connection received data from
  within the last half interval (the kernel's ``TCP_INFO``, on Linux) has answered already:
  it gets no probe, so a busy host costs its server no new connection (a process forked by
  PostgreSQL) a second per client.

Nothing runs on the acquire path: the monitor asks the pool, once a tick, which hosts have
connections in use. Hosts are keyed by the connection's peer address (the server actually
reached, also when a DNS name has since moved), with the dialled name kept for log lines.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import weakref
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from ._asyncpg_pool import connection_endpoints, received_within
from ._clock import SYSTEM_CLOCK, Clock, SystemClock
from ._errors import ConfigurationError
from ._options import count as check_count
from ._options import positive_seconds
from ._record import Record

__all__ = [
    "DEFAULT_HEALTH_CHECK",
    "HealthCheck",
    "HealthMonitor",
    "probe_host",
    "socket_options",
]

logger = logging.getLogger("asyncpg_iam.pool")

Address = tuple[str, int]
"""A (host, port) pair: an IP address and port, or a dialled name and port."""

# GSSENCRequest: answered at once, before authentication; hanging up after it logs nothing.
_GSSENC_REQUEST = struct.pack("!ii", 8, 80877104)
# A silent host that no connection is on any more is probed this long, then forgotten.
_FORGET_AFTER = 300.0


class HealthCheck(Record):
    """How a pool finds hosts that went silent (see the guide "Silent hosts").

    A host with connections in use is probed every `interval` seconds (a TCP connect and an
    8-byte GSSENCRequest, no login), unless a pool's connection on it received data within the
    last half interval; `count` probes in a row without an answer within `timeout` declare it
    silent, so detection takes at most about ``1.5 * interval + count * max(interval,
    timeout)`` seconds (4.5 s by default). `tcp_user_timeout` is the kernel's bound on
    unacknowledged data and keepalives on each connection's socket (None: leave the kernel's
    default, about 15 minutes); keepalives start after half of it idle.
    """

    _fields = ("interval", "timeout", "count", "tcp_user_timeout")
    __slots__ = _fields

    interval: float
    timeout: float
    count: int
    tcp_user_timeout: float | None

    def __init__(
        self,
        *,
        interval: float = 1.0,
        timeout: float = 1.0,
        count: int = 3,
        tcp_user_timeout: float | None = 10.0,
    ) -> None:
        self._assign(interval, timeout, count, tcp_user_timeout)
        positive_seconds("HealthCheck(interval=...)", self.interval)
        positive_seconds("HealthCheck(timeout=...)", self.timeout)
        check_count("HealthCheck(count=...)", self.count, minimum=1, maximum=1000)
        if self.tcp_user_timeout is not None:
            positive_seconds(
                "HealthCheck(tcp_user_timeout=...)",
                self.tcp_user_timeout,
                hint=", or None for the kernel's default",
            )
            if self.tcp_user_timeout < 2:
                raise ConfigurationError(
                    "HealthCheck(tcp_user_timeout=...) must be at least 2 s (or None, the "
                    f"kernel's default): a shorter one drops live connections, not "
                    f"{self.tcp_user_timeout!r}"
                )

    @property
    def detection_time(self) -> float:
        """The longest a silent host with connections in use goes unnoticed, in seconds."""
        # The half interval: data received just before the host went silent spares it one probe.
        return 1.5 * self.interval + self.count * max(self.interval, self.timeout)


#: The default silent-host detection of pools and engines.
DEFAULT_HEALTH_CHECK = HealthCheck()


def check_health_option(value: object) -> HealthCheck | None:
    """Return the pool's ``health_check`` option, or raise `ConfigurationError`."""
    if value is None or isinstance(value, HealthCheck):
        return value
    raise ConfigurationError(
        f"health_check must be a HealthCheck(...) or None (no silent-host detection), not {value!r}"
    )


# -- the probe ------------------------------------------------------------------------------


async def probe_host(host: str, port: int, timeout: float) -> str | None:
    """Ask the postmaster at `host`:`port` for GSS encryption; return None when it answered,
    else why not.

    No login and no token: the server answers before authentication, even when every backend
    is busy (``G`` or ``N``; any answer will do). The connection is dropped right after it.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except asyncio.TimeoutError:
        return f"no TCP connection within {timeout:g} s"
    except OSError as exc:
        return f"TCP connect failed ({exc.strerror or type(exc).__name__})"
    try:
        writer.write(_GSSENC_REQUEST)
        answer = await asyncio.wait_for(reader.read(1), max(deadline - loop.time(), 0.001))
    except asyncio.TimeoutError:
        return f"no answer to an encryption request within {timeout:g} s"
    except OSError as exc:
        return f"encryption request failed ({exc.strerror or type(exc).__name__})"
    finally:
        writer.transport.abort()  # no FIN handshake to wait for
    return None if answer else "closed without answering an encryption request"


# -- the kernel's part --------------------------------------------------------------------


def socket_options(settings: HealthCheck) -> tuple[tuple[int, int, int], ...]:
    """Return the (level, option, value) triples set on each connection's socket (those the
    platform has)."""
    user_timeout = settings.tcp_user_timeout
    if user_timeout is None:
        return ()
    options = [(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)]
    for name, value in (
        ("TCP_KEEPIDLE", max(1, int(user_timeout / 2))),
        ("TCP_KEEPINTVL", max(1, int(settings.interval))),
        ("TCP_USER_TIMEOUT", int(user_timeout * 1000)),
    ):
        if hasattr(socket, name):
            options.append((socket.IPPROTO_TCP, getattr(socket, name), value))
    if not hasattr(socket, "TCP_USER_TIMEOUT") and hasattr(socket, "TCP_KEEPCNT"):
        # Without a user timeout the keepalive count decides when to give up (with one, the
        # user timeout does: one system call less on every connect).
        keepcnt = max(1, round(user_timeout / 2 / max(1, int(settings.interval))))
        options.append((socket.IPPROTO_TCP, socket.TCP_KEEPCNT, keepcnt))
    return tuple(options)


# -- the monitor ----------------------------------------------------------------------------


class HostState:
    """What the monitor knows about one host.

    `failures`: probes in a row that got no answer; `silent_since`: clock time it was
    declared silent, None while it answers; `answered`: set when a silent host answers again
    (logins to it wait for it); `cleared`: dialled names that led here and have answered since
    (DNS moved them), not held. A plain slotted class (as `_tls.TLSSetting` says why).
    """

    __slots__ = ("answered", "cleared", "failures", "label", "last_cause", "silent_since")

    def __init__(
        self,
        *,
        label: str,
        silent_since: float | None = None,
        answered: asyncio.Event | None = None,
    ) -> None:
        self.label = label
        self.failures = 0
        self.silent_since = silent_since
        self.last_cause = ""
        self.answered = answered
        self.cleared: set[Address] = set()


Probe = Callable[[str, int, float], Awaitable[str | None]]


class HealthMonitor:
    """Probe the hosts a pool's connections are on, and report the ones that went silent.

    `hosts_in_use()` returns the peer addresses of the connections in use now; `on_silent(
    host, label, cause)` is called once when a host is declared silent (the pool retires its
    connections); `on_answering(host, label)` when it answers again. `heard_from(host,
    seconds)` tells whether a connection on `host` received data within the last `seconds`: a
    host heard from within half an interval counts as answered without a probe, so a busy
    host costs its server no connection a second. By default it asks the kernel about the
    tracked connections (`received_within`), on the system clock only: the kernel counts real
    time, so on another clock every probe is sent. The monitor holds the pool only
    through those callables (the pool passes weak ones), runs on `clock`, and never on the
    acquire path. `probe` is `probe_host` unless a test passes its own.
    """

    def __init__(
        self,
        settings: HealthCheck,
        *,
        hosts_in_use: Callable[[], Iterable[Address]],
        on_silent: Callable[[Address, str, str], None],
        on_answering: Callable[[Address, str], None] | None = None,
        name: str = "",
        clock: Clock = SYSTEM_CLOCK,
        probe: Probe = probe_host,
        heard_from: Callable[[Address, float], bool] | None = None,
    ) -> None:
        self.settings = settings
        if heard_from is None and type(clock) is SystemClock:
            heard_from = self._heard_lately
        self._heard_from = heard_from
        self._socket_options = socket_options(settings)
        self._hosts_in_use = hosts_in_use
        self._on_silent = on_silent
        self._on_answering = on_answering
        self._name = name
        self._clock = clock
        self._probe = probe
        self._hosts: dict[Address, HostState] = {}
        # Dialled (host, port) of each peer, and peers reached by each dialled name.
        self._dialled: dict[Address, set[Address]] = {}
        self._labels: dict[Address, str] = {}
        self._connections: weakref.WeakKeyDictionary[Any, Address] = weakref.WeakKeyDictionary()
        self._task: asyncio.Task[None] | None = None
        self._probing: dict[Address, asyncio.Task[None]] = {}
        self._wanted: set[Address] = set()
        self.probes = 0
        """Probes sent (each one TCP connection, no login)."""
        self.probes_skipped = 0
        """Probes not sent: the host was heard from on a connection within half an interval."""
        self.silent_events = 0
        """Hosts declared silent."""
        self.sockets_tuned = 0
        """Connections whose socket got keepalive and ``TCP_USER_TIMEOUT``."""

    # -- connections ----------------------------------------------------------------------

    def track(self, con: Any) -> None:
        """Note the host a connection just opened is on, and tune its socket."""
        dialled, peer, tuned = connection_endpoints(con, self._socket_options)
        if peer is None:
            return  # a Unix socket: nothing to probe
        if tuned:
            self.sockets_tuned += 1
        self._connections[con] = peer
        if peer not in self._labels:
            self._labels[peer] = _label(dialled, peer)
        if dialled is not None:
            peers = self._dialled.get(dialled)
            if peers is None:  # not `setdefault`: no set made on every connect
                peers = self._dialled[dialled] = set()
            peers.add(peer)
        task = self._task
        if task is None or task.done():  # `start`, inline: this runs on every connect
            self.start()

    def address_of(self, con: Any) -> Address | None:
        """Return the peer address a tracked connection is on."""
        try:
            return self._connections.get(con)
        except TypeError:  # not weakly referenceable: never tracked
            return None

    def connections_on(self, host: Address) -> list[Any]:
        """Return the open tracked connections on `host`."""
        return [
            con
            for con, peer in list(self._connections.items())
            if peer == host and not con.is_closed()
        ]

    def _heard_lately(self, host: Address, seconds: float) -> bool:
        """Whether a tracked connection on `host` received data within the last `seconds`."""
        return any(received_within(con, seconds) for con in self.connections_on(host))

    def is_silent(self, host: Address) -> bool:
        """Tell whether `host` (a peer address) is silent now."""
        state = self._hosts.get(host)
        return state is not None and state.silent_since is not None

    @property
    def silent_hosts(self) -> list[str]:
        """The labels of the hosts silent now."""
        return [s.label for s in self._hosts.values() if s.silent_since is not None]

    # -- logins ---------------------------------------------------------------------------

    def login_gate(self, host: str, port: int) -> Awaitable[None] | None:
        """Return what a login to `host`:`port` must wait for first, or None (nearly always).

        While a host reached through that name is silent, a login waits until a probe is
        answered (the server is back, or the name now leads elsewhere), so it neither hangs on
        the silent host nor fails at once.
        """
        if not self._hosts:
            return None
        waiting = [
            state.answered
            for peer in self._dialled.get((host, port), ())
            if (state := self._hosts.get(peer)) is not None
            and state.silent_since is not None
            and state.answered is not None
            and (host, port) not in state.cleared
        ]
        if not waiting:
            return None
        name = (host, port)
        if name not in self._hosts:  # probe the name itself too: DNS may have moved it
            self._hosts[name] = HostState(
                label=f"{host}:{port}",
                silent_since=self._clock.monotonic(),
                answered=asyncio.Event(),
            )
        waiting.append(self._hosts[name].answered)  # type: ignore[arg-type]
        return _first_set([event for event in waiting if event is not None])

    # -- probing --------------------------------------------------------------------------

    def start(self) -> None:
        """Start probing (on the running loop), if not already."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name=f"asyncpg_iam health {self._name}"
            )

    def stop(self) -> None:
        """Stop probing; wake logins that wait for a silent host (they fail)."""
        for task in [self._task, *self._probing.values()]:
            if task is not None:
                task.cancel()
        self._task = None
        self._probing.clear()
        for state in self._hosts.values():
            if state.answered is not None:
                state.answered.set()

    async def _run(self) -> None:
        # The first tick waits one interval: the monitor starts on a connect, which has just
        # shown that the host answers (a probe at once would only slow the first query).
        while True:
            await self._clock.sleep(self.settings.interval)
            self.tick()

    def tick(self) -> None:
        """Find the hosts to probe (in use, or silent) and start a watcher for each new one."""
        try:
            wanted = set(self._hosts_in_use())
        except Exception:  # the pool is gone or closing
            logger.debug("pool %s: health check stopped", self._name, exc_info=True)
            self.stop()
            return
        now = self._clock.monotonic()
        for host, state in list(self._hosts.items()):
            if state.silent_since is None:
                continue
            if host not in wanted and now - state.silent_since > _FORGET_AFTER:
                # Silent for long and no connection on it: stop probing (logins proceed).
                if state.answered is not None:
                    state.answered.set()
                del self._hosts[host]
                continue
            wanted.add(host)
        self._wanted = wanted
        for host in wanted:
            if host not in self._probing:
                self._probing[host] = asyncio.get_running_loop().create_task(self._watch(host))

    async def _watch(self, host: Address) -> None:
        """Probe `host` every interval (a probe that timed out is followed at once by the
        next) for as long as it is wanted."""
        try:
            while host in self._wanted or host in self._hosts:
                began = self._clock.monotonic()
                heard = self._heard_from
                if heard is not None and heard(host, self.settings.interval / 2):
                    # Data came from it just now: as good an answer as a probe's.
                    self.probes_skipped += 1
                    cause = None
                else:
                    self.probes += 1
                    cause = await self._probe(host[0], host[1], self.settings.timeout)
                self.record(host, cause)
                if host not in self._wanted and host not in self._hosts:
                    return
                await self._clock.sleep(began + self.settings.interval - self._clock.monotonic())
        finally:
            self._probing.pop(host, None)

    def record(self, host: Address, cause: str | None) -> None:
        """Count a probe of `host` that was answered (`cause` None) or not (why not)."""
        state = self._hosts.get(host)
        if cause is None:
            if state is None:
                return
            if state.silent_since is not None:
                self._answering(host, state)
            del self._hosts[host]
            return
        if state is None:
            state = self._hosts[host] = HostState(label=self._labels.get(host, _label(None, host)))
        state.failures += 1
        state.last_cause = cause
        if state.silent_since is None and state.failures >= self.settings.count:
            state.silent_since = self._clock.monotonic()
            state.answered = asyncio.Event()
            self.silent_events += 1
            self._on_silent(
                host,
                state.label,
                f"{state.failures} probes in a row unanswered, the last: {cause}",
            )

    def _answering(self, host: Address, state: HostState) -> None:
        assert state.silent_since is not None
        silent_for = self._clock.monotonic() - state.silent_since
        if state.answered is not None:
            state.answered.set()
        if host in self._labels:  # a connection's host (not only a name a login dials)
            logger.info(
                "pool %s: host %s answers again after %.1f s silent",
                self._name,
                state.label,
                silent_for,
            )
        # A dialled name that answers while the peer it led to is silent leads elsewhere now
        # (DNS moved it): logins to it go ahead.
        for peer in self._dialled.get(host, ()):
            peer_state = self._hosts.get(peer)
            if peer_state is not None and peer_state.answered is not None:
                peer_state.cleared.add(host)
        if self._on_answering is not None and host in self._labels:
            self._on_answering(host, state.label)


def _label(dialled: Address | None, peer: Address) -> str:
    where = f"{peer[0]}:{peer[1]}"
    if dialled is None or (dialled[0], dialled[1]) == peer:
        return where
    return f"{dialled[0]}:{dialled[1]} ({where})"


async def _first_set(events: list[asyncio.Event]) -> None:
    """Wait until any of `events` is set."""
    waits = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*waits, return_exceptions=True)
