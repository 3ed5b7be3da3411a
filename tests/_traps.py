"""Listeners that stand where an attacker would: they ask for a password and record what comes.

`Trap(tls=None)` answers "N" to SSLRequest (a server, or a man in the middle, that declines TLS)
and asks for a cleartext password; `Trap(tls=<context>)` speaks TLS with a certificate that
nothing trusts, then asks for a cleartext password. Both record every byte they receive and
every password message, so a test can assert that no token ever reached them.
"""

from __future__ import annotations

import asyncio
import ssl
import struct
from typing import Any

import trustme

from asyncpg_iam.testing._streams import start_tls

_SSL_REQUEST = 80877103
_GSSENC_REQUEST = 80877104


def untrusted_server_context() -> ssl.SSLContext:
    """Return a server context with a certificate for 127.0.0.1 from a CA nobody trusts."""
    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
    return context


class Trap:
    """A PostgreSQL-looking listener on loopback that records passwords sent to it."""

    def __init__(self, *, tls: ssl.SSLContext | None = None) -> None:
        self.tls = tls
        self.connections = 0
        self.ssl_requests = 0
        self.startups = 0
        self.received = bytearray()
        self.passwords: list[bytes] = []
        self._server: asyncio.AbstractServer | None = None

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def __aenter__(self) -> Trap:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _read(self, reader: asyncio.StreamReader, n: int) -> bytes:
        data = await reader.readexactly(n)
        self.received += data
        return data

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                (length,) = struct.unpack("!i", await self._read(reader, 4))
                body = await self._read(reader, length - 4)
                code = struct.unpack("!i", body[:4])[0] if len(body) >= 4 else 0
                if code == _SSL_REQUEST:
                    self.ssl_requests += 1
                    if self.tls is None:
                        writer.write(b"N")
                        await writer.drain()
                        continue
                    writer.write(b"S")
                    await writer.drain()
                    await start_tls(writer, self.tls)
                    continue
                if code == _GSSENC_REQUEST:
                    writer.write(b"N")
                    await writer.drain()
                    continue
                break
            self.startups += 1
            writer.write(b"R" + struct.pack("!ii", 8, 3))  # AuthenticationCleartextPassword
            await writer.drain()
            kind = await self._read(reader, 1)
            (length,) = struct.unpack("!i", await self._read(reader, 4))
            payload = await self._read(reader, length - 4)
            if kind == b"p":
                self.passwords.append(payload)
            writer.write(_error("28000", "trap: no login here"))
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError, OSError):
            pass
        finally:
            writer.close()

    def summary(self) -> dict[str, Any]:
        """What the trap saw (no payloads): for assertion messages."""
        return {
            "connections": self.connections,
            "ssl_requests": self.ssl_requests,
            "startups": self.startups,
            "passwords": len(self.passwords),
        }


def _error(sqlstate: str, message: str) -> bytes:
    fields = b"SFATAL\x00" + b"C" + sqlstate.encode() + b"\x00M" + message.encode() + b"\x00\x00"
    return b"E" + struct.pack("!i", len(fields) + 4) + fields
