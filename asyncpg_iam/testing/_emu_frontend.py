"""The emulator's PostgreSQL-protocol front: one client connection from first byte to relay.

`Frontend.handle` negotiates TLS (refusing plaintext as RDS does), asks for a cleartext
password, has the `LoginChecker` decide it (after the fault switches had their say), logs in
to the backend, and relays. In DSQL mode the client's messages are read one by one so the
commit faults can act on a ``COMMIT``; in RDS Proxy mode so that a `ProxySession` can see
what pins the session (and a startup with ``options`` is refused as the proxy refuses it).
Every outcome is recorded in the `LoginLog`.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import ssl
import struct
from dataclasses import dataclass, field
from typing import NoReturn

from .._clock import Clock
from ._emu_backend import BackendError, BackendSession, open_backend
from ._emu_faults import FaultSwitches
from ._emu_login import Login, LoginChecker, decode_password
from ._emu_records import LoginLog, RelayedConnection, refusal
from ._emu_verify import Verdict
from ._proxy import OPTIONS_REFUSED, ProxyLog, ProxySession
from ._streams import relay, send_quietly, start_tls
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

__all__ = ["Frontend", "FrontendSettings"]

logger = logging.getLogger("asyncpg_iam.testing.emulator")

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
_PASSWORD_FAILED = 'password authentication failed for user "{user}"'
# Reasons a password login (a user outside rds_iam) is refused; PostgreSQL's message for them.
_PASSWORD_REASONS = frozenset({"password_mismatch", "password_unchecked"})
_PLAINTEXT = (
    'pg_hba.conf rejects connection for host "{host}", user "{user}", database "{database}", '
    "SSL off"
)


@dataclass(frozen=True, slots=True)
class FrontendSettings:
    """Where the backend is and how the front behaves."""

    backend_host: str
    backend_port: int
    backend_password: str | None = field(repr=False)
    ssl_context: ssl.SSLContext
    login_timeout: float
    max_password_length: int
    dsql: bool


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


@dataclass(frozen=True, slots=True)
class _Client:
    """The client of one connection, as far as a login is concerned."""

    conn: _Connection
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    peer_port: int | None


class _Refused(Exception):
    """Ends a connection after an error response has been sent."""


class Frontend:
    """Serves client connections: TLS, login, backend, relay."""

    def __init__(
        self,
        settings: FrontendSettings,
        *,
        checker: LoginChecker,
        faults: FaultSwitches,
        log: LoginLog,
        clock: Clock,
        proxy: ProxyLog | None = None,
    ) -> None:
        self._settings = settings
        self._proxy = proxy
        self._checker = checker
        self._faults = faults
        self._log = log
        self._clock = clock
        self._connections: set[_Connection] = set()

    # -- the open connections -----------------------------------------------------------------

    @property
    def open_connections(self) -> int:
        """Client connections open now, at any stage."""
        return len(self._connections)

    def relayed_connections(self) -> list[RelayedConnection]:
        """The connections being relayed now, oldest first."""
        relayed = [conn.relayed for conn in self._connections if conn.relayed is not None]
        return sorted(relayed, key=lambda item: item.opened_at)

    def drop_all_connections(self) -> int:
        """Abort every open client connection (and its backend); return how many."""
        connections = list(self._connections)
        for conn in connections:
            conn.abort()
        if connections:
            logger.debug("dropped %d connections", len(connections))
        return len(connections)

    def silence_all_connections(self) -> int:
        """Stop relaying on every open connection without closing it; return how many.

        As after a NAT's idle drop or a frozen peer: no FIN, no RST, no answer; a client
        notices only by a timeout. The sockets close when the emulator stops.
        """
        connections = list(self._connections)
        for conn in connections:
            for writer in (conn.client, conn.backend):
                if writer is not None and not writer.transport.is_closing():
                    # A socket or TLS transport, which reads as well (typed as a writer's).
                    writer.transport.pause_reading()  # type: ignore[attr-defined]
        if connections:
            logger.debug("silenced %d connections", len(connections))
        return len(connections)

    # -- one connection -----------------------------------------------------------------------

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Serve one client connection until it ends; never raises."""
        conn = _Connection(writer)
        self._connections.add(conn)
        self._log.connections_total += 1
        peer = writer.get_extra_info("peername")
        peer_port = peer[1] if isinstance(peer, tuple) and len(peer) >= 2 else None
        try:
            await self._faults.accepting.wait()
            await self._serve(_Client(conn, reader, writer, peer_port))
        except _Refused:
            pass
        except ProtocolViolation as exc:
            logger.debug("protocol violation from port %s: %s", peer_port, exc)
            await send_quietly(writer, encode_error(str(exc), sqlstate="08P01"))
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

    async def _serve(self, client: _Client) -> None:
        packet, tls = await self._negotiate(client)
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
            message = "no PostgreSQL user name specified in startup packet"
            await send_quietly(client.writer, encode_error(message, sqlstate="28000"))
            raise _Refused
        database = params.get("database") or user
        if not tls:
            await self._refuse_plaintext(client, user, database)
        if self._proxy is not None and "options" in params:
            self._proxy.options_refused += 1
            await send_quietly(client.writer, encode_error(OPTIONS_REFUSED, sqlstate="0A000"))
            raise _Refused
        login = await self._login(client, user, database)
        session = await self._open_backend(client, params, login)
        client.conn.backend = session.writer
        client.conn.relayed = RelayedConnection(
            user, database, session.pid, self._clock.now(), client.peer_port
        )
        self._log.record(
            user, database, login.verdict, peer_port=client.peer_port, backend_pid=session.pid
        )
        client.writer.write(session.greeting)
        await client.writer.drain()
        await self._relay(client, session)

    async def _negotiate(self, client: _Client) -> tuple[StartupPacket, bool]:
        """Answer SSL and GSSENC requests until a startup or cancel packet; say if TLS is on."""
        reader, writer = client.reader, client.writer
        tls = False
        gss_declined = False
        while True:
            timeout = self._settings.login_timeout
            packet = await asyncio.wait_for(read_startup_packet(reader), timeout)
            if packet.code == SSL_REQUEST_CODE and not tls:
                if packet.body:
                    raise ProtocolViolation("invalid length of SSL request packet")
                writer.write(b"S")
                await writer.drain()
                if reader._buffer:  # type: ignore[attr-defined]
                    # Bytes sent before the handshake would be injected into the TLS stream.
                    raise ProtocolViolation("received unencrypted data after SSL request")
                await asyncio.wait_for(start_tls(writer, self._settings.ssl_context), timeout)
                tls = True
                continue
            if packet.code == GSSENC_REQUEST_CODE and not tls and not gss_declined:
                writer.write(b"N")
                await writer.drain()
                gss_declined = True
                continue
            return packet, tls

    async def _refuse_plaintext(self, client: _Client, user: str, database: str) -> NoReturn:
        peer = client.writer.get_extra_info("peername")
        host = peer[0] if isinstance(peer, tuple) else "[local]"
        message = _PLAINTEXT.format(host=host, user=user, database=database)
        verdict = Verdict(False, "plaintext", "startup without TLS")
        self._log.record(user, database, verdict, peer_port=client.peer_port)
        await send_quietly(client.writer, encode_error(message, sqlstate="28000"))
        raise _Refused

    async def _login(self, client: _Client, user: str, database: str) -> Login:
        """Ask for the password and decide it; refuse the client unless it is accepted."""
        client.writer.write(encode_auth_request(3))
        await client.writer.drain()
        try:
            login = await asyncio.wait_for(
                self._authenticate(client.reader, user), self._settings.login_timeout
            )
        except ProtocolViolation as exc:
            verdict = Verdict(False, "protocol_violation", str(exc))
            self._log.record(user, database, verdict, peer_port=client.peer_port)
            raise
        if not login.verdict.accepted:
            await self._refuse(client, user, database, login.verdict)
        return login

    async def _open_backend(
        self, client: _Client, params: dict[str, str], login: Login
    ) -> BackendSession:
        """Log in to the backend as the client's user; refuse the client if that fails."""
        settings = self._settings
        self._log.backend_connections_total += 1
        password = settings.backend_password if login.password is None else login.password
        user, database = params["user"], params.get("database") or params["user"]
        try:
            session = await open_backend(
                settings.backend_host, settings.backend_port, params, password=password
            )
        except BackendError as exc:
            await self._backend_failed(client, user, database, login, "backend_error", exc)
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError) as exc:
            await self._backend_failed(client, user, database, login, "backend_unavailable", exc)
        if login.backend_must_check and not session.password_checked:
            session.writer.close()
            detail = (
                f"the backend trusts {user!r} and backend_user cannot read its password "
                "verifier: the password could not be checked"
            )
            await self._refuse(client, user, database, Verdict(False, "password_unchecked", detail))
        return session

    async def _backend_failed(
        self, client: _Client, user: str, database: str, login: Login, reason: str, exc: Exception
    ) -> NoReturn:
        if isinstance(exc, BackendError):
            detail = str(exc)
            payload = exc.raw or encode_error(detail, sqlstate="08006")
        else:
            address = f"{self._settings.backend_host}:{self._settings.backend_port}"
            detail = f"backend {address} unreachable: {exc!r}"
            payload = encode_error(detail, sqlstate="08006")
        verdict = refusal(login.verdict, reason, detail)
        self._log.record(user, database, verdict, peer_port=client.peer_port)
        await send_quietly(client.writer, payload)
        raise _Refused from None

    async def _refuse(
        self, client: _Client, user: str, database: str, verdict: Verdict
    ) -> NoReturn:
        self._log.record(user, database, verdict, peer_port=client.peer_port)
        if self._settings.dsql and verdict.reason == "throttled":
            error = encode_error(_DSQL_THROTTLED, sqlstate="53400")
        elif self._settings.dsql:
            error = encode_error(_DSQL_DENIED.format(user=user), sqlstate="28000")
        elif verdict.reason in _PASSWORD_REASONS:
            error = encode_error(_PASSWORD_FAILED.format(user=user), sqlstate="28P01")
        else:
            error = encode_error(_PAM_FAILED.format(user=user), sqlstate="28000")
        await send_quietly(client.writer, error)
        raise _Refused

    async def _authenticate(self, reader: asyncio.StreamReader, user: str) -> Login:
        payload = await self._read_password_message(reader)
        attempts = self._log.count_attempt()
        if self._faults.latency > 0:
            await self._clock.sleep(self._faults.latency)
        password = decode_password(payload)
        if isinstance(password, Verdict):
            return Login(password)
        fault = self._faults.login_fault(attempts)
        if fault is not None:
            return Login(fault)
        now = self._clock.now() + dt.timedelta(seconds=self._faults.clock_offset)
        return await self._checker.check(password, user=user, now=now)

    async def _read_password_message(self, reader: asyncio.StreamReader) -> bytes:
        header = await reader.readexactly(5)
        kind = header[:1]
        if kind != b"p":
            raise ProtocolViolation(f"expected password response, got message type {kind!r}")
        self._log.password_messages += 1
        (length,) = struct.unpack("!i", header[1:])
        limit = self._settings.max_password_length
        if length < 5 or length - 4 > limit:
            raise ProtocolViolation(
                f"invalid password message length {length} (at most {limit} bytes)"
            )
        return await reader.readexactly(length - 4)

    # -- after the login ----------------------------------------------------------------------

    async def _relay_cancel(self, packet: StartupPacket) -> None:
        pid, _ = packet.cancel_target()
        self._log.backend_connections_total += 1
        logger.debug("relaying a cancel request for backend pid %s", pid)
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(self._settings.backend_host, self._settings.backend_port),
            10.0,
        )
        try:
            writer.write(packet.raw)
            await writer.drain()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(reader.read(), 10.0)
        finally:
            writer.close()

    async def _relay(self, client: _Client, session: BackendSession) -> None:
        upstream = None
        watch = None
        if self._proxy is not None:
            watch = self._proxy.session(client.peer_port, session.pid)
        if self._settings.dsql or watch is not None:
            upstream = self._pipe_messages(client.reader, client.writer, session.writer, watch)
        try:
            await relay(
                client.reader, client.writer, session.reader, session.writer, upstream=upstream
            )
        finally:
            session.writer.close()

    async def _pipe_messages(
        self,
        source: asyncio.StreamReader,
        client_writer: asyncio.StreamWriter,
        sink: asyncio.StreamWriter,
        watch: ProxySession | None,
    ) -> None:
        """Relay the client's messages one by one: shown to `watch`, COMMIT faults applied."""
        while True:
            try:
                header = await source.readexactly(5)
            except asyncio.IncompleteReadError:
                return
            (length,) = struct.unpack("!i", header[1:])
            if length < 4:
                raise ProtocolViolation(f"invalid message length {length}")
            body = await source.readexactly(length - 4)
            if watch is not None:
                watch.observe(header[:1], body)
            if header[:1] == b"Q" and self._faults.commit_faults_armed and _is_commit(body):
                if self._faults.take_commit_fault() == "drop":
                    # The backend gets the COMMIT (and commits); the client never hears.
                    client_writer.transport.abort()
                    sink.write(header + body)
                    await sink.drain()
                    return
                body = _CONFLICT_QUERY
                header = b"Q" + struct.pack("!i", len(body) + 4)
            sink.write(header + body)
            await sink.drain()


def _is_commit(query: bytes) -> bool:
    return query.rstrip(b"\x00").strip().rstrip(b";").strip().upper() in _COMMIT_QUERIES
