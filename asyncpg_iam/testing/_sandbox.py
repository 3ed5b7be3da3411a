"""`Sandbox`: the whole local stand-in for RDS with IAM, started and stopped as one.

PostgreSQL (a throwaway cluster, or a server given), the RDS IAM emulator in front of it, a
container-credentials endpoint issuing rotating keys the emulator trusts, optionally moto's STS,
and an AWS environment isolated from the host's that points the default credential chain at
them. The pytest fixtures, ``asyncpg-iam emulate`` and ``demo``, the examples and the benchmarks
are all built on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote

from .._auth import IAMAuth
from .._clock import SYSTEM_CLOCK, Clock
from .._errors import ConfigurationError
from ._aws import CredentialServer, MotoSTS
from ._emulator import DEFAULT_ENDPOINT, AccessKey, RDSIAMEmulator
from ._isolation import aws_isolation_variables, patched_environ
from ._postgres import PostgresCluster, PostgresServer

__all__ = ["Sandbox"]

logger = logging.getLogger("asyncpg_iam.testing.sandbox")


class Sandbox:
    """PostgreSQL, the RDS IAM emulator, local AWS endpoints and an isolated AWS environment.

    Use as ``async with Sandbox() as sandbox:``, then
    ``asyncpg_iam.create_pool(**sandbox.pool_kwargs())``: the pool signs with the keys the
    credential server issues, and the emulator verifies them.

    Parts: `server` names a running PostgreSQL to put the emulator in front of (default: start
    a throwaway `PostgresCluster` with `postgres_settings`). `credential_server` starts a
    `CredentialServer` whose keys (living `credential_lifetime` seconds) the emulator trusts;
    `access_key` is a static key the emulator trusts as well; `sts` starts moto's STS (needs
    ``moto[server]``), whose assumed-role keys the emulator trusts. The emulator listens on
    `port` (0: a free one), answers as `endpoint`, enables the server's user and `iam_users`
    for IAM (creating those roles in the backend), serves TLS from `ca` (a ``trustme.CA``;
    default: a new one), reads time from `clock`, and with `accept_any_password` checks no
    token (static-password mode, TLS still required).

    With `isolate_environment` (the default) the process environment is, inside the block,
    `environment()` with every other variable that could find the host's AWS credentials
    removed; it is restored on exit. Without it nothing in ``os.environ`` changes.
    """

    def __init__(
        self,
        *,
        server: PostgresServer | None = None,
        postgres_settings: Mapping[str, str] | None = None,
        endpoint: str = DEFAULT_ENDPOINT,
        port: int = 0,
        iam_users: Iterable[str] = (),
        access_key: AccessKey | None = None,
        credential_server: bool = True,
        credential_lifetime: float = 3600.0,
        sts: bool = False,
        accept_any_password: bool = False,
        ca: Any = None,
        clock: Clock | None = None,
        isolate_environment: bool = True,
    ) -> None:
        if server is not None and postgres_settings:
            raise ConfigurationError(
                "postgres_settings apply only to the cluster the sandbox starts: leave server "
                "out to start one, or configure the server you pass"
            )
        if not 0 <= port <= 65535:
            raise ConfigurationError(f"port must be 0 (a free one) to 65535, got {port}")
        if credential_lifetime <= 0:
            raise ConfigurationError(
                f"credential_lifetime must be > 0 seconds, got {credential_lifetime!r}"
            )
        self._given_server = server
        self._postgres_settings = dict(postgres_settings or {})
        self._endpoint = endpoint
        self._port = port
        self._iam_users = tuple(iam_users)
        self._want_credential_server = credential_server
        self._want_sts = sts
        self._accept_any_password = accept_any_password
        self._ca = ca
        self._clock = clock
        self._isolate_environment = isolate_environment
        self.access_key = access_key
        """The static key the emulator trusts, if one was given."""
        self.credential_lifetime = credential_lifetime
        """How long each key the credential server issues lives, in seconds."""
        self._stack: contextlib.AsyncExitStack | None = None
        self._cluster: PostgresCluster | None = None
        self._server: PostgresServer | None = None
        self._emulator: RDSIAMEmulator | None = None
        self._credential_server: CredentialServer | None = None
        self._sts: MotoSTS | None = None
        self._aws_dir: Path | None = None

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> Sandbox:
        """Start every part; on failure stop what was started and raise."""
        if self._stack is not None:
            raise RuntimeError("the sandbox is already started")
        self._stack = contextlib.AsyncExitStack()
        try:
            await self._start(self._stack)
        except BaseException:
            await self.aclose()
            raise
        return self

    async def _start(self, stack: contextlib.AsyncExitStack) -> None:
        self._aws_dir = Path(
            stack.enter_context(tempfile.TemporaryDirectory(prefix="asyncpg-iam-aws-"))
        )
        if self._given_server is not None:
            self._server = self._given_server
        else:
            cluster = PostgresCluster(settings=self._postgres_settings)
            stack.callback(cluster.stop)
            self._cluster = await asyncio.to_thread(cluster.start)
            self._server = cluster.server
        self._emulator = await self._started_emulator(
            stack,
            endpoint=self._endpoint,
            listen_port=self._port,
            accept_any_password=self._accept_any_password,
        )
        for user in self._iam_users:
            await self._emulator.ensure_role(user)
        if self._want_credential_server:
            credentials = CredentialServer(
                lifetime=self.credential_lifetime, clock=self._clock or SYSTEM_CLOCK
            )
            credentials.add_emulator(self._emulator)
            stack.callback(credentials.stop)
            self._credential_server = credentials.start()
        if self._want_sts:
            sts = MotoSTS()
            stack.callback(sts.stop)
            self._sts = await asyncio.to_thread(sts.start)
            self._emulator.add_key_source(self._sts.issued_key)
        if self._isolate_environment:
            variables = aws_isolation_variables(self._aws_dir, region=self._emulator.region)
            variables.update(self.environment())
            stack.enter_context(patched_environ(variables))
        logger.info(
            "sandbox started: emulator %s:%d for %s, backend %r",
            self._emulator.host,
            self._emulator.port,
            self._emulator.endpoint,
            self._server,
        )

    async def _started_emulator(
        self, stack: contextlib.AsyncExitStack, **options: Any
    ) -> RDSIAMEmulator:
        server = self.server
        options = {"ca": self._ca, "clock": self._clock, **options}
        emulator = RDSIAMEmulator(
            backend_host=server.host,
            backend_port=server.port,
            backend_user=server.user,
            backend_password=server.password,
            iam_users=[server.user, *self._iam_users],
            **options,
        )
        if self.access_key is not None:
            key = self.access_key
            emulator.register_key(key.access_key, key.secret_key, key.session_token)
        await emulator.start()
        stack.push_async_callback(emulator.stop)
        return emulator

    async def add_emulator(self, **options: Any) -> RDSIAMEmulator:
        """Start another emulator in front of the same PostgreSQL; it stops with the sandbox.

        It trusts `access_key` and the credential server's keys, and enables the same users;
        `options` are `RDSIAMEmulator` arguments (``accept_any_password=True``, ``endpoint``,
        ``clock``...).
        """
        if self._stack is None:
            raise RuntimeError("start the sandbox first (async with Sandbox() as sandbox)")
        emulator = await self._started_emulator(self._stack, **options)
        if self._credential_server is not None:
            self._credential_server.add_emulator(emulator)
        return emulator

    async def aclose(self) -> None:
        """Stop every part, remove the PostgreSQL data and restore the environment; idempotent."""
        stack, self._stack = self._stack, None
        if stack is None:
            return
        try:
            await stack.aclose()
        finally:
            self._cluster = self._server = self._emulator = None
            self._credential_server = self._sts = None
            self._aws_dir = None

    async def __aenter__(self) -> Sandbox:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        if self._emulator is None:
            return "<Sandbox (not running)>"
        return (
            f"<Sandbox {self._emulator.host}:{self._emulator.port} as {self._emulator.endpoint} "
            f"in front of {self._server!r}>"
        )

    # -- the parts ------------------------------------------------------------------------------

    def _running(self, part: Any, name: str) -> Any:
        if part is None:
            raise RuntimeError(f"no {name}: the sandbox is not running (async with Sandbox())")
        return part

    @property
    def emulator(self) -> RDSIAMEmulator:
        """The RDS IAM emulator clients connect to."""
        emulator: RDSIAMEmulator = self._running(self._emulator, "emulator")
        return emulator

    @property
    def server(self) -> PostgresServer:
        """The PostgreSQL behind the emulator."""
        server: PostgresServer = self._running(self._server, "server")
        return server

    @property
    def cluster(self) -> PostgresCluster | None:
        """The throwaway cluster the sandbox started (None when it was given a `server`)."""
        return self._cluster

    @property
    def credential_server(self) -> CredentialServer | None:
        """The container-credentials endpoint (None when started without one)."""
        return self._credential_server

    @property
    def sts(self) -> MotoSTS | None:
        """moto's STS (None unless started with ``sts=True``)."""
        return self._sts

    # -- how to reach it ------------------------------------------------------------------------

    @property
    def host(self) -> str:
        """The address clients dial (the emulator's)."""
        return self.emulator.host

    @property
    def port(self) -> int:
        """The port clients dial (the emulator's)."""
        return self.emulator.port

    @property
    def user(self) -> str:
        """The database user enabled for IAM (the server's)."""
        return self.server.user

    @property
    def database(self) -> str:
        """The database to connect to (the server's)."""
        return self.server.database

    @property
    def ca_path(self) -> str:
        """A PEM file with the CA the emulator's certificate is issued by."""
        return self.emulator.ca_path

    @property
    def dsn(self) -> str:
        """A ``postgresql://`` URL for the emulator with ``sslmode=verify-full`` and its CA.

        Tokens must be signed for the emulator's endpoint, not for this host: pass
        ``iam=sandbox.iam_auth()`` along with it.
        """
        auth = quote(self.user, safe="")
        return (
            f"postgresql://{auth}@{self.host}:{self.port}/{quote(self.database, safe='')}"
            f"?sslmode=verify-full&sslrootcert={quote(self.ca_path, safe='')}"
        )

    def iam_auth(self, **overrides: Any) -> IAMAuth:
        """Return the `IAMAuth` that signs for the emulator's endpoint; `overrides` add to it."""
        # The emulator knows which of signing_host, signing_port and region it needs.
        signing: IAMAuth = self.emulator.pool_kwargs(user=self.user)["iam"]
        return signing.replace(**overrides) if overrides else signing

    def connect_kwargs(self, *, user: str | None = None) -> dict[str, Any]:
        """Return `asyncpg.connect()` arguments for the emulator (no password)."""
        return self.emulator.connect_kwargs(user=user or self.user, database=self.database)

    def pool_kwargs(self, **overrides: Any) -> dict[str, Any]:
        """Return `asyncpg_iam.create_pool()` arguments for the emulator.

        Host, port, the server's user and database, TLS trusting the emulator's CA and an
        `IAMAuth` signing for its endpoint; `overrides` (any create_pool argument) replace or
        extend them.
        """
        overrides.setdefault("user", self.user)
        overrides.setdefault("database", self.database)
        return self.emulator.pool_kwargs(**overrides)

    def environment(self) -> dict[str, str]:
        """Return the variables that point the AWS chain, libpq and the CA bundle at the sandbox.

        The credential server's URL (or, without one, `access_key`), the region, empty AWS
        config files, no instance metadata, STS when started, and the CA for
        ``ASYNCPG_IAM_CA_BUNDLE`` and ``PGSSLROOTCERT``.
        """
        emulator = self.emulator
        aws_dir = self._running(self._aws_dir, "AWS config directory")
        env = {
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_REGION": emulator.region,
            "AWS_CONFIG_FILE": str(aws_dir / "config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(aws_dir / "credentials"),
        }
        if self._credential_server is not None:
            env["AWS_CONTAINER_CREDENTIALS_FULL_URI"] = self._credential_server.url
        elif self.access_key is not None:
            env["AWS_ACCESS_KEY_ID"] = self.access_key.access_key
            env["AWS_SECRET_ACCESS_KEY"] = self.access_key.secret_key
            if self.access_key.session_token is not None:
                env["AWS_SESSION_TOKEN"] = self.access_key.session_token
        if self._sts is not None:
            env.update(self._sts.env())
        env["ASYNCPG_IAM_CA_BUNDLE"] = emulator.ca_path
        env["PGSSLROOTCERT"] = emulator.ca_path
        return env
