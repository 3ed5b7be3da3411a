"""Loopback TCP plumbing shared by the emulator and the failover endpoints.

`StreamListener` runs one handler task per accepted connection and ends them all on stop;
`relay()` copies bytes both ways between a client and a backend until either side ends;
`start_tls()` upgrades a server-side stream (Python 3.10 has no ``StreamWriter.start_tls``);
`send_quietly()` writes a last message to a peer that may already be gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import sys
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

__all__ = ["RELAY_CHUNK", "StreamListener", "relay", "send_quietly", "start_tls"]

RELAY_CHUNK = 1 << 16

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class StreamListener:
    """A TCP server that tracks the task serving each connection, so `stop()` can end them."""

    def __init__(self, handler: Handler, *, host: str, port: int, name: str) -> None:
        self._handler = handler
        self._host = host
        self._listen_port = port
        self._name = name
        self._port: int | None = None
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def started(self) -> bool:
        """Whether it is listening."""
        return self._server is not None

    @property
    def host(self) -> str:
        """The address it listens on."""
        return self._host

    @property
    def bound_port(self) -> int | None:
        """The port it listens on, None until it first started."""
        return self._port

    @property
    def port(self) -> int:
        """The port it listens on (known once started)."""
        if self._port is None:
            raise RuntimeError(f"the {self._name} is not started: await start() first")
        return self._port

    @property
    def active(self) -> int:
        """Connections being served now."""
        return len(self._tasks)

    async def start(self) -> None:
        """Start listening."""
        if self._server is not None:
            raise RuntimeError(f"the {self._name} is already started")
        self._server = await asyncio.start_server(self._serve, self._host, self._listen_port)
        self._port = self._server.sockets[0].getsockname()[1]

    async def stop(self, cut: Callable[[], object] = lambda: None) -> bool:
        """Stop listening, call `cut` to abort connections, and wait for every handler.

        Return False when it was not listening.
        """
        server, self._server = self._server, None
        if server is None:
            return False
        server.close()
        cut()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()
        return True

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            await self._handler(reader, writer)
        finally:
            if task is not None:
                self._tasks.discard(task)


async def _pipe(
    source: asyncio.StreamReader, sink: asyncio.StreamWriter, flowing: asyncio.Event | None = None
) -> None:
    with contextlib.suppress(ConnectionError):
        while True:
            if flowing is not None:
                await flowing.wait()  # held: bytes wait in the socket buffers, still acked
            data = await source.read(RELAY_CHUNK)
            if flowing is not None:
                await flowing.wait()  # read just before the silence began: hold it too
            if not data:
                return
            sink.write(data)
            await sink.drain()


async def relay(
    client_reader: asyncio.StreamReader,
    client_writer: asyncio.StreamWriter,
    backend_reader: asyncio.StreamReader,
    backend_writer: asyncio.StreamWriter,
    *,
    upstream: Coroutine[Any, Any, None] | None = None,
    flowing: asyncio.Event | None = None,
) -> None:
    """Copy bytes both ways until one direction ends; `upstream` replaces client-to-backend.

    While `flowing` is clear, nothing is copied (either way) and no end is noticed.
    """
    client_side = (
        upstream if upstream is not None else _pipe(client_reader, backend_writer, flowing)
    )
    up = asyncio.ensure_future(client_side)
    down = asyncio.ensure_future(_pipe(backend_reader, client_writer, flowing))
    try:
        await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (up, down):
            task.cancel()
        await asyncio.gather(up, down, return_exceptions=True)


async def start_tls(writer: asyncio.StreamWriter, context: ssl.SSLContext) -> None:
    """Upgrade the server side of `writer`'s connection to TLS."""
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


async def send_quietly(writer: asyncio.StreamWriter, data: bytes) -> None:
    """Write `data` and wait up to a second for it to leave; ignore a peer that is gone."""
    with contextlib.suppress(Exception):
        writer.write(data)
        await asyncio.wait_for(writer.drain(), 1.0)
