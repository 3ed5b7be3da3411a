"""Rehearse an Aurora cluster as a topology: instances with names of their own.

Aurora gives every instance an endpoint name (``<instance-id>.<the cluster's DNS suffix>``) and
answers ``aurora_replica_status()`` with one row per instance. `AuroraCluster` plays that with
real servers: a primary and streaming standbys (`pg_basebackup -R`), each behind its own
`RDSIAMEmulator` that accepts tokens signed for its instance name, the cluster endpoint's and
the reader endpoint's; a `ClusterEndpoint` and a `ReaderEndpoint` (with DNS lag) in front.

Each server has the SQL functions ``aurora_replica_status()`` (server_id, session_id --
``'MASTER_SESSION_ID'`` for the writer --, cpu, replica_lag_in_msec, last_update_timestamp)
and ``aurora_db_instance_identifier()``, in ``pg_catalog`` as on Aurora (clients that
schema-qualify them, as AWS's wrappers do, find them), backed by the table
``aurora_testbed.instances`` that the test bed updates on `failover()`, `add_replica()` and
`remove_replica()`. The table lives on the primary and replicates to the standbys, as
Aurora's shared storage shows every instance the same topology. A row's
``last_update_timestamp`` is the query time unless `set_replica_status()` pins one (to play a
stale row).

No DNS is asked: `resolve(name, port)` maps an instance name to its emulator on loopback, and
`pool_kwargs()` passes it to the pool as ``AuroraTopology(resolve=...)``, the pool's documented
seam for custom DNS and tunnels.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import ssl
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

from .._auth import IAMAuth
from .._errors import ConfigurationError
from .._topology import AuroraTopology, instance_host_pattern
from ._admin import admin, emulator_for, set_synchronous_standbys
from ._emulator import RDSIAMEmulator
from ._failover import (
    DEFAULT_CLUSTER_ENDPOINT,
    ClusterEndpoint,
    FailoverTimeline,
    ReaderEndpoint,
)
from ._postgres import PostgresCluster
from ._service import AsyncService

__all__ = ["AuroraCluster", "AuroraInstance"]


def _address(emulator: RDSIAMEmulator) -> tuple[str, int]:
    return emulator.host, emulator.port


logger = logging.getLogger("asyncpg_iam.testing.aurora")

_SCHEMA = """
CREATE SCHEMA aurora_testbed;
CREATE TABLE aurora_testbed.instances (
    server_id text PRIMARY KEY,
    is_writer boolean NOT NULL,
    cpu double precision NOT NULL DEFAULT 1.0,
    replica_lag_in_msec double precision,
    last_update_timestamp timestamptz
);
SET allow_system_table_mods = on;
CREATE FUNCTION pg_catalog.aurora_replica_status() RETURNS TABLE (
    server_id text,
    session_id text,
    cpu double precision,
    replica_lag_in_msec double precision,
    last_update_timestamp timestamptz
) LANGUAGE sql STABLE AS $$
    SELECT i.server_id,
           CASE WHEN i.is_writer THEN 'MASTER_SESSION_ID' ELSE md5(i.server_id) END,
           i.cpu,
           CASE WHEN i.is_writer THEN NULL ELSE coalesce(i.replica_lag_in_msec, 0) END,
           coalesce(i.last_update_timestamp, now())
    FROM aurora_testbed.instances i ORDER BY i.server_id
$$;
CREATE FUNCTION pg_catalog.aurora_db_instance_identifier() RETURNS text LANGUAGE sql STABLE AS $$
    SELECT current_setting('aurora_testbed.instance_id', true)
$$;
RESET allow_system_table_mods;
GRANT USAGE ON SCHEMA aurora_testbed TO PUBLIC;
GRANT SELECT ON aurora_testbed.instances TO PUBLIC;
"""


@dataclasses.dataclass(slots=True)
class AuroraInstance:
    """One instance of an `AuroraCluster`: its identifier, endpoint name, server and emulator."""

    id: str
    name: str
    """The instance endpoint's name (``<id>.<the cluster's DNS suffix>``)."""
    server: PostgresCluster
    emulator: RDSIAMEmulator
    role: Literal["writer", "reader", "down"]


class AuroraCluster(AsyncService):
    """An Aurora-like cluster: a writer and `replicas` readers with endpoint names of their own.

    `endpoint` is the cluster (writer) endpoint's name; the reader endpoint's is derived from
    it (``.cluster-`` becomes ``.cluster-ro-``), and so is each instance's
    (``instance-1.<suffix>``...). `lag` is the cluster endpoint's DNS lag in a `failover()`;
    `reader_lag` the reader endpoint's, for replicas added, removed or changing role.
    Register the keys that sign with `register_key()` (or
    ``credential_server.add_emulator(cluster)``). Use ``async with AuroraCluster() as cluster``.
    """

    def __init__(
        self,
        *,
        replicas: int = 1,
        endpoint: str = DEFAULT_CLUSTER_ENDPOINT,
        signing_port: int = 5432,
        region: str | None = None,
        lag: float = 5.0,
        reader_lag: float = 0.0,
        iam_users: Iterable[str] = (),
        settings: Mapping[str, str] | None = None,
    ) -> None:
        if lag < 0 or reader_lag < 0:
            raise ConfigurationError(f"lags must be seconds >= 0, not {lag!r}, {reader_lag!r}")
        if replicas < 0:
            raise ConfigurationError(f"replicas must be >= 0, not {replicas!r}")
        pattern = instance_host_pattern(endpoint)
        if pattern is None or ".cluster-ro-" in endpoint or ".cluster-custom-" in endpoint:
            raise ConfigurationError(
                f"endpoint must be an Aurora cluster endpoint name "
                f"(<name>.cluster-<id>.<region>.rds.amazonaws.com), not {endpoint!r}"
            )
        self._endpoint = endpoint
        self._reader_name = endpoint.replace(".cluster-", ".cluster-ro-", 1)
        self._pattern = pattern
        self._signing_port = signing_port
        self._region = region
        self._lag = lag
        self._reader_lag = reader_lag
        self._reader_changes: set[asyncio.Task[None]] = set()
        self._replicas = replicas
        self._iam_users = list(iam_users)
        # WAL is kept for replicas cloned in parallel or added later.
        self._settings = {
            "synchronous_commit": "on",
            "wal_keep_size": "'256MB'",
            **(settings or {}),
        }
        self._instances: dict[str, AuroraInstance] = {}
        self._numbers = 0
        self._keys: list[tuple[str, str, str | None]] = []
        self._ca: Any = None
        self._ssl: ssl.SSLContext | None = None
        self._writer: ClusterEndpoint | None = None
        self._reader: ReaderEndpoint | None = None
        self.promoted = asyncio.Event()
        """Set once a `failover()` has promoted its target and listed it as the writer (the
        cluster endpoint moves `lag` seconds later)."""

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the writer, the replicas (in parallel), their emulators and both endpoints."""
        import trustme

        if self._instances:
            raise RuntimeError("the cluster is already started")
        self._ca = trustme.CA()
        try:
            writer = await self._start_instance(None)
            await self._admin(writer, _SCHEMA)
            await self._set_row(writer.id, is_writer=True)
            await asyncio.gather(*(self._add(writer) for _ in range(self._replicas)))
            if self._replicas:
                # Commits wait for a replica, so a commit the client saw survives a failover.
                await self._synchronous(writer, "ANY 1 (*)")
            self._ssl = writer.emulator.client_ssl_context()
            self._writer = ClusterEndpoint(writer.emulator, lag=self._lag)
            await self._writer.start()
            readers = [i.emulator for i in self.readers] or [writer.emulator]
            self._reader = ReaderEndpoint(readers)
            await self._reader.start()
        except BaseException:
            await self.stop()
            raise
        logger.info("aurora cluster ready: %r", self)

    async def _start_instance(self, primary: AuroraInstance | None) -> AuroraInstance:
        self._numbers += 1
        instance_id = f"instance-{self._numbers}"
        name = self._pattern.replace("?", instance_id)
        settings = {**self._settings, "aurora_testbed.instance_id": f"'{instance_id}'"}
        server = PostgresCluster(
            settings=settings, standby_of=primary.server if primary is not None else None
        )
        await asyncio.to_thread(server.start)
        emulator = emulator_for(
            server,
            self._keys,
            endpoint=name,
            aliases=(self._endpoint, self._reader_name),
            endpoint_port=self._signing_port,
            region=self._region,
            ca=self._ca,
            iam_users=self._iam_users or [server.user],
        )
        instance = AuroraInstance(
            instance_id, name, server, emulator, "reader" if primary else "writer"
        )
        self._instances[instance_id] = instance
        await emulator.start()
        return instance

    async def _add(self, primary: AuroraInstance) -> AuroraInstance:
        instance = await self._start_instance(primary)
        await self._set_row(instance.id, is_writer=False)
        return instance

    async def stop(self) -> None:
        """Stop the endpoints, the emulators and every server, and remove their data."""
        for change in list(self._reader_changes):
            change.cancel()
        for endpoint in (self._writer, self._reader):
            if endpoint is not None:
                await endpoint.stop()
        self._writer = self._reader = None
        for instance in list(self._instances.values()):
            await instance.emulator.stop()
            await asyncio.to_thread(instance.server.stop)
        self._instances.clear()

    def __repr__(self) -> str:
        roles = ", ".join(f"{i.id}={i.role}" for i in self._instances.values())
        return f"AuroraCluster(endpoint={self._endpoint!r}, instances=[{roles}])"

    # -- where it is --------------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        """The cluster (writer) endpoint's name."""
        return self._endpoint

    @property
    def reader_endpoint(self) -> str:
        """The reader endpoint's name (``.cluster-ro-``)."""
        return self._reader_name

    @property
    def instances(self) -> Mapping[str, AuroraInstance]:
        """The instances by identifier (removed ones are gone)."""
        return dict(self._instances)

    @property
    def writer_instance(self) -> AuroraInstance:
        """The instance that takes writes now."""
        return next(i for i in self._instances.values() if i.role == "writer")

    @property
    def readers(self) -> list[AuroraInstance]:
        """The instances serving as readers now."""
        return [i for i in self._instances.values() if i.role == "reader"]

    @property
    def writer(self) -> ClusterEndpoint:
        """The cluster endpoint (where its DNS name points)."""
        if self._writer is None:
            raise RuntimeError("the cluster is not started: await start() first")
        return self._writer

    @property
    def reader(self) -> ReaderEndpoint:
        """The reader endpoint."""
        if self._reader is None:
            raise RuntimeError("the cluster is not started: await start() first")
        return self._reader

    @property
    def emulators(self) -> list[RDSIAMEmulator]:
        """Every instance's emulator."""
        return [i.emulator for i in self._instances.values()]

    @property
    def user(self) -> str:
        """The servers' superuser."""
        return self.writer_instance.server.user

    @property
    def database(self) -> str:
        """The database to connect to."""
        return self.writer_instance.server.database

    def resolve(self, name: str, port: int) -> tuple[str, int]:
        """Return where an instance endpoint name is reached (its emulator on loopback)."""
        for instance in self._instances.values():
            if instance.name == name.lower().rstrip("."):
                return instance.emulator.host, instance.emulator.port
        raise OSError(f"no instance endpoint named {name!r} in {self._endpoint}")

    def logins(self) -> int:
        """Login attempts every instance's emulator has seen (accepted or not)."""
        return sum(len(i.emulator.records) for i in self._instances.values())

    def client_ssl_context(self) -> ssl.SSLContext:
        """Return a client context that trusts every emulator's CA."""
        if self._ssl is None:
            raise RuntimeError("the cluster is not started: await start() first")
        return self._ssl

    def pool_kwargs(
        self,
        *,
        reader: bool = False,
        topology: bool | AuroraTopology | None = None,
        **overrides: Any,
    ) -> dict[str, Any]:
        """Return `create_pool()` arguments for the cluster (or, with `reader`, the reader)
        endpoint, with a topology that reaches the instances here (`resolve`).

        `topology` False keeps the pool on DNS; an `AuroraTopology` gets `resolve` added.
        """
        endpoint = self.reader if reader else self.writer
        signing = self._reader_name if reader else self._endpoint
        auth: dict[str, Any] = {"signing_host": signing, "signing_port": self._signing_port}
        if self._region is not None:
            auth["region"] = self._region
        if topology is None or topology is True:
            topology = AuroraTopology(resolve=self.resolve)
        elif isinstance(topology, AuroraTopology) and topology.resolve is None:
            topology = dataclasses.replace(topology, resolve=self.resolve)
        return {
            "host": endpoint.host,
            "port": endpoint.port,
            "user": self.user,
            "database": self.database,
            "ssl": self.client_ssl_context(),
            "iam": IAMAuth(**auth),
            "topology": topology,
            **overrides,
        }

    def register_key(
        self, access_key: str, secret_key: str, session_token: str | None = None, **kwargs: Any
    ) -> None:
        """Have every emulator (those added later too) accept tokens signed with this key."""
        self._keys.append((access_key, secret_key, session_token))
        for instance in self._instances.values():
            instance.emulator.register_key(access_key, secret_key, session_token, **kwargs)

    # -- the topology table -------------------------------------------------------------------

    async def _admin(self, instance: AuroraInstance, sql: str, *args: Any) -> Any:
        # local: an old writer back read-only still names standbys that never come.
        return await admin(instance.server, sql, *args, synchronous_commit="local")

    async def _synchronous(self, instance: AuroraInstance, names: str | None) -> None:
        await set_synchronous_standbys(instance.server, names)

    async def _set_row(self, instance_id: str, *, is_writer: bool) -> None:
        await self._admin(
            self.writer_instance,
            "INSERT INTO aurora_testbed.instances (server_id, is_writer) VALUES ($1, $2) "
            "ON CONFLICT (server_id) DO UPDATE SET is_writer = excluded.is_writer",
            instance_id,
            is_writer,
        )

    async def set_replica_status(
        self,
        instance_id: str,
        *,
        lag_msec: float | None = None,
        updated_seconds_ago: float | None = None,
        claims_writer: bool | None = None,
    ) -> None:
        """Change what ``aurora_replica_status()`` says of one instance: its lag, how long
        ago its row was updated (300 s and more: stale), whether it claims the writer."""
        sets, args = [], [instance_id]
        if lag_msec is not None:
            args.append(lag_msec)  # type: ignore[arg-type]
            sets.append(f"replica_lag_in_msec = ${len(args)}")
        if updated_seconds_ago is not None:
            args.append(updated_seconds_ago)  # type: ignore[arg-type]
            sets.append(f"last_update_timestamp = now() - make_interval(secs => ${len(args)})")
        if claims_writer is not None:
            args.append(claims_writer)  # type: ignore[arg-type]
            sets.append(f"is_writer = ${len(args)}")
        if sets:
            # The SET clauses are the fixed fragments above; the values are parameters.
            await self._admin(
                self.writer_instance,
                f"UPDATE aurora_testbed.instances SET {', '.join(sets)} "  # noqa: S608
                "WHERE server_id = $1 RETURNING server_id",
                *args,
            )

    # -- changes ------------------------------------------------------------------------------

    async def add_replica(self) -> AuroraInstance:
        """Add a streaming replica: listed in the topology and behind the reader endpoint."""
        instance = await self._add(self.writer_instance)
        self._reader_add(instance)
        logger.info("aurora cluster: added replica %s", instance.id)
        return instance

    async def remove_replica(self, instance_id: str) -> None:
        """Remove a replica: out of the topology and the reader endpoint, its server stopped
        (connections to it are cut)."""
        instance = self._instances[instance_id]
        if instance.role == "writer":
            raise ConfigurationError("the writer cannot be removed: fail over first")
        await self._admin(
            self.writer_instance,
            "DELETE FROM aurora_testbed.instances WHERE server_id = $1 RETURNING server_id",
            instance_id,
        )
        if not self.readers[1:]:
            await self._synchronous(self.writer_instance, None)
        self._reader_remove(instance)
        del self._instances[instance_id]
        await instance.emulator.stop()
        await asyncio.to_thread(instance.server.stop)
        logger.info("aurora cluster: removed replica %s", instance_id)

    async def restart(self, instance_id: str, *, read_only: bool = False) -> None:
        """Crash and restart one instance's server (connections to it are cut); with
        `read_only` it comes back refusing writes while the topology still lists its role
        (a lone writer back as a standby)."""
        instance = self._instances[instance_id]
        settings = {"default_transaction_read_only": "on"} if read_only else None
        await asyncio.to_thread(instance.server.stop_server, mode="immediate")
        await asyncio.to_thread(instance.server.start_server, settings=settings)

    async def failover(
        self,
        *,
        target: str | None = None,
        lag: float | None = None,
        old_writer: Literal["down", "read_only"] = "down",
    ) -> FailoverTimeline:
        """Stop the writer, promote `target` (default: the first reader), update the topology,
        and switch the cluster endpoint `lag` s (default: the cluster's) after the promotion.

        With ``old_writer="read_only"`` the old writer comes back at once, read-only, and is
        listed as a reader, as an Aurora writer comes back after a failover; ``"down"`` leaves
        it stopped and out of the topology. Other replicas follow the new writer.
        """
        loop = asyncio.get_running_loop()
        old = self.writer_instance
        readers = self.readers
        new = self._instances[target] if target is not None else (readers[0] if readers else None)
        if new is None or new.role != "reader":
            raise ConfigurationError("failover needs a reader to promote")
        started = loop.time()
        await asyncio.to_thread(old.server.stop_server, mode="immediate")
        stopped = loop.time()
        restart = None
        if old_writer == "read_only":
            restart = asyncio.ensure_future(
                asyncio.to_thread(
                    old.server.start_server, settings={"default_transaction_read_only": "on"}
                )
            )
        try:
            await asyncio.to_thread(new.server.promote)
        finally:
            if restart is not None:
                await restart
        promoted = loop.time()
        old.role, new.role = ("reader" if old_writer == "read_only" else "down"), "writer"
        await self._synchronous(new, None)
        await self._rewrite_topology(new)
        if old_writer == "read_only":
            await self._rewrite_topology(old)
        for other in self.readers:
            if other is not old:
                await self._follow(other, new)
        if old_writer == "read_only":
            self._reader_add(old)
        self._reader_remove(new)
        self.promoted.set()
        logger.info("aurora cluster: promoted %s; cluster endpoint moves in %s s", new.id, lag)
        await self.writer.switch(new.emulator, lag=lag)
        return FailoverTimeline(
            started_at=started,
            stopped_at=stopped,
            promoted_at=promoted,
            switched_at=loop.time(),
            old_writer=old_writer,
        )

    def _reader_add(self, instance: AuroraInstance) -> None:
        def add() -> None:
            if _address(instance.emulator) not in self.reader.backends:
                self.reader.add_backend(instance.emulator)

        self._reader_change(add)

    def _reader_remove(self, instance: AuroraInstance) -> None:
        def remove() -> None:
            backends = self.reader.backends
            if _address(instance.emulator) in backends and len(backends) > 1:
                self.reader.remove_backend(instance.emulator)

        self._reader_change(remove)

    def _reader_change(self, change: Callable[[], None]) -> None:
        """Apply a change of the reader endpoint's DNS now, or `reader_lag` s from now."""
        if self._reader_lag <= 0:
            change()
            return

        async def later() -> None:
            await asyncio.sleep(self._reader_lag)
            if self._reader is not None:
                change()

        task = asyncio.get_running_loop().create_task(later())
        self._reader_changes.add(task)
        task.add_done_callback(self._reader_changes.discard)

    async def _rewrite_topology(self, on: AuroraInstance) -> None:
        """Write the post-failover topology on `on`'s server."""
        rows = [(i.id, i.role == "writer") for i in self._instances.values() if i.role != "down"]
        await self._admin(on, "DELETE FROM aurora_testbed.instances")
        for instance_id, is_writer in rows:
            await self._admin(
                on,
                "INSERT INTO aurora_testbed.instances (server_id, is_writer) VALUES ($1, $2) "
                "RETURNING server_id",
                instance_id,
                is_writer,
            )

    async def _follow(self, replica: AuroraInstance, primary: AuroraInstance) -> None:
        """Point a standby at the new primary (it follows the new timeline)."""
        conninfo = (
            f"host={primary.server.host} port={primary.server.port} user={primary.server.user}"
        )
        await self._admin(replica, f"ALTER SYSTEM SET primary_conninfo = '{conninfo}'")
        await self._admin(replica, "SELECT pg_reload_conf()")
