"""The few PostgreSQL wire-protocol (v3) messages the emulator reads and writes.

Only what a front in front of a real server needs: the untyped first packet of a connection
(SSLRequest, GSSENCRequest, CancelRequest, StartupMessage), typed messages with a length cap,
and the encoders for authentication requests and error responses.
"""

from __future__ import annotations

import asyncio
import struct
from dataclasses import dataclass, field

__all__ = [
    "CANCEL_REQUEST_CODE",
    "GSSENC_REQUEST_CODE",
    "MAX_STARTUP_PACKET_LENGTH",
    "PROTOCOL_V3",
    "SSL_REQUEST_CODE",
    "ProtocolViolation",
    "StartupPacket",
    "encode_auth_request",
    "encode_error",
    "encode_message",
    "encode_startup",
    "parse_error_fields",
    "read_message",
    "read_startup_packet",
]

SSL_REQUEST_CODE = 80877103
GSSENC_REQUEST_CODE = 80877104
CANCEL_REQUEST_CODE = 80877102
PROTOCOL_V3 = 196608
# PostgreSQL's own cap (MAX_STARTUP_PACKET_LENGTH in libpq/pqcomm.h).
MAX_STARTUP_PACKET_LENGTH = 10000

_INT32 = struct.Struct("!i")
_TWO_INT32 = struct.Struct("!ii")


class ProtocolViolation(Exception):
    """The peer sent bytes that are not a valid message here; the message is safe to show."""


@dataclass(frozen=True, slots=True)
class StartupPacket:
    """The first packet of a connection: `code` is the protocol version or a request code."""

    code: int
    body: bytes = field(repr=False)

    @property
    def raw(self) -> bytes:
        """Return the packet as it travels on the wire."""
        return _TWO_INT32.pack(len(self.body) + 8, self.code) + self.body

    def parameters(self) -> dict[str, str]:
        """Parse the name/value pairs of a StartupMessage."""
        body = self.body
        if not body.endswith(b"\x00"):
            raise ProtocolViolation(
                "invalid startup packet layout: expected terminator as last byte"
            )
        parts = body[:-1].split(b"\x00")
        if parts and parts[-1] == b"":
            parts.pop()
        if len(parts) % 2:
            raise ProtocolViolation("invalid startup packet layout: expected name/value pairs")
        params: dict[str, str] = {}
        try:
            for index in range(0, len(parts), 2):
                name = parts[index].decode("utf-8")
                if not name:
                    raise ProtocolViolation("invalid startup packet layout: empty parameter name")
                params[name] = parts[index + 1].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ProtocolViolation("invalid startup packet: parameters are not UTF-8") from exc
        return params

    def cancel_target(self) -> tuple[int, int]:
        """Return (backend pid, secret key) of a CancelRequest."""
        if len(self.body) != 8:
            raise ProtocolViolation("invalid length of cancel request packet")
        pid, secret = _TWO_INT32.unpack(self.body)
        return pid, secret


async def read_startup_packet(reader: asyncio.StreamReader) -> StartupPacket:
    """Read one untyped first packet; raise `ProtocolViolation` on a bad length."""
    header = await reader.readexactly(8)
    length, code = _TWO_INT32.unpack(header)
    if length < 8 or length > MAX_STARTUP_PACKET_LENGTH:
        raise ProtocolViolation("invalid length of startup packet")
    body = await reader.readexactly(length - 8)
    return StartupPacket(code=code, body=body)


async def read_message(reader: asyncio.StreamReader, *, max_length: int) -> tuple[bytes, bytes]:
    """Read one typed message and return (type byte, payload)."""
    header = await reader.readexactly(5)
    kind = header[:1]
    (length,) = _INT32.unpack(header[1:])
    if length < 4:
        raise ProtocolViolation("invalid message length")
    if length - 4 > max_length:
        raise ProtocolViolation(f"message of type {kind!r} is too long ({length - 4} bytes)")
    payload = await reader.readexactly(length - 4)
    return kind, payload


def encode_message(kind: bytes, payload: bytes) -> bytes:
    """Frame a typed message."""
    return kind + _INT32.pack(len(payload) + 4) + payload


def encode_startup(params: dict[str, str]) -> bytes:
    """Encode a v3 StartupMessage carrying `params`."""
    body = b"".join(
        name.encode("utf-8") + b"\x00" + value.encode("utf-8") + b"\x00"
        for name, value in params.items()
    )
    return StartupPacket(code=PROTOCOL_V3, body=body + b"\x00").raw


def encode_auth_request(code: int, extra: bytes = b"") -> bytes:
    """Encode an Authentication message (0 = ok, 3 = cleartext password)."""
    return encode_message(b"R", _INT32.pack(code) + extra)


def encode_error(message: str, *, sqlstate: str, severity: str = "FATAL") -> bytes:
    """Encode an ErrorResponse with fields S, V, C and M."""
    fields = [(b"S", severity), (b"V", severity), (b"C", sqlstate), (b"M", message)]
    payload = b"".join(code + value.encode("utf-8") + b"\x00" for code, value in fields)
    return encode_message(b"E", payload + b"\x00")


def parse_error_fields(payload: bytes) -> dict[str, str]:
    """Parse the fields of an ErrorResponse or NoticeResponse payload."""
    fields: dict[str, str] = {}
    for part in payload.split(b"\x00"):
        if part:
            fields[part[:1].decode("ascii", "replace")] = part[1:].decode("utf-8", "replace")
    return fields
