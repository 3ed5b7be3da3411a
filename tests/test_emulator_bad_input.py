"""Bad input to the emulator: a protocol error or a closed socket, never a crash or a backend."""

from __future__ import annotations

import asyncio
import random
import ssl
import struct

import asyncpg
import pytest

from asyncpg_iam.testing import RDSIAMEmulator
from tests.conftest import TokenFactory

SSL_REQUEST = struct.pack("!ii", 8, 80877103)
GSSENC_REQUEST = struct.pack("!ii", 8, 80877104)


def startup(**params: str) -> bytes:
    body = b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in params.items()) + b"\0"
    return struct.pack("!ii", len(body) + 8, 196608) + body


async def read_all(reader: asyncio.StreamReader) -> bytes:
    """Read until the emulator closes (the timeout guards against a hang, it is not measured)."""
    return await asyncio.wait_for(reader.read(), 20)


async def plaintext_exchange(emulator: RDSIAMEmulator, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection(emulator.host, emulator.port)
    try:
        writer.write(data)
        await writer.drain()
        writer.write_eof()
        return await read_all(reader)
    finally:
        writer.close()


async def tls_session(
    emulator: RDSIAMEmulator,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(emulator.host, emulator.port)
    writer.write(SSL_REQUEST)
    await writer.drain()
    assert await reader.readexactly(1) == b"S"
    await writer.start_tls(emulator.client_ssl_context(), server_hostname="127.0.0.1")
    return reader, writer


async def tls_login_exchange(emulator: RDSIAMEmulator, after_auth_request: bytes) -> bytes:
    """Start a TLS login as postgres, wait for the password request, send bytes, read the rest."""
    reader, writer = await tls_session(emulator)
    try:
        writer.write(startup(user="postgres", database="postgres"))
        await writer.drain()
        assert await reader.readexactly(9) == b"R" + struct.pack("!ii", 8, 3)
        writer.write(after_auth_request)
        await writer.drain()
        return await read_all(reader)
    finally:
        writer.close()


def error_fields(data: bytes) -> dict[str, str]:
    assert data[:1] == b"E", data[:40]
    (length,) = struct.unpack("!i", data[1:5])
    fields = {}
    for part in data[5 : 1 + length].split(b"\0"):
        if part:
            fields[part[:1].decode()] = part[1:].decode()
    return fields


async def assert_still_serves(emulator: RDSIAMEmulator, make_token: TokenFactory) -> None:
    assert emulator.backend_connections_total == 0
    assert emulator.logins_accepted == 0
    conn = await asyncpg.connect(
        password=make_token(), **emulator.connect_kwargs(user="postgres"), timeout=30
    )
    assert await conn.fetchval("SELECT 1") == 1
    await conn.close()
    assert emulator.backend_connections_total == 1


@pytest.mark.parametrize(
    ("data", "sqlstate"),
    [
        pytest.param(
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(40), "08P01", id="tls-hello"
        ),
        pytest.param(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "08P01", id="http"),
        pytest.param(struct.pack("!ii", 4, 196608), "08P01", id="length-below-header"),
        pytest.param(struct.pack("!ii", 0x7FFFFFFF, 196608), "08P01", id="length-huge"),
        pytest.param(struct.pack("!ii", 12, 0x00020000) + bytes(4), "08P01", id="protocol-2"),
        pytest.param(struct.pack("!ii", 16, 196608) + b"user\0pos", "08P01", id="no-terminator"),
        pytest.param(struct.pack("!ii", 14, 196608) + b"user\0\0", "08P01", id="odd-pairs"),
        pytest.param(
            struct.pack("!ii", 16, 196608) + b"\xff\xfe\0x\0\0\0\0", "08P01", id="bad-utf8"
        ),
        pytest.param(startup(database="postgres"), "28000", id="no-user"),
        pytest.param(startup(user="", database="postgres"), "28000", id="empty-user"),
        pytest.param(struct.pack("!ii", 12, 80877102) + bytes(4), "08P01", id="short-cancel"),
        pytest.param(SSL_REQUEST[:-1] + b"\x08", "08P01", id="unknown-request-code"),
    ],
)
async def test_malformed_startup_gets_protocol_error(
    rds_emulator: RDSIAMEmulator, make_token: TokenFactory, data: bytes, sqlstate: str
) -> None:
    """A malformed first packet gets a FATAL error and no backend connection."""
    answer = await plaintext_exchange(rds_emulator, data)
    fields = error_fields(answer)
    assert (fields["S"], fields["C"]) == ("FATAL", sqlstate)
    await assert_still_serves(rds_emulator, make_token)


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"", id="nothing"),
        pytest.param(b"\x00\x00", id="half-length"),
        pytest.param(struct.pack("!ii", 100, 196608) + b"user\0post", id="truncated-startup"),
        pytest.param(GSSENC_REQUEST + startup(user="postgres")[:10], id="gss-then-truncated"),
    ],
)
async def test_truncated_startup_closes_quietly(
    rds_emulator: RDSIAMEmulator, make_token: TokenFactory, data: bytes
) -> None:
    """A connection that ends mid-packet is closed without an answer beyond what it asked."""
    answer = await plaintext_exchange(rds_emulator, data)
    assert answer in (b"", b"N")
    await assert_still_serves(rds_emulator, make_token)


async def test_random_garbage_never_reaches_the_backend(
    rds_emulator: RDSIAMEmulator, make_token: TokenFactory
) -> None:
    """Two hundred random byte strings each get an error or a closed socket."""
    rng = random.Random(20260101)
    for _ in range(200):
        blob = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300)))
        answer = await plaintext_exchange(rds_emulator, blob)
        assert answer == b"" or answer[:1] in (b"E", b"N", b"S")
    await assert_still_serves(rds_emulator, make_token)


async def test_plaintext_garbage_after_ssl_answer_closes(
    rds_emulator: RDSIAMEmulator, make_token: TokenFactory
) -> None:
    """Bytes that are not a TLS handshake after 'S' end the connection."""
    reader, writer = await asyncio.open_connection(rds_emulator.host, rds_emulator.port)
    writer.write(SSL_REQUEST)
    await writer.drain()
    assert await reader.readexactly(1) == b"S"
    writer.write(startup(user="postgres"))
    writer.write_eof()
    await read_all(reader)
    writer.close()
    await assert_still_serves(rds_emulator, make_token)


async def test_oversized_password_is_refused_unread(
    rds_emulator: RDSIAMEmulator, make_token: TokenFactory
) -> None:
    """A password message over 8 KiB gets a protocol error and a record, not a verification."""
    header = b"p" + struct.pack("!i", 1_000_004)
    answer = await tls_login_exchange(rds_emulator, header + b"x" * 20000)
    assert error_fields(answer)["C"] == "08P01"
    assert rds_emulator.password_messages == 1
    assert rds_emulator.records[-1].reason == "protocol_violation"
    await assert_still_serves(rds_emulator, make_token)


@pytest.mark.parametrize(
    ("message", "code", "reason"),
    [
        pytest.param(b"Q\0\0\0\x0dSELECT 1\0", "08P01", "protocol_violation", id="query-first"),
        pytest.param(b"p\0\0\0\x03", "08P01", "protocol_violation", id="length-3"),
        pytest.param(b"p\0\0\0\x08abcd", "28000", "malformed_token", id="no-terminator"),
        pytest.param(b"p\0\0\0\x09ab\0d\0", "28000", "malformed_token", id="embedded-nul"),
        pytest.param(b"p\0\0\0\x08\xff\xfe\xfd\0", "28000", "malformed_token", id="not-utf8"),
        pytest.param(b"p\0\0\0\x05\0", "28000", "malformed_token", id="empty"),
    ],
)
async def test_bad_password_message_is_refused(
    rds_emulator: RDSIAMEmulator,
    make_token: TokenFactory,
    message: bytes,
    code: str,
    reason: str,
) -> None:
    """A malformed password message gets an error and a record, never a backend connection."""
    answer = await tls_login_exchange(rds_emulator, message)
    assert error_fields(answer)["C"] == code
    assert rds_emulator.records[-1].reason == reason
    await assert_still_serves(rds_emulator, make_token)


async def test_truncated_password_message_closes(
    rds_emulator: RDSIAMEmulator, make_token: TokenFactory
) -> None:
    """A client that disconnects mid-password leaves the emulator serving."""
    reader, writer = await tls_session(rds_emulator)
    writer.write(startup(user="postgres"))
    await writer.drain()
    await reader.readexactly(9)
    writer.write(b"p\0\0\0\x40partial")
    await writer.drain()
    writer.transport.abort()
    await asyncio.sleep(0)
    await assert_still_serves(rds_emulator, make_token)


async def test_second_ssl_request_inside_tls_is_an_error(
    rds_emulator: RDSIAMEmulator, make_token: TokenFactory
) -> None:
    """An SSLRequest repeated inside TLS is an unsupported protocol, not a second handshake."""
    reader, writer = await tls_session(rds_emulator)
    writer.write(SSL_REQUEST)
    await writer.drain()
    answer = await read_all(reader)
    writer.close()
    assert error_fields(answer)["C"] == "08P01"
    await assert_still_serves(rds_emulator, make_token)


async def test_gssenc_request_is_declined(
    rds_emulator: RDSIAMEmulator, make_token: TokenFactory
) -> None:
    """GSSENCRequest gets 'N' and the client may go on to ask for TLS."""
    reader, writer = await asyncio.open_connection(rds_emulator.host, rds_emulator.port)
    writer.write(GSSENC_REQUEST)
    await writer.drain()
    assert await reader.readexactly(1) == b"N"
    writer.write(SSL_REQUEST)
    await writer.drain()
    assert await reader.readexactly(1) == b"S"
    writer.close()
    await assert_still_serves(rds_emulator, make_token)


async def test_client_without_ca_cannot_complete_tls(
    rds_emulator: RDSIAMEmulator, make_token: TokenFactory
) -> None:
    """A client that does not trust the emulator's CA fails verification, and nothing leaks."""
    with pytest.raises(ssl.SSLCertVerificationError):
        await asyncpg.connect(
            host=rds_emulator.host,
            port=rds_emulator.port,
            user="postgres",
            password=make_token(),
            ssl=ssl.create_default_context(),
            timeout=30,
        )
    assert rds_emulator.password_messages == 0
    await assert_still_serves(rds_emulator, make_token)
