"""Rehearse an RDS Blue/Green switchover on this machine: two servers, two emulators, DNS.

`BlueGreenDeployment` plays a deployment with real servers:

- **blue** is a PostgreSQL primary, **green** a synchronous streaming standby of it (green
  replicates from blue, as a deployment's green copy does; every commit acknowledged on blue is
  on green). Each sits behind its own `RDSIAMEmulator`, which verifies tokens signed for the
  name it answers to: blue for `blue_endpoint`, green for `green_endpoint`.
- **the metadata**: both servers get the function of the chosen `source` (Aurora's
  ``pg_catalog.get_blue_green_fast_switchover_metadata(text)`` or RDS's
  ``rds_tools.show_topology(text)``), answering from a table the test bed updates per phase;
  ``source=None`` plays an engine with neither.
- **DNS**: the blue name is a `ClusterEndpoint` (a forwarder on loopback) that pools dial;
  `resolve(name, port)` answers where each name points now (the resolver seam a pool's
  ``BlueGreenSettings(resolver=...)`` takes). After a switch the blue name keeps pointing at
  blue for `dns_lag` seconds.
- **the switch** (`switchover(duration=..., dns_lag=...)`): SWITCHOVER_INITIATED for
  `prepare` seconds; then SWITCHOVER_IN_PROGRESS, and at once blue read-only
  (``default_transaction_read_only``); `duration` seconds later green is promoted, the
  endpoints are renamed (green's emulator accepts tokens signed for the blue name only, blue's
  for ``<blue>-old1``), the certificates follow the names, and the metadata reports
  SWITCHOVER_IN_POST_PROCESSING then SWITCHOVER_COMPLETED (or stays in progress with
  ``report_completion=False``, as RDS PostgreSQL has been seen to). `begin_switchover()`,
  `rollback()` and `complete_switchover()` are the steps one at a time (and the last one's
  two halves, `promote_green()` and `rename_endpoints()`).

**Certificates.** One CA signs every certificate; each names ``127.0.0.1`` and ``localhost``
(where the blue name's forwarder listens) and the names the server answers to now; green's
emulator listens on ``127.0.0.2``, which no certificate names, so a client that dials green's
address directly must verify the name it signs for (as with RDS, whose certificates name no
address): before the switch
blue's names the blue endpoint and green's the green endpoint; at the rename both are
reissued, green's for the blue endpoint and blue's for ``<blue>-old1``. That is what RDS does:
its server certificates name the endpoints of the instance, and a switchover regenerates them
for the new names (AWS's blue/green switchover documentation; the AWS Advanced wrappers'
blue/green plugin guide: "internal security certificates are regenerated to accommodate the
new host names"). A client that verifies the name it signs for therefore checks the same name
the token names.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import ssl
from collections.abc import Iterable
from typing import Any

from .._auth import IAMAuth
from .._errors import ConfigurationError
from .._switchover import SOURCE_ROLE, TARGET_ROLE, BlueGreenSettings
from ._admin import (
    admin,
    emulator_for,
    set_synchronous_standbys,
    start_server,
    stop_servers,
    wait_synchronous,
)
from ._emulator import RDSIAMEmulator
from ._failover import ClusterEndpoint
from ._postgres import PostgresCluster
from ._service import AsyncService

__all__ = [
    "DEFAULT_BLUE_ENDPOINT",
    "DEFAULT_GREEN_ENDPOINT",
    "BlueGreenDeployment",
    "SwitchoverTimeline",
]

logger = logging.getLogger("asyncpg_iam.testing.bluegreen")

DEFAULT_BLUE_ENDPOINT = "app.cluster-abc123.us-east-1.rds.amazonaws.com"
DEFAULT_GREEN_ENDPOINT = "app-green-xyz123.cluster-abc123.us-east-1.rds.amazonaws.com"
_SCHEMA = "bluegreen_testbed"
_FUNCTIONS = {
    "aurora": "pg_catalog.get_blue_green_fast_switchover_metadata",
    "rds": "rds_tools.show_topology",
}


@dataclasses.dataclass(frozen=True, slots=True)
class SwitchoverTimeline:
    """When each step of a switchover happened, in event-loop time."""

    initiated_at: float
    """SWITCHOVER_INITIATED was reported."""
    read_only_at: float
    """Blue stopped taking writes (SWITCHOVER_IN_PROGRESS)."""
    promoted_at: float
    """Green takes writes."""
    renamed_at: float
    """The emulators answer to their new names (green to the blue name)."""
    completed_at: float | None
    """SWITCHOVER_COMPLETED was reported (None: the metadata never says so)."""


class BlueGreenDeployment(AsyncService):
    """A blue primary and its green standby behind emulators, with blue/green metadata.

    Use ``async with BlueGreenDeployment() as bed`` (needs the PostgreSQL server binaries);
    `pool_kwargs()` gives `create_pool` arguments that dial the blue name; register signing
    keys with `register_key()`. `deployment=False` starts with no deployment (no rows) until
    `create()`.
    """

    def __init__(
        self,
        *,
        blue_endpoint: str = DEFAULT_BLUE_ENDPOINT,
        green_endpoint: str = DEFAULT_GREEN_ENDPOINT,
        source: str | None = "aurora",
        deployment: bool = True,
        signing_port: int = 5432,
        iam_users: Iterable[str] = (),
    ) -> None:
        if source not in (None, *_FUNCTIONS):
            raise ConfigurationError(f"source must be 'aurora', 'rds' or None, not {source!r}")
        self.blue_endpoint = blue_endpoint
        self.green_endpoint = green_endpoint
        first, _, rest = blue_endpoint.partition(".")
        self.old_endpoint = f"{first}-old1.{rest}"
        self.source = source
        self._deployment = deployment
        self.signing_port = signing_port
        self._iam_users = list(iam_users)
        self._servers: list[PostgresCluster] = []
        self._emulators: list[RDSIAMEmulator] = []
        self._contexts: list[ssl.SSLContext] = []
        self._ca: Any = None
        self._blue_dns: ClusterEndpoint | None = None
        self._dns_task: asyncio.Task[None] | None = None
        self._promoted = False
        self.status = "AVAILABLE" if deployment else None

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Start blue, green (streaming synchronously), the metadata, emulators and DNS."""
        import trustme

        if self._servers:
            raise RuntimeError("the deployment is already started")
        settings = {"synchronous_commit": "on"}
        try:
            blue = await start_server(self._servers, settings)
            await self._install_metadata(blue)
            green = await start_server(self._servers, settings, standby_of=blue)
            await set_synchronous_standbys(blue, "*")
            await wait_synchronous(blue, "green")
            self._ca = trustme.CA()
            users = self._iam_users or [blue.user]
            for server, name in ((blue, self.blue_endpoint), (green, self.green_endpoint)):
                context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
                self._certify(context, name)
                self._contexts.append(context)
                emulator = emulator_for(
                    server,
                    # Green on an address of its own that no certificate names: a pool that
                    # dials it must verify the name it signs for (as with RDS's addresses).
                    listen_host="127.0.0.1" if server is blue else "127.0.0.2",
                    endpoint=name,
                    endpoint_port=self.signing_port,
                    server_ssl_context=context,
                    ca=self._ca,
                    iam_users=users,
                )
                self._emulators.append(emulator)
                await emulator.start()
            self._blue_dns = ClusterEndpoint(self._emulators[0])
            await self._blue_dns.start()
        except BaseException:
            await self.stop()
            raise
        logger.info("blue/green deployment ready: %r", self)

    async def stop(self) -> None:
        """Stop DNS, the emulators and both servers, and remove their data."""
        if self._dns_task is not None:
            self._dns_task.cancel()
            self._dns_task = None
        if self._blue_dns is not None:
            await self._blue_dns.stop()
            self._blue_dns = None
        await stop_servers(self._emulators, self._servers)

    def __repr__(self) -> str:
        return (
            f"BlueGreenDeployment(blue={self.blue_endpoint!r}, green={self.green_endpoint!r}, "
            f"source={self.source!r}, status={self.status!r})"
        )

    def _certify(self, context: ssl.SSLContext, name: str) -> None:
        self._ca.issue_cert("127.0.0.1", "localhost", name).configure_cert(context)

    # -- where it is --------------------------------------------------------------------------

    @property
    def blue(self) -> PostgresCluster:
        return self._servers[0]

    @property
    def green(self) -> PostgresCluster:
        return self._servers[1]

    @property
    def blue_emulator(self) -> RDSIAMEmulator:
        return self._emulators[0]

    @property
    def green_emulator(self) -> RDSIAMEmulator:
        return self._emulators[1]

    @property
    def blue_dns(self) -> ClusterEndpoint:
        """What the blue name resolves to: a forwarder that moves to green after the lag."""
        if self._blue_dns is None:
            raise RuntimeError("the deployment is not started: await start() first")
        return self._blue_dns

    @property
    def user(self) -> str:
        return self.blue.user

    @property
    def database(self) -> str:
        return self.blue.database

    async def resolve(self, name: str, port: int) -> tuple[str, int] | None:
        """Answer for a name as DNS does now (the resolver seam); None: it does not resolve."""
        name = name.lower().rstrip(".")
        if name == self.blue_endpoint:
            return self.blue_dns.target
        if name == self.green_endpoint:
            return self.green_emulator.host, self.green_emulator.port
        if name == self.old_endpoint and self._promoted:
            return self.blue_emulator.host, self.blue_emulator.port
        return None

    def client_ssl_context(self) -> ssl.SSLContext:
        """A client context that trusts the deployment's CA."""
        return self.blue_emulator.client_ssl_context()

    def register_key(
        self, access_key: str, secret_key: str, session_token: str | None = None, **kwargs: Any
    ) -> None:
        """Have both emulators accept tokens signed with this key."""
        for emulator in self._emulators:
            emulator.register_key(access_key, secret_key, session_token, **kwargs)

    def pool_kwargs(self, *, hold: float = 30.0, **overrides: Any) -> dict[str, Any]:
        """Return `create_pool()` arguments that dial the blue name and follow switchovers."""
        return {
            "host": self.blue_dns.host,
            "port": self.blue_dns.port,
            "user": self.user,
            "database": self.database,
            "ssl": self.client_ssl_context(),
            "iam": IAMAuth(signing_host=self.blue_endpoint, signing_port=self.signing_port),
            "blue_green": BlueGreenSettings(hold=hold, resolver=self.resolve),
            **overrides,
        }

    # -- the metadata -------------------------------------------------------------------------

    async def _admin(self, server: PostgresCluster, sql: str, *args: Any) -> Any:
        return await admin(server, sql, *args)

    async def query(self, server: PostgresCluster, sql: str, *args: Any) -> list[Any]:
        """Run `sql` on `server` directly (no emulator), as its superuser; return the rows."""
        import asyncpg

        con = await asyncpg.connect(server.dsn, ssl=False)
        try:
            return list(await con.fetch(sql, *args))
        finally:
            await con.close()

    async def _install_metadata(self, blue: PostgresCluster) -> None:
        await self._admin(
            blue,
            f"CREATE SCHEMA {_SCHEMA}; CREATE TABLE {_SCHEMA}.metadata (version text, "
            "endpoint text, port int, role text, status text)",
        )
        if self._deployment:
            await self._write_rows(blue, "AVAILABLE")
        if self.source is None:
            return
        function = _FUNCTIONS[self.source]
        if self.source == "rds":
            await self._admin(blue, "CREATE SCHEMA rds_tools")
        body = f"SELECT version, endpoint, port, role, status FROM {_SCHEMA}.metadata"  # noqa: S608
        await self._admin(
            blue,
            f"CREATE FUNCTION {function}(text) RETURNS TABLE (version text, endpoint text, "
            "port int, role text, status text) LANGUAGE sql STABLE SECURITY DEFINER AS "
            f"'{body}'",
        )

    async def _write_rows(self, server: PostgresCluster, status: str | None) -> None:
        """Replace the rows in one transaction (a poll never sees them half written)."""
        import asyncpg

        con = await asyncpg.connect(server.dsn, ssl=False)
        try:
            async with con.transaction(readonly=False):
                await con.execute("SET LOCAL transaction_read_only = off")
                await con.execute(f"DELETE FROM {_SCHEMA}.metadata")  # noqa: S608 (a constant)
                if status is not None:
                    await con.execute(
                        f"INSERT INTO {_SCHEMA}.metadata VALUES ('1.0', $1, $3, $4, $6), "  # noqa: S608
                        "('1.0', $2, $3, $5, $6)",
                        self.blue_endpoint,
                        self.green_endpoint,
                        self.signing_port,
                        SOURCE_ROLE,
                        TARGET_ROLE,
                        status,
                    )
        finally:
            await con.close()

    async def set_status(self, status: str | None) -> None:
        """Report `status` on both sides (None: no deployment, no rows)."""
        self.status = status
        await self._write_rows(self.blue, status)
        if self._promoted:  # before, green is a replica: the rows reach it from blue
            await self._write_rows(self.green, status)

    async def create(self) -> None:
        """Create the deployment (rows with status AVAILABLE)."""
        await self.set_status("AVAILABLE")

    # -- the switch ---------------------------------------------------------------------------

    async def begin_switchover(self, *, prepare: float = 1.5) -> tuple[float, float]:
        """Report SWITCHOVER_INITIATED, wait `prepare` s, then make blue read-only and report
        SWITCHOVER_IN_PROGRESS; return when each happened (event-loop time)."""
        loop = asyncio.get_running_loop()
        await self.set_status("SWITCHOVER_INITIATED")
        initiated = loop.time()
        await asyncio.sleep(prepare)
        await self.set_status("SWITCHOVER_IN_PROGRESS")
        await self._admin(self.blue, "ALTER SYSTEM SET default_transaction_read_only = on")
        await self._admin(self.blue, "SELECT pg_reload_conf()")
        read_only = loop.time()
        logger.info("switchover in progress: blue is read-only")
        return initiated, read_only

    async def rollback(self) -> None:
        """Undo a switchover that has not promoted green: blue takes writes, status AVAILABLE."""
        if self._promoted:
            raise RuntimeError("green was promoted: this test bed cannot roll back after that")
        await self._admin(self.blue, "ALTER SYSTEM RESET default_transaction_read_only")
        await self._admin(self.blue, "SELECT pg_reload_conf()")
        await self.set_status("AVAILABLE")
        logger.info("switchover rolled back")

    async def complete_switchover(
        self, *, dns_lag: float = 0.0, report_completion: bool = True
    ) -> tuple[float, float, float | None]:
        """Promote green, rename the endpoints (and certificates), report completion; move
        the blue name's DNS to green `dns_lag` s later (in the background)."""
        loop = asyncio.get_running_loop()
        promoted = await self.promote_green()
        if self.green_emulator.endpoint != self.blue_endpoint:
            self.rename_endpoints()
        renamed = loop.time()
        completed = None
        if report_completion:
            await self.set_status("SWITCHOVER_IN_POST_PROCESSING")
            await asyncio.sleep(0.2)
            await self.set_status("SWITCHOVER_COMPLETED")
            completed = loop.time()
        else:
            await self._write_rows(self.green, self.status)
        self._dns_task = loop.create_task(self._move_dns(dns_lag))
        logger.info("switchover done: green answers to %s", self.blue_endpoint)
        return promoted, renamed, completed

    async def promote_green(self) -> float:
        """Promote green (it takes writes; the names stay until `rename_endpoints()`); return
        when (event-loop time). `complete_switchover()` does both; apart, a test can act
        between them."""
        if not self._promoted:
            # Blue takes no client writes now; its own (the metadata) must not wait for green.
            await set_synchronous_standbys(self.blue, "")
            await asyncio.to_thread(self.green.promote)
            self._promoted = True
        return asyncio.get_running_loop().time()

    def rename_endpoints(self) -> None:
        """Rename the endpoints and reissue their certificates: green answers to the blue name
        only, blue to ``<blue>-old1`` (a plain function: an emulator's ``on_login`` may call
        it, to rename between two logins)."""
        self.green_emulator.rename(self.blue_endpoint)
        self._certify(self._contexts[1], self.blue_endpoint)
        self.blue_emulator.rename(self.old_endpoint)
        self._certify(self._contexts[0], self.old_endpoint)

    async def _move_dns(self, lag: float) -> None:
        await self.blue_dns.switch(self.green_emulator, lag=lag)

    async def dns_moved(self) -> None:
        """Wait until the blue name resolves to green."""
        if self._dns_task is not None:
            await self._dns_task

    async def switchover(
        self,
        *,
        duration: float = 5.0,
        dns_lag: float = 0.0,
        prepare: float = 1.5,
        report_completion: bool = True,
    ) -> SwitchoverTimeline:
        """Walk the phases: initiated, in progress (blue read-only for `duration` s), green
        promoted and renamed, completed; DNS follows `dns_lag` s after the rename."""
        initiated, read_only = await self.begin_switchover(prepare=prepare)
        await asyncio.sleep(duration)
        promoted, renamed, completed = await self.complete_switchover(
            dns_lag=dns_lag, report_completion=report_completion
        )
        return SwitchoverTimeline(initiated, read_only, promoted, renamed, completed)
