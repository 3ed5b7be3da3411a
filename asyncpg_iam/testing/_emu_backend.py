"""Open the emulator's connection to the real PostgreSQL behind it.

The backend is reached over plain TCP. Trust authentication is the normal case (the
throwaway cluster); cleartext, MD5 and SCRAM-SHA-256 are answered with `password` so that a
DSN or container backend with a password works too. Authentication requests from the backend
are consumed here; every other message up to ReadyForQuery (AuthenticationOk, ParameterStatus,
BackendKeyData, notices) is returned for the caller to forward to the client.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import os
import struct
from dataclasses import dataclass

from ._wire import encode_message, encode_startup, parse_error_fields, read_message

__all__ = ["BackendError", "BackendSession", "open_backend"]

_MAX_BACKEND_MESSAGE = 1 << 20


class BackendError(Exception):
    """The backend refused the login; `fields` is its ErrorResponse, `raw` the bytes to forward."""

    def __init__(self, message: str, *, raw: bytes = b"", fields: dict[str, str] | None = None):
        super().__init__(message)
        self.raw = raw
        self.fields = fields or {}


@dataclass(slots=True)
class BackendSession:
    """A logged-in backend connection and what it said before ReadyForQuery."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    pid: int | None
    greeting: bytes
    password_checked: bool = False
    """Whether the backend asked for (and so checked) the password."""


def _scram_client_final(
    password: str, client_first_bare: str, server_first: str, client_nonce: str
) -> tuple[str, bytes]:
    attrs = dict(item.split("=", 1) for item in server_first.split(","))
    nonce, salt, iterations = attrs["r"], base64.b64decode(attrs["s"]), int(attrs["i"])
    if not nonce.startswith(client_nonce):
        raise BackendError("the backend's SCRAM nonce does not extend ours")
    salted = hashlib.pbkdf2_hmac("sha256", password.encode("utf-8"), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    stored_key = hashlib.sha256(client_key).digest()
    without_proof = f"c=biws,r={nonce}"
    auth_message = f"{client_first_bare},{server_first},{without_proof}".encode()
    signature = hmac.new(stored_key, auth_message, hashlib.sha256).digest()
    proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
    server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()
    server_signature = hmac.new(server_key, auth_message, hashlib.sha256).digest()
    return f"{without_proof},p={base64.b64encode(proof).decode()}", server_signature


class _PasswordExchange:
    """Answers the backend's authentication requests with the password (cleartext, MD5, SCRAM)."""

    def __init__(self, password: str | None, *, user: str) -> None:
        self._password = password
        self._user = user
        # The SCRAM exchange so far: client nonce, client-first-bare, expected server signature.
        self._scram: tuple[str, str, bytes] | None = None
        self.asked = False

    def answer(self, code: int, payload: bytes) -> bytes | None:
        """Return the reply to authentication request `code`, or None when none is due."""
        password = self._password
        if password is None:
            raise BackendError(
                f"the backend asks for a password (auth request {code}); "
                "give the emulator backend_password or use trust authentication"
            )
        self.asked = True
        if code == 3:
            return encode_message(b"p", password.encode("utf-8") + b"\x00")
        if code == 5:
            inner = hashlib.md5((password + self._user).encode("utf-8")).hexdigest()  # noqa: S324
            outer = hashlib.md5(inner.encode("ascii") + payload[4:8]).hexdigest()  # noqa: S324
            return encode_message(b"p", b"md5" + outer.encode("ascii") + b"\x00")
        if code == 10:
            return self._scram_first(payload[4:])
        if code == 11 and self._scram is not None:
            nonce, first_bare, _ = self._scram
            final, server_sig = _scram_client_final(
                password, first_bare, payload[4:].decode(), nonce
            )
            self._scram = (nonce, first_bare, server_sig)
            return encode_message(b"p", final.encode())
        if code == 12 and self._scram is not None:
            attrs = dict(item.split("=", 1) for item in payload[4:].decode().split(",") if item)
            if not hmac.compare_digest(base64.b64decode(attrs.get("v", "")), self._scram[2]):
                raise BackendError("the backend's SCRAM server signature is wrong")
            return None
        raise BackendError(f"unsupported backend authentication request {code}")

    def _scram_first(self, mechanisms: bytes) -> bytes:
        if b"SCRAM-SHA-256" not in mechanisms.split(b"\x00"):
            raise BackendError("the backend offers no SASL mechanism we speak")
        nonce = base64.b64encode(os.urandom(18)).decode()
        first_bare = f"n=,r={nonce}"
        first = f"n,,{first_bare}".encode()
        self._scram = (nonce, first_bare, b"")
        return encode_message(b"p", b"SCRAM-SHA-256\x00" + struct.pack("!i", len(first)) + first)


async def open_backend(
    host: str,
    port: int,
    params: dict[str, str],
    *,
    password: str | None = None,
    connect_timeout: float = 10.0,
) -> BackendSession:
    """Connect and log in to the backend with the client's startup `params`."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), connect_timeout)
    try:
        writer.write(encode_startup(params))
        await writer.drain()
        exchange = _PasswordExchange(password, user=params.get("user", ""))
        greeting: list[bytes] = []
        pid: int | None = None
        while True:
            kind, payload = await read_message(reader, max_length=_MAX_BACKEND_MESSAGE)
            raw = encode_message(kind, payload)
            if kind == b"E":
                fields = parse_error_fields(payload)
                raise BackendError(fields.get("M", "backend error"), raw=raw, fields=fields)
            if kind == b"R":
                (code,) = struct.unpack("!i", payload[:4])
                if code != 0:
                    reply = exchange.answer(code, payload)
                    if reply is not None:
                        writer.write(reply)
                    await writer.drain()
                    continue
            greeting.append(raw)
            if kind == b"K" and len(payload) >= 4:
                (pid,) = struct.unpack("!i", payload[:4])
            if kind == b"Z":
                return BackendSession(reader, writer, pid, b"".join(greeting), exchange.asked)
    except BaseException:
        writer.close()
        raise
