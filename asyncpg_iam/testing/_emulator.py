"""A local stand-in for Amazon RDS with IAM database authentication.

`RDSIAMEmulator` is an asyncio PostgreSQL-protocol front in front of a real PostgreSQL. It
behaves as RDS does for IAM users: TLS is required (a plaintext startup gets the `pg_hba.conf`
rejection), the password is asked for in cleartext and must be a valid IAM token for the
endpoint, port, region and user (verified independently of the library's signer, by its own
shiftable clock), and every failure gets RDS's opaque `PAM authentication failed` message while
the real reason is recorded for tests. Accepted logins are relayed byte for byte to the backend.

Fault switches (reject logins, drop connections, latency, pause, clock shift, throttle) let
tests reproduce what production does to a pool.

In DSQL mode (an endpoint ``<id>.dsql.<region>.on.aws``, or ``dsql=True``) it stands in for
Aurora DSQL instead: tokens are checked as DSQL tokens (service ``dsql``, no port,
``DbConnectAdmin`` for the role ``admin`` and ``DbConnect`` for the others), throttled logins
get SQLSTATE 53400, and the client's queries are read message by message so that faults can
fail a ``COMMIT`` with SQLSTATE 40001 (optimistic-concurrency conflict) or drop the connection
while a ``COMMIT`` is in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
import ssl
import struct
import sys
import tempfile
import weakref
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from .._auth import IAMAuth
from .._clock import SYSTEM_CLOCK, Clock
from .._errors import ConfigurationError
from ._emu_backend import BackendError, open_backend
from ._emu_verify import RegisteredKey, Verdict, verify_dsql_token, verify_token
from ._wire import (
    CANCEL_REQUEST_CODE,
    GSSENC_REQUEST_CODE,
    PROTOCOL_V3,
    SSL_REQUEST_CODE,
    ProtocolViolation,
    StartupPacket,
    encode_auth_request,
    encode_error,
    read_startup_packet,
)

__all__ = [
    "DEFAULT_DSQL_ENDPOINT",
    "DEFAULT_ENDPOINT",
    "AccessKey",
    "LoginRecord",
    "RDSIAMEmulator",
    "RelayedConnection",
]

logger = logging.getLogger("asyncpg_iam.testing.emulator")

DEFAULT_ENDPOINT = "mydb.abcdefghijkl.us-east-1.rds.amazonaws.com"
DEFAULT_DSQL_ENDPOINT = "abcdefghijklmnopqrstuvwxyz.dsql.us-east-1.on.aws"
# What the DSQL stand-in answers a refused login with (28000) and a throttled one (53400).
_DSQL_DENIED = 'access denied for role "{user}": the IAM token was not accepted'
_DSQL_THROTTLED = "unable to accept connection: rate of new connections exceeded, retry later"
# A COMMIT failed by fail_next_commits(): roll back, then raise what DSQL raises on a conflict.
_CONFLICT_QUERY = (
    b"ROLLBACK; DO $$BEGIN RAISE EXCEPTION 'change conflicts with another transaction, "
    b"please retry: (OC000)' USING ERRCODE = '40001'; END$$;\x00"
)
_COMMIT_QUERIES = {b"COMMIT", b"END", b"COMMIT WORK", b"COMMIT TRANSACTION"}
_PAM_FAILED = 'PAM authentication failed for user "{user}"'
_PLAINTEXT = (
    'pg_hba.conf rejects connection for host "{host}", user "{user}", database "{database}", '
    "SSL off"
)
_RELAY_CHUNK = 1 << 16


@dataclass(frozen=True, slots=True)
class LoginRecord:
    """One login attempt and why it was accepted or rejected.

    `reason` is ``"ok"`` or a stable code (``"signature_mismatch"``, ``"expired"``,
    ``"plaintext"``, ``"throttled"``...); `detail` is human text and never holds a secret.
    `token_age` is the token's age in seconds by the emulator's (shifted) clock.
    """

    at: dt.datetime
    user: str | None
    database: str | None
    accepted: bool
    reason: str
    detail: str
    token_age: float | None = None
    access_key: str | None = None
    backend_pid: int | None = None
    peer_port: int | None = None


@dataclass(frozen=True, slots=True)
class AccessKey:
    """An AWS access key for signing test tokens (the secret parts stay out of its repr)."""

    access_key: str
    secret_key: str = field(repr=False)
    session_token: str | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class RelayedConnection:
    """An open client connection that is relayed to a backend process."""

    user: str
    database: str
    backend_pid: int | None
    opened_at: dt.datetime
    peer_port: int | None


class _Connection:
    __slots__ = ("backend", "client", "relayed")

    def __init__(self, client: asyncio.StreamWriter) -> None:
        self.client = client
        self.backend: asyncio.StreamWriter | None = None
        self.relayed: RelayedConnection | None = None

    def abort(self) -> None:
        for writer in (self.client, self.backend):
            if writer is not None:
                writer.transport.abort()


class _Refused(Exception):
    """Ends a connection after an error response has been sent."""


def _is_dsql_endpoint(labels: list[str]) -> bool:
    # <id>.dsql[-suffix].<region>.on.aws
    dsql_label = labels[1] == "dsql" or labels[1].startswith("dsql-") if len(labels) > 1 else False
    return len(labels) == 5 and dsql_label and labels[3:] == ["on", "aws"]


def region_from_endpoint(endpoint: str) -> str | None:
    """Return the region named in an RDS or DSQL endpoint.

    RDS: ``*.<region>.rds.amazonaws.com[.cn]``; DSQL: ``<id>.dsql.<region>.on.aws``.
    """
    labels = endpoint.lower().rstrip(".").split(".")
    if _is_dsql_endpoint(labels):
        return labels[2]
    for index in range(1, len(labels) - 2):
        if labels[index + 1 : index + 4] in (["rds", "amazonaws", "com"],) and labels[
            index + 4 :
        ] in ([], ["cn"]):
            return labels[index]
    return None


async def _start_tls(writer: asyncio.StreamWriter, context: ssl.SSLContext) -> None:
    if sys.version_info >= (3, 11):
        await writer.start_tls(context)
        return
    # Python 3.10 has no StreamWriter.start_tls: upgrade the transport and rewire the stream.
    loop = asyncio.get_running_loop()
    transport = writer.transport
    protocol: Any = transport.get_protocol()
    new_transport = await loop.start_tls(transport, protocol, context, server_side=True)
    writer._transport = new_transport  # type: ignore[attr-defined]
    protocol._transport = new_transport
    protocol._over_ssl = True


class _KeyBook(Mapping[str, RegisteredKey]):
    """The registered keys, then the key sources, as one read-only mapping."""

    def __init__(
        self, keys: dict[str, RegisteredKey], sources: list[Callable[[str], AccessKey | None]]
    ) -> None:
        self._keys = keys
        self._sources = sources

    def __getitem__(self, access_key: str) -> RegisteredKey:
        found = self._keys.get(access_key)
        if found is not None:
            return found
        for lookup in self._sources:
            key = lookup(access_key)
            if key is not None:
                return RegisteredKey(key.access_key, key.secret_key, key.session_token, None)
        raise KeyError(access_key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


class RDSIAMEmulator:
    """An RDS endpoint with IAM authentication, in front of a real PostgreSQL.

    Tokens must be signed for `endpoint`:`endpoint_port` (the listening port by default) in
    `region` (parsed from the endpoint by default) with a key given to `register_key()`, for a
    user given to `enable_iam_user()` or `iam_users`. Clients connect to `host`:`port` with TLS,
    trusting `ca_path`. The backend is reached over plain TCP as the client's own user; with
    `backend_password` it answers password, MD5 and SCRAM requests of the backend.
    `backend_user` names the administrative role used by `ensure_role()`.

    With `accept_any_password`, tokens are not checked (static-password mode for benchmarks)
    but TLS is still required. `dsql` stands in for Aurora DSQL instead of RDS (None: when
    `endpoint` is a DSQL name); the role ``admin`` is then enabled for IAM without being named.
    Start it with `await start()` or `async with`.
    """

    def __init__(
        self,
        *,
        backend_host: str,
        backend_port: int,
        backend_user: str = "postgres",
        backend_password: str | None = None,
        endpoint: str = DEFAULT_ENDPOINT,
        region: str | None = None,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
        endpoint_port: int | None = None,
        server_ssl_context: ssl.SSLContext | None = None,
        ca: Any = None,
        clock: Clock | None = None,
        accept_any_password: bool = False,
        iam_users: Iterable[str] = (),
        max_clock_skew: float = 300.0,
        max_password_length: int = 8192,
        login_timeout: float = 60.0,
        dsql: bool | None = None,
    ) -> None:
        if ":" in endpoint or "/" in endpoint or not endpoint:
            raise ConfigurationError(
                f"endpoint must be a bare host name without port or path, got {endpoint!r}"
            )
        resolved_region = region or region_from_endpoint(endpoint)
        if resolved_region is None:
            raise ConfigurationError(
                f"cannot tell the region from endpoint {endpoint!r}: pass region='us-east-1' "
                "(or whichever region the tokens are signed for)"
            )
        if max_password_length < 1 or login_timeout <= 0 or max_clock_skew < 0:
            raise ConfigurationError(
                "max_password_length and login_timeout must be positive, max_clock_skew >= 0"
            )
        self._backend_host = backend_host
        self._backend_port = backend_port
        self._backend_user = backend_user
        self._backend_password = backend_password
        self._endpoint = endpoint
        self._region = resolved_region
        self._listen_host = listen_host
        self._listen_port = listen_port
        self._endpoint_port = endpoint_port
        self._clock: Clock = clock or SYSTEM_CLOCK
        self._accept_any_password = accept_any_password
        self._iam_users: set[str] = set(iam_users)
        self._max_clock_skew = max_clock_skew
        self._max_password_length = max_password_length
        self._login_timeout = login_timeout
        self._keys: dict[str, RegisteredKey] = {}
        self._key_sources: list[Callable[[str], AccessKey | None]] = []
        if dsql is None:
            dsql = _is_dsql_endpoint(endpoint.lower().rstrip(".").split("."))
        self._dsql = dsql
        if dsql:
            self._iam_users.add("admin")

        self._ca_pem: str | None = None
        if server_ssl_context is None:
            import trustme

            ca = ca if ca is not None else trustme.CA()
            cert = ca.issue_cert("127.0.0.1", "localhost", "::1", endpoint)
            server_ssl_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            cert.configure_cert(server_ssl_context)
        if ca is not None:
            self._ca_pem = ca.cert_pem.bytes().decode("ascii")
        self._server_ssl_context = server_ssl_context
        self._ca_path: str | None = None

        self._server: asyncio.AbstractServer | None = None
        self._port: int | None = None
        self._accepting = asyncio.Event()
        self._accepting.set()
        self._connections: set[_Connection] = set()
        self._tasks: set[asyncio.Task[Any]] = set()

        self.records: list[LoginRecord] = []
        """Every login attempt, oldest first."""
        self.latency: float = 0.0
        """Seconds (by the emulator's clock) added before a login is answered."""
        self.clock_offset: float = 0.0
        """Seconds added to the clock when checking token dates (simulates skew)."""
        self.max_logins_per_second: int | None = None
        """Cap on login attempts in one clock second; excess logins are rejected as throttled."""
        self._reject_next = 0
        self._throttle_next = 0
        self._fail_commits = 0
        self._drop_commits = 0
        self._commits_failed = 0
        self._commits_dropped = 0
        self._attempts: Counter[int] = Counter()
        self._logins_accepted = 0
        self._logins_rejected = 0
        self._password_messages = 0
        self._connections_total = 0
        self._backend_connections_total = 0

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Start listening."""
        if self._server is not None:
            raise RuntimeError("the emulator is already started")
        self._server = await asyncio.start_server(
            self._handle, self._listen_host, self._listen_port
        )
        self._port = self._server.sockets[0].getsockname()[1]
        logger.info(
            "RDS IAM emulator for %s listening on %s:%s, backend %s:%s",
            self._endpoint,
            self._listen_host,
            self._port,
            self._backend_host,
            self._backend_port,
        )

    async def stop(self) -> None:
        """Stop listening, drop every connection and wait for the handlers to finish."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        self._accepting.set()
        self.drop_all_connections()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()
        if self._ca_path is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._ca_path)
            self._ca_path = None
        logger.info("RDS IAM emulator for %s stopped", self._endpoint)

    async def __aenter__(self) -> RDSIAMEmulator:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def __repr__(self) -> str:
        listening = f"{self._listen_host}:{self._port}" if self._port else "not started"
        return (
            f"RDSIAMEmulator(endpoint={self._endpoint!r}, region={self._region!r}, "
            f"listening={listening}, backend={self._backend_host}:{self._backend_port})"
        )

    # -- where it is and how to trust it ------------------------------------------------------

    @property
    def host(self) -> str:
        """The address it listens on."""
        return self._listen_host

    @property
    def port(self) -> int:
        """The port it listens on (known once started)."""
        if self._port is None:
            raise RuntimeError("the emulator is not started: await start() first")
        return self._port

    @property
    def endpoint(self) -> str:
        """The RDS (or DSQL) host name tokens must be signed for."""
        return self._endpoint

    @property
    def dsql(self) -> bool:
        """Whether it stands in for Aurora DSQL rather than RDS."""
        return self._dsql

    @property
    def endpoint_port(self) -> int:
        """The port tokens must be signed for."""
        return self._endpoint_port if self._endpoint_port is not None else self.port

    @property
    def region(self) -> str:
        """The region tokens must be signed for."""
        return self._region

    @property
    def backend_host(self) -> str:
        """The backend PostgreSQL's host."""
        return self._backend_host

    @property
    def backend_port(self) -> int:
        """The backend PostgreSQL's port."""
        return self._backend_port

    @property
    def ca_pem(self) -> str:
        """The PEM of the CA that signed the emulator's certificate."""
        if self._ca_pem is None:
            raise RuntimeError(
                "the emulator was given server_ssl_context without ca: its CA is unknown"
            )
        return self._ca_pem

    @property
    def ca_path(self) -> str:
        """A PEM file of the CA that signed the emulator's certificate (removed on stop)."""
        if self._ca_path is None:
            pem = self.ca_pem
            fd, path = tempfile.mkstemp(prefix="asyncpg-iam-emulator-ca-", suffix=".pem")
            with os.fdopen(fd, "w") as file:
                file.write(pem)
            self._ca_path = path
            weakref.finalize(self, _unlink_quietly, path)
        return self._ca_path

    def client_ssl_context(self) -> ssl.SSLContext:
        """Return a client context that trusts the emulator's CA and checks its host name."""
        return ssl.create_default_context(cadata=self.ca_pem)

    def connect_kwargs(self, *, user: str, database: str | None = None) -> dict[str, Any]:
        """Return `asyncpg.connect()` arguments (host, port, user, database, ssl) for it."""
        return {
            "host": self.host,
            "port": self.port,
            "user": user,
            "database": database or ("postgres" if self._dsql else user),
            "ssl": self.client_ssl_context(),
        }

    def pool_kwargs(
        self, *, user: str, database: str | None = None, **overrides: Any
    ) -> dict[str, Any]:
        """Return `asyncpg_iam.create_pool()` arguments that dial it and sign for its endpoint.

        These are `connect_kwargs()` plus an `IAMAuth` that signs for `endpoint` (and for
        `endpoint_port` and `region` when they differ from what the client would infer);
        `overrides` (any create_pool argument, e.g. ``min_size`` or your own ``iam``) replace
        or extend them.
        """
        kwargs = self.connect_kwargs(user=user, database=database)
        if "iam" not in overrides:
            signing: dict[str, Any] = {"signing_host": self._endpoint}
            if self._endpoint_port is not None:
                signing["signing_port"] = self._endpoint_port
            if region_from_endpoint(self._endpoint) != self._region:
                signing["region"] = self._region
            kwargs["iam"] = IAMAuth(**signing)
        kwargs.update(overrides)
        return kwargs

    # -- what it accepts ----------------------------------------------------------------------

    def register_key(
        self,
        access_key: str,
        secret_key: str,
        session_token: str | None = None,
        *,
        expiration: dt.datetime | None = None,
    ) -> None:
        """Accept tokens signed with this key; with `expiration`, only until then."""
        self._keys[access_key] = RegisteredKey(access_key, secret_key, session_token, expiration)
        logger.debug("registered access key %s", access_key)

    def add_key_source(self, lookup: Callable[[str], AccessKey | None]) -> None:
        """Also accept tokens signed with keys `lookup` knows (it returns None for others).

        For keys issued elsewhere while the emulator runs, such as assumed-role keys from
        moto's STS (`MotoSTS.issued_key`).
        """
        self._key_sources.append(lookup)

    def unregister_key(self, access_key: str) -> None:
        """Stop accepting tokens signed with this key."""
        self._keys.pop(access_key, None)

    def enable_iam_user(self, user: str) -> None:
        """Let `user` log in with IAM tokens (as `GRANT rds_iam TO user` does)."""
        self._iam_users.add(user)

    def disable_iam_user(self, user: str) -> None:
        """Stop `user` from logging in with IAM tokens."""
        self._iam_users.discard(user)

    @property
    def iam_users(self) -> frozenset[str]:
        """The users enabled for IAM."""
        return frozenset(self._iam_users)

    async def ensure_role(self, user: str) -> None:
        """Create a LOGIN role `user` on the backend unless it exists (as `backend_user`).

        With `backend_password` the role gets that password too, since the relay answers the
        backend's password requests with it for every user.
        """
        import asyncpg

        conn = await asyncpg.connect(
            host=self._backend_host,
            port=self._backend_port,
            user=self._backend_user,
            password=self._backend_password,
            database="postgres",
            ssl=False,
        )
        try:
            exists = await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", user)
            if not exists:
                quoted = '"' + user.replace('"', '""') + '"'
                password = ""
                if self._backend_password is not None:
                    password = " PASSWORD '" + self._backend_password.replace("'", "''") + "'"
                with contextlib.suppress(asyncpg.DuplicateObjectError):
                    await conn.execute(f"CREATE ROLE {quoted} LOGIN{password}")
        finally:
            await conn.close()

    # -- counters -----------------------------------------------------------------------------

    @property
    def logins_accepted(self) -> int:
        """Logins that passed verification and reached the backend."""
        return self._logins_accepted

    @property
    def logins_rejected(self) -> int:
        """Logins refused for any reason (each has a record)."""
        return self._logins_rejected

    @property
    def password_messages(self) -> int:
        """Password messages received at all: 0 proves no token left a client."""
        return self._password_messages

    @property
    def open_connections(self) -> int:
        """Client connections open now, at any stage."""
        return len(self._connections)

    @property
    def connections_total(self) -> int:
        """Client connections accepted since start."""
        return self._connections_total

    @property
    def backend_connections_total(self) -> int:
        """Connections opened to the backend (logins and cancel requests)."""
        return self._backend_connections_total

    def relayed_connections(self) -> list[RelayedConnection]:
        """The connections being relayed now, oldest first."""
        relayed = [conn.relayed for conn in self._connections if conn.relayed is not None]
        return sorted(relayed, key=lambda item: item.opened_at)

    @property
    def login_attempts_per_second(self) -> dict[int, int]:
        """Login attempts (password messages) by clock second (Unix time)."""
        return dict(sorted(self._attempts.items()))

    @property
    def max_login_attempts_in_one_second(self) -> int:
        """The most login attempts seen in any one clock second."""
        return max(self._attempts.values(), default=0)

    # -- faults -------------------------------------------------------------------------------

    def reject_next(self, n: int = 1) -> None:
        """Reject the next `n` logins whatever their token (reason ``"fault_reject"``)."""
        if n < 0:
            raise ConfigurationError("reject_next() takes n >= 0")
        self._reject_next += n

    def throttle_next(self, n: int = 1) -> None:
        """Refuse the next `n` logins as over the connection rate (reason ``"throttled"``).

        In DSQL mode the refusal is SQLSTATE 53400; for RDS it is the PAM failure.
        """
        if n < 0:
            raise ConfigurationError("throttle_next() takes n >= 0")
        self._throttle_next += n

    def fail_next_commits(self, n: int = 1) -> None:
        """Fail the next `n` COMMITs with SQLSTATE 40001, rolling them back (DSQL mode only).

        This is what DSQL answers when a transaction conflicts with another one.
        """
        self._require_dsql("fail_next_commits")
        if n < 0:
            raise ConfigurationError("fail_next_commits() takes n >= 0")
        self._fail_commits += n

    def drop_next_commits(self, n: int = 1) -> None:
        """Pass the next `n` COMMITs to the backend, then drop the client (DSQL mode only).

        The transaction commits but the client never hears so: its outcome is unknown to it.
        """
        self._require_dsql("drop_next_commits")
        if n < 0:
            raise ConfigurationError("drop_next_commits() takes n >= 0")
        self._drop_commits += n

    @property
    def commits_failed(self) -> int:
        """COMMITs failed with 40001 by `fail_next_commits`."""
        return self._commits_failed

    @property
    def commits_dropped(self) -> int:
        """COMMITs during which `drop_next_commits` dropped the client."""
        return self._commits_dropped

    def _require_dsql(self, what: str) -> None:
        if not self._dsql:
            raise ConfigurationError(
                f"{what}() needs the emulator in DSQL mode: pass dsql=True or a DSQL endpoint"
            )

    def drop_all_connections(self) -> int:
        """Abort every open client connection (and its backend); return how many."""
        connections = list(self._connections)
        for conn in connections:
            conn.abort()
        if connections:
            logger.debug("dropped %d connections", len(connections))
        return len(connections)

    def pause_accepting(self) -> None:
        """Hold new connections unanswered (as a saturated server does) until resumed."""
        self._accepting.clear()

    def resume_accepting(self) -> None:
        """Serve held and new connections again."""
        self._accepting.set()

    @property
    def accepting(self) -> bool:
        """Whether new connections are served."""
        return self._accepting.is_set()

    # -- the protocol -------------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        conn = _Connection(writer)
        self._connections.add(conn)
        self._connections_total += 1
        peer = writer.get_extra_info("peername")
        peer_port = peer[1] if isinstance(peer, tuple) and len(peer) >= 2 else None
        try:
            await self._accepting.wait()
            await self._serve(conn, reader, writer, peer_port)
        except _Refused:
            pass
        except ProtocolViolation as exc:
            logger.debug("protocol violation from port %s: %s", peer_port, exc)
            await self._send_quietly(writer, encode_error(str(exc), sqlstate="08P01"))
        except (
            asyncio.IncompleteReadError,
            ConnectionError,
            ssl.SSLError,
            asyncio.TimeoutError,
        ) as exc:
            logger.debug("connection from port %s ended: %s", peer_port, type(exc).__name__)
        except asyncio.CancelledError:
            pass
        except Exception:
            logger.warning("emulator connection handler failed", exc_info=True)
        finally:
            self._connections.discard(conn)
            if conn.backend is not None:
                conn.backend.close()
            writer.close()
            if task is not None:
                self._tasks.discard(task)

    async def _send_quietly(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        with contextlib.suppress(Exception):
            writer.write(data)
            await asyncio.wait_for(writer.drain(), 1.0)

    async def _serve(
        self,
        conn: _Connection,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        peer_port: int | None,
    ) -> None:
        tls = False
        gss_declined = False
        while True:
            packet = await asyncio.wait_for(read_startup_packet(reader), self._login_timeout)
            if packet.code == SSL_REQUEST_CODE and not tls:
                if packet.body:
                    raise ProtocolViolation("invalid length of SSL request packet")
                writer.write(b"S")
                await writer.drain()
                if reader._buffer:  # type: ignore[attr-defined]
                    # Bytes sent before the handshake would be injected into the TLS stream.
                    raise ProtocolViolation("received unencrypted data after SSL request")
                await asyncio.wait_for(
                    _start_tls(writer, self._server_ssl_context), self._login_timeout
                )
                tls = True
                continue
            if packet.code == GSSENC_REQUEST_CODE and not tls and not gss_declined:
                writer.write(b"N")
                await writer.drain()
                gss_declined = True
                continue
            break
        if packet.code == CANCEL_REQUEST_CODE:
            await self._relay_cancel(packet)
            return
        if packet.code != PROTOCOL_V3:
            raise ProtocolViolation(
                f"unsupported frontend protocol {packet.code >> 16}.{packet.code & 0xFFFF}: "
                "server supports 3.0"
            )
        params = packet.parameters()
        user = params.get("user")
        if not user:
            await self._send_quietly(
                writer,
                encode_error(
                    "no PostgreSQL user name specified in startup packet", sqlstate="28000"
                ),
            )
            raise _Refused
        database = params.get("database") or user
        if not tls:
            peer = writer.get_extra_info("peername")
            host = peer[0] if isinstance(peer, tuple) else "[local]"
            message = _PLAINTEXT.format(host=host, user=user, database=database)
            self._record(user, database, False, "plaintext", "startup without TLS", None, peer_port)
            await self._send_quietly(writer, encode_error(message, sqlstate="28000"))
            raise _Refused

        writer.write(encode_auth_request(3))
        await writer.drain()
        try:
            verdict = await asyncio.wait_for(self._authenticate(reader, user), self._login_timeout)
        except ProtocolViolation as exc:
            self._record(user, database, False, "protocol_violation", str(exc), None, peer_port)
            raise
        if not verdict.accepted:
            self._record(user, database, False, verdict.reason, verdict.detail, verdict, peer_port)
            if self._dsql and verdict.reason == "throttled":
                error = encode_error(_DSQL_THROTTLED, sqlstate="53400")
            elif self._dsql:
                error = encode_error(_DSQL_DENIED.format(user=user), sqlstate="28000")
            else:
                error = encode_error(_PAM_FAILED.format(user=user), sqlstate="28000")
            await self._send_quietly(writer, error)
            raise _Refused

        self._backend_connections_total += 1
        try:
            session = await open_backend(
                self._backend_host, self._backend_port, params, password=self._backend_password
            )
        except BackendError as exc:
            self._record(user, database, False, "backend_error", str(exc), verdict, peer_port)
            payload = exc.raw or encode_error(str(exc), sqlstate="08006")
            await self._send_quietly(writer, payload)
            raise _Refused from None
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError) as exc:
            detail = f"backend {self._backend_host}:{self._backend_port} unreachable: {exc!r}"
            self._record(user, database, False, "backend_unavailable", detail, verdict, peer_port)
            await self._send_quietly(writer, encode_error(detail, sqlstate="08006"))
            raise _Refused from None
        conn.backend = session.writer
        conn.relayed = RelayedConnection(user, database, session.pid, self._clock.now(), peer_port)
        self._record(user, database, True, "ok", verdict.detail, verdict, peer_port, session.pid)
        writer.write(session.greeting)
        await writer.drain()
        await self._relay(reader, writer, session.reader, session.writer)

    async def _authenticate(self, reader: asyncio.StreamReader, user: str) -> Verdict:
        header = await reader.readexactly(5)
        kind = header[:1]
        if kind != b"p":
            raise ProtocolViolation(f"expected password response, got message type {kind!r}")
        self._password_messages += 1
        (length,) = struct.unpack("!i", header[1:])
        if length < 5 or length - 4 > self._max_password_length:
            raise ProtocolViolation(
                f"invalid password message length {length} (at most "
                f"{self._max_password_length} bytes)"
            )
        payload = await reader.readexactly(length - 4)
        second = int(self._clock.now().timestamp())
        self._attempts[second] += 1
        if self.latency > 0:
            await self._clock.sleep(self.latency)
        if not payload.endswith(b"\x00") or b"\x00" in payload[:-1]:
            return Verdict(False, "malformed_token", "the password message is not one string")
        try:
            token = payload[:-1].decode("utf-8")
        except UnicodeDecodeError:
            return Verdict(False, "malformed_token", "the password is not UTF-8")
        if self._reject_next > 0:
            self._reject_next -= 1
            return Verdict(False, "fault_reject", "rejected by reject_next()")
        if self._throttle_next > 0:
            self._throttle_next -= 1
            return Verdict(False, "throttled", "throttled by throttle_next()")
        limit = self.max_logins_per_second
        if limit is not None and self._attempts[second] > limit:
            return Verdict(False, "throttled", f"more than {limit} login attempts in one second")
        if self._accept_any_password:
            return Verdict(True, "ok", "accept_any_password: token not checked")
        now = self._clock.now() + dt.timedelta(seconds=self.clock_offset)
        if self._dsql:
            verdict = verify_dsql_token(
                token,
                user=user,
                endpoint=self._endpoint,
                region=self._region,
                keys=_KeyBook(self._keys, self._key_sources),
                now=now,
                max_clock_skew=self._max_clock_skew,
            )
        else:
            verdict = verify_token(
                token,
                user=user,
                endpoint=self._endpoint,
                port=self.endpoint_port,
                region=self._region,
                keys=_KeyBook(self._keys, self._key_sources),
                now=now,
                max_clock_skew=self._max_clock_skew,
            )
        if verdict.accepted and user not in self._iam_users:
            return Verdict(
                False,
                "user_not_iam_enabled",
                f"user {user!r} is not enabled for IAM (enable_iam_user / "
                f"{'AWS IAM GRANT' if self._dsql else 'GRANT rds_iam'})",
                verdict.access_key,
                verdict.token_age,
            )
        return verdict

    async def _relay_cancel(self, packet: StartupPacket) -> None:
        pid, _ = packet.cancel_target()
        self._backend_connections_total += 1
        logger.debug("relaying a cancel request for backend pid %s", pid)
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(self._backend_host, self._backend_port), 10.0
        )
        try:
            writer.write(packet.raw)
            await writer.drain()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(reader.read(), 10.0)
        finally:
            writer.close()

    async def _relay(
        self,
        client_reader: asyncio.StreamReader,
        client_writer: asyncio.StreamWriter,
        backend_reader: asyncio.StreamReader,
        backend_writer: asyncio.StreamWriter,
    ) -> None:
        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            while True:
                data = await source.read(_RELAY_CHUNK)
                if not data:
                    return
                sink.write(data)
                await sink.drain()

        client_side = (
            self._pipe_messages(client_reader, client_writer, backend_writer)
            if self._dsql
            else pipe(client_reader, backend_writer)
        )
        upstream = asyncio.ensure_future(client_side)
        downstream = asyncio.ensure_future(pipe(backend_reader, client_writer))
        try:
            await asyncio.wait({upstream, downstream}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (upstream, downstream):
                task.cancel()
            await asyncio.gather(upstream, downstream, return_exceptions=True)
            backend_writer.close()

    async def _pipe_messages(
        self,
        source: asyncio.StreamReader,
        client_writer: asyncio.StreamWriter,
        sink: asyncio.StreamWriter,
    ) -> None:
        """Relay the client's messages one by one, applying the COMMIT faults."""
        while True:
            try:
                header = await source.readexactly(5)
            except asyncio.IncompleteReadError:
                return
            (length,) = struct.unpack("!i", header[1:])
            if length < 4:
                raise ProtocolViolation(f"invalid message length {length}")
            body = await source.readexactly(length - 4)
            if header[:1] == b"Q" and (self._fail_commits or self._drop_commits):
                query = body.rstrip(b"\x00").strip().rstrip(b";").strip().upper()
                if query in _COMMIT_QUERIES:
                    if self._drop_commits:
                        self._drop_commits -= 1
                        self._commits_dropped += 1
                        # The backend gets the COMMIT (and commits); the client never hears.
                        client_writer.transport.abort()
                        sink.write(header + body)
                        await sink.drain()
                        return
                    self._fail_commits -= 1
                    self._commits_failed += 1
                    body = _CONFLICT_QUERY
                    header = b"Q" + struct.pack("!i", len(body) + 4)
            sink.write(header + body)
            await sink.drain()

    def _record(
        self,
        user: str | None,
        database: str | None,
        accepted: bool,
        reason: str,
        detail: str,
        verdict: Verdict | None,
        peer_port: int | None,
        backend_pid: int | None = None,
    ) -> None:
        record = LoginRecord(
            at=self._clock.now(),
            user=user,
            database=database,
            accepted=accepted,
            reason=reason,
            detail=detail,
            token_age=verdict.token_age if verdict else None,
            access_key=verdict.access_key if verdict else None,
            backend_pid=backend_pid,
            peer_port=peer_port,
        )
        self.records.append(record)
        if accepted:
            self._logins_accepted += 1
        else:
            self._logins_rejected += 1
        logger.debug(
            "login user=%s database=%s accepted=%s reason=%s detail=%s",
            user,
            database,
            accepted,
            reason,
            detail,
        )


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)
