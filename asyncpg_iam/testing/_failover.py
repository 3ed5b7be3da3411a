"""Rehearse an Aurora writer failover on this machine: two PostgreSQL servers and a DNS name.

Aurora fails over by promoting a replica and moving the cluster endpoint's DNS name to it; for
up to the DNS TTL, clients that resolve the name still reach the old writer. This module plays
that with real servers:

- `ClusterEndpoint` stands for the cluster (writer) endpoint's DNS name: a TCP forwarder on
  loopback that sends each new connection to its current backend. `switch()` points it at
  another backend after a lag, during which new connections still go to the old one.
  Connections already relayed are left alone: when their server stops they die as they would.
- `ReaderEndpoint` stands for the reader endpoint: it spreads new connections round-robin over
  the backends it knows; `add_backend()` plays a replica added to the cluster.
- `FailoverCluster` puts it together: a primary and a streaming standby (`pg_basebackup -R`,
  synchronous, so every acknowledged commit survives a failover), each behind its own
  `RDSIAMEmulator` that verifies tokens signed for the cluster endpoint's name and port, and a
  `ClusterEndpoint` in front. `failover()` stops the primary (``immediate``, as a crash),
  promotes the standby (``pg_ctl promote``) and switches the endpoint after the lag.

TLS is end to end: the forwarders relay bytes, the emulators (one CA for both) terminate TLS.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import ssl
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any, Literal, Protocol

from .._auth import IAMAuth
from .._errors import ConfigurationError
from ._admin import (
    emulator_for,
    set_synchronous_standbys,
    start_server,
    stop_servers,
    wait_synchronous,
)
from ._emulator import RDSIAMEmulator
from ._postgres import PostgresCluster
from ._service import AsyncService
from ._streams import StreamListener, relay

__all__ = [
    "DEFAULT_CLUSTER_ENDPOINT",
    "DEFAULT_READER_ENDPOINT",
    "ClusterEndpoint",
    "FailoverCluster",
    "FailoverTimeline",
    "ReaderEndpoint",
]

logger = logging.getLogger("asyncpg_iam.testing.failover")

DEFAULT_CLUSTER_ENDPOINT = "mydb.cluster-abcdefghijkl.us-east-1.rds.amazonaws.com"
DEFAULT_READER_ENDPOINT = "mydb.cluster-ro-abcdefghijkl.us-east-1.rds.amazonaws.com"


class HasAddress(Protocol):
    """Anything a forwarder can send connections to: an emulator, a cluster, a server."""

    @property
    def host(self) -> str: ...

    @property
    def port(self) -> int: ...


Backend = tuple[str, int] | HasAddress


def _address(backend: Backend) -> tuple[str, int]:
    if isinstance(backend, tuple):
        return str(backend[0]), int(backend[1])
    return backend.host, backend.port


class _Forwarder(AsyncService):
    """A TCP relay on loopback that picks a backend for each new connection."""

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self._listener = StreamListener(self._handle, host=host, port=port, name="endpoint")
        self._writers: set[asyncio.StreamWriter] = set()
        self._by_backend: Counter[tuple[str, int]] = Counter()
        self._refused = 0
        self._flowing = asyncio.Event()
        self._flowing.set()

    def _choose(self) -> tuple[str, int]:
        raise NotImplementedError

    async def start(self) -> None:
        """Start listening."""
        await self._listener.start()

    async def stop(self) -> None:
        """Stop listening and cut every relayed connection."""
        await self._listener.stop(cut=self._cut)

    def silence(self) -> None:
        """Go silent, as a hung server does: forward nothing either way, keep every socket
        open (the kernel still acknowledges), accept new connections and hold them."""
        self._flowing.clear()
        logger.info("%r is silent", self)

    def resume(self) -> None:
        """End `silence()`: relay what waited, and connect the held connections."""
        self._flowing.set()
        logger.info("%r forwards again", self)

    @property
    def silent(self) -> bool:
        """Whether it is silent (see `silence()`)."""
        return not self._flowing.is_set()

    def _cut(self) -> None:
        for writer in list(self._writers):
            writer.transport.abort()

    @property
    def host(self) -> str:
        """The loopback address it listens on (what the DNS name resolves to)."""
        return self._listener.host

    @property
    def port(self) -> int:
        """The port it listens on (known once started)."""
        return self._listener.port

    @property
    def connections_by_backend(self) -> dict[tuple[str, int], int]:
        """New connections sent to each backend since start."""
        return dict(self._by_backend)

    @property
    def open_connections(self) -> int:
        """Client connections being relayed now."""
        return self._listener.active

    @property
    def refused(self) -> int:
        """New connections whose backend did not answer (closed at once)."""
        return self._refused

    def _listening(self) -> str:
        port = self._listener.bound_port
        return f"{self.host}:{port}" if port else "not started"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        backend_writer: asyncio.StreamWriter | None = None
        try:
            await self._flowing.wait()  # silent: accepted, held
            target = self._choose()
            self._by_backend[target] += 1
            try:
                backend_reader, backend_writer = await asyncio.open_connection(*target)
            except OSError:
                self._refused += 1
                return
            self._writers.add(backend_writer)
            await relay(reader, writer, backend_reader, backend_writer, flowing=self._flowing)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            for each in (writer, backend_writer):
                if each is not None:
                    self._writers.discard(each)
                    each.close()


class ClusterEndpoint(_Forwarder):
    """A cluster (writer) endpoint: every new connection goes to the current backend.

    `switch()` moves it to another backend after `lag` seconds (the DNS TTL and client caches
    of a real endpoint), during which new connections still reach the old one. Start it with
    `await start()` or ``async with``.
    """

    def __init__(
        self, backend: Backend, *, lag: float = 0.0, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        if lag < 0:
            raise ConfigurationError(f"lag must be seconds >= 0, not {lag!r}")
        super().__init__(host=host, port=port)
        self._target = _address(backend)
        self.lag = lag
        """The default delay of `switch()`, in seconds."""

    @property
    def target(self) -> tuple[str, int]:
        """Where new connections go now."""
        return self._target

    def _choose(self) -> tuple[str, int]:
        return self._target

    async def switch(self, backend: Backend, *, lag: float | None = None) -> None:
        """Send new connections to `backend` once `lag` seconds (default `self.lag`) passed."""
        delay = self.lag if lag is None else lag
        if delay > 0:
            await asyncio.sleep(delay)
        self._target = _address(backend)
        logger.info(
            "cluster endpoint %s:%s now points at %s:%s", self.host, self.port, *self._target
        )

    def __repr__(self) -> str:
        listening = self._listening()
        return f"ClusterEndpoint(listening={listening}, target={self._target[0]}:{self._target[1]})"


class ReaderEndpoint(_Forwarder):
    """A reader endpoint: new connections are spread round-robin over the known backends.

    Connections already open stay where they are, as with Aurora's reader endpoint; only new
    ones reach a backend added with `add_backend()`.
    """

    def __init__(
        self, backends: Iterable[Backend], *, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        super().__init__(host=host, port=port)
        self._backends = [_address(backend) for backend in backends]
        if not self._backends:
            raise ConfigurationError("a reader endpoint needs at least one backend")
        self._next = itertools.count()

    @property
    def backends(self) -> list[tuple[str, int]]:
        """The backends new connections are spread over."""
        return list(self._backends)

    def add_backend(self, backend: Backend) -> None:
        """Spread new connections over `backend` too (a replica added to the cluster)."""
        self._backends.append(_address(backend))

    def remove_backend(self, backend: Backend) -> None:
        """Send no more new connections to `backend`."""
        self._backends.remove(_address(backend))

    def _choose(self) -> tuple[str, int]:
        return self._backends[next(self._next) % len(self._backends)]

    def __repr__(self) -> str:
        listening = self._listening()
        return f"ReaderEndpoint(listening={listening}, backends={len(self._backends)})"


@dataclasses.dataclass(frozen=True, slots=True)
class FailoverTimeline:
    """When each step of a `FailoverCluster.failover()` happened, in event-loop time."""

    started_at: float
    """Just before the primary was stopped."""
    stopped_at: float
    """The old primary is down: every connection to it is cut."""
    promoted_at: float
    """The standby accepts writes."""
    switched_at: float
    """The cluster endpoint sends new connections to the new primary."""
    old_writer: str
    """What became of the old primary: ``"down"`` or ``"read_only"``."""


class FailoverCluster(AsyncService):
    """A primary and a streaming standby behind IAM emulators and one cluster endpoint.

    Both emulators verify tokens signed for `endpoint`:`signing_port` in `region` (from the
    endpoint name by default) and share one CA, so a pool that dials `writer` (the
    `ClusterEndpoint`) and signs for the endpoint name logs in wherever the name points. Users
    in `iam_users` (the servers' superuser by default) may log in; register the keys that sign
    with `register_key()` (or ``credential_server.add_emulator(cluster)``).

    Use ``async with FailoverCluster() as cluster`` (needs the PostgreSQL server binaries);
    `pool_kwargs()` gives `create_pool` arguments; `failover()` plays one failover. Failing
    back is not supported: the old primary is not rewound into a standby.
    """

    def __init__(
        self,
        *,
        endpoint: str = DEFAULT_CLUSTER_ENDPOINT,
        signing_port: int = 5432,
        region: str | None = None,
        lag: float = 5.0,
        iam_users: Iterable[str] = (),
        settings: dict[str, str] | None = None,
    ) -> None:
        if lag < 0:
            raise ConfigurationError(f"lag must be seconds >= 0, not {lag!r}")
        self._endpoint = endpoint
        self._signing_port = signing_port
        self._region = region
        self._lag = lag
        self._iam_users = list(iam_users)
        # Commits wait for the standby, so a commit the client saw survives the failover.
        self._settings = {"synchronous_commit": "on", **(settings or {})}
        self._servers: list[PostgresCluster] = []
        self._emulators: list[RDSIAMEmulator] = []
        self._writer: ClusterEndpoint | None = None
        self._keys: list[tuple[str, str, str | None]] = []
        self._failed_over = False
        self._ssl: ssl.SSLContext | None = None

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Start both servers (standby streaming synchronously), the emulators and the endpoint."""
        import trustme

        if self._servers:
            raise RuntimeError("the cluster is already started")
        try:
            primary = await start_server(self._servers, self._settings)
            standby = await start_server(self._servers, self._settings, standby_of=primary)
            await set_synchronous_standbys(primary, "*")
            await wait_synchronous(primary)
            ca = trustme.CA()
            users = self._iam_users or [primary.user]
            for server in (primary, standby):
                emulator = emulator_for(
                    server,
                    self._keys,
                    endpoint=self._endpoint,
                    endpoint_port=self._signing_port,
                    region=self._region,
                    ca=ca,
                    iam_users=users,
                )
                self._emulators.append(emulator)
                await emulator.start()
            self._ssl = self._emulators[0].client_ssl_context()
            self._writer = ClusterEndpoint(self._emulators[0], lag=self._lag)
            await self._writer.start()
        except BaseException:
            await self.stop()
            raise
        logger.info("failover cluster ready: %r", self)

    async def stop(self) -> None:
        """Stop the endpoint, the emulators and both servers, and remove their data."""
        if self._writer is not None:
            await self._writer.stop()
            self._writer = None
        await stop_servers(self._emulators, self._servers)

    def __repr__(self) -> str:
        if not self._emulators or self._writer is None:
            return f"FailoverCluster(endpoint={self._endpoint!r}, not started)"
        return (
            f"FailoverCluster(endpoint={self._endpoint!r}, writer={self._writer!r}, "
            f"primary={self._servers[0]!r}, standby={self._servers[1]!r})"
        )

    # -- where it is --------------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        """The cluster endpoint's name, which tokens are signed for."""
        return self._endpoint

    @property
    def signing_port(self) -> int:
        """The port tokens are signed for."""
        return self._signing_port

    @property
    def writer(self) -> ClusterEndpoint:
        """The cluster endpoint (what the DNS name resolves to)."""
        if self._writer is None:
            raise RuntimeError("the cluster is not started: await start() first")
        return self._writer

    @property
    def servers(self) -> Sequence[PostgresCluster]:
        """The two servers: the original primary, then the original standby."""
        return tuple(self._servers)

    @property
    def emulators(self) -> Sequence[RDSIAMEmulator]:
        """The emulators in front of `servers`, in the same order."""
        return tuple(self._emulators)

    @property
    def primary(self) -> PostgresCluster:
        """The server that takes writes now (the standby once `failover()` promoted it)."""
        return self._servers[1 if self._failed_over else 0]

    @property
    def user(self) -> str:
        """The servers' superuser (enabled for IAM unless `iam_users` was given)."""
        return self._servers[0].user

    @property
    def database(self) -> str:
        """The database to connect to."""
        return self._servers[0].database

    def client_ssl_context(self) -> ssl.SSLContext:
        """Return a client context that trusts both emulators' CA."""
        if self._ssl is None:
            raise RuntimeError("the cluster is not started: await start() first")
        return self._ssl

    def iam_auth(self, **overrides: Any) -> IAMAuth:
        """Return IAM settings that sign for the cluster endpoint's name and port."""
        signing: dict[str, Any] = {
            "signing_host": self._endpoint,
            "signing_port": self._signing_port,
        }
        if self._region is not None:
            signing["region"] = self._region
        return IAMAuth(**{**signing, **overrides})

    def pool_kwargs(
        self, *, user: str | None = None, database: str | None = None, **overrides: Any
    ) -> dict[str, Any]:
        """Return `asyncpg_iam.create_pool()` arguments that dial the cluster endpoint.

        `overrides` (any create_pool argument) replace or extend them.
        """
        return {
            "host": self.writer.host,
            "port": self.writer.port,
            "user": user or self.user,
            "database": database or self.database,
            "ssl": self.client_ssl_context(),
            "iam": self.iam_auth(),
            **overrides,
        }

    # -- keys ---------------------------------------------------------------------------------

    def register_key(
        self, access_key: str, secret_key: str, session_token: str | None = None, **kwargs: Any
    ) -> None:
        """Have both emulators accept tokens signed with this key (see `RDSIAMEmulator`)."""
        self._keys.append((access_key, secret_key, session_token))
        for emulator in self._emulators:
            emulator.register_key(access_key, secret_key, session_token, **kwargs)

    # -- the failover -------------------------------------------------------------------------

    async def failover(
        self,
        *,
        lag: float | None = None,
        old_writer: Literal["down", "read_only"] = "down",
    ) -> FailoverTimeline:
        """Stop the primary, promote the standby, and switch the endpoint `lag` s later.

        `lag` (default: the cluster's) counts from the promotion, as a DNS update does. With
        ``old_writer="read_only"`` the old primary comes back at once with
        ``default_transaction_read_only=on``, as an Aurora writer comes back as a reader: new
        connections during the lag then reach a read-only server instead of failing.
        """
        if self._failed_over:
            raise RuntimeError("this cluster has failed over already; start a new one")
        if old_writer not in ("down", "read_only"):
            raise ConfigurationError(
                f"old_writer must be 'down' or 'read_only', not {old_writer!r}"
            )
        loop = asyncio.get_running_loop()
        old, new = self._servers
        started = loop.time()
        logger.info("failover: stopping the primary %r", old)
        await asyncio.to_thread(old.stop_server, mode="immediate")
        stopped = loop.time()
        restart: asyncio.Future[None] | None = None
        if old_writer == "read_only":
            restart = asyncio.ensure_future(
                asyncio.to_thread(
                    old.start_server, settings={"default_transaction_read_only": "on"}
                )
            )
        try:
            await asyncio.to_thread(new.promote)
        finally:
            if restart is not None:
                await restart
        promoted = loop.time()
        self._failed_over = True
        logger.info("failover: promoted %r; switching the endpoint in %s s", new, lag)
        await self.writer.switch(self._emulators[1], lag=lag)
        return FailoverTimeline(
            started_at=started,
            stopped_at=stopped,
            promoted_at=promoted,
            switched_at=loop.time(),
            old_writer=old_writer,
        )
