"""A network path that can lose every packet: two network namespaces, a veth pair, nftables.

`NetworkPartition` plays a host lost without a FIN or RST (a partition, a dead instance) with
the real kernel: a client namespace and a server namespace joined by a veth pair (addresses
from 198.18.0.0/15, the range set aside for such tests, existing only inside the two
namespaces), a relay whose listening socket is in the server namespace and which forwards to a
backend on this machine's loopback, and an nftables table there whose rules drop every packet
on the link (`drop()`) or none (`restore()`). Code that should see the loss runs in the
client namespace with `run_client()` (its own thread and event loop, since a namespace belongs
to a thread).

Needs root (or CAP_NET_ADMIN and CAP_SYS_ADMIN), ``ip`` (iproute2) and ``nft`` (nftables);
`unavailable()` says what is missing, for a skip.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import itertools
import os
import shutil
import socket
import subprocess
import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from ._service import AsyncService
from ._streams import relay

__all__ = ["NetworkPartition"]

T = TypeVar("T")

_CLONE_NEWNET = 0x40000000
_CLIENT_ADDRESS = "198.18.0.1"
_SERVER_ADDRESS = "198.18.0.2"
_TABLE = "asyncpg_iam_partition"
_ids = itertools.count()


def _run(*command: str) -> None:
    subprocess.run(command, check=True, capture_output=True, timeout=30)


def _enter(namespace: str) -> None:
    """Move the calling thread into `namespace` (``ip netns`` names one by a file)."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/var/run/netns/{namespace}", os.O_RDONLY)
    try:
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"setns({namespace}): {os.strerror(errno)}")
    finally:
        os.close(fd)


def _in_thread(namespace: str, fn: Callable[[], T]) -> T:
    """Run `fn` in a new thread inside `namespace` and return its result."""
    result: list[T] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            _enter(namespace)
            result.append(fn())
        except BaseException as exc:  # handed to the caller
            error.append(exc)

    thread = threading.Thread(target=target, name=f"netns {namespace}")
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


class NetworkPartition(AsyncService):
    """A path to `backend` (host, port) through two namespaces that can drop every packet.

    ``async with NetworkPartition(("127.0.0.1", 5432)) as path``: connect to `path.host`:
    `path.port` from code run with `path.run_client(...)`.
    """

    def __init__(self, backend: tuple[str, int]) -> None:
        self._backend = backend
        tag = f"{os.getpid() % 100000}x{next(_ids)}"
        self._client_ns = f"aiam-c{tag}"
        self._server_ns = f"aiam-s{tag}"
        self._veth = (f"aic{tag}"[:15], f"ais{tag}"[:15])
        self._server: asyncio.AbstractServer | None = None
        self._port: int | None = None
        self._relays: set[asyncio.StreamWriter] = set()
        self.dropping = False
        """Whether every packet on the link is dropped now."""

    @staticmethod
    def unavailable() -> str | None:
        """Say why a partition cannot be made here (for a test skip), or None."""
        if not hasattr(os, "geteuid") or os.geteuid() != 0:
            return "network namespaces need root (CAP_NET_ADMIN and CAP_SYS_ADMIN)"
        for tool, package in (("ip", "iproute2"), ("nft", "nftables")):
            if shutil.which(tool) is None:
                return f"`{tool}` is not installed (Debian package {package}; see .ci/setup)"
        probe = f"aiam-p{os.getpid() % 100000}x{next(_ids)}"
        try:
            _run("ip", "netns", "add", probe)
            _run("ip", "netns", "exec", probe, "nft", "add", "table", "inet", _TABLE)
        except (OSError, subprocess.SubprocessError) as exc:
            detail = getattr(exc, "stderr", b"") or b""
            return f"cannot make a network namespace with nftables here: {exc} {detail!r}"
        finally:
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                _run("ip", "netns", "del", probe)
        return None

    @property
    def host(self) -> str:
        """The address clients dial (in the server namespace)."""
        return _SERVER_ADDRESS

    @property
    def port(self) -> int:
        """The relay's port (known once started)."""
        if self._port is None:
            raise RuntimeError("the partition is not started: await start() first")
        return self._port

    async def start(self) -> None:
        """Make the namespaces, the link and the (empty) drop rules, and start the relay."""
        await asyncio.to_thread(self._make)
        try:
            listening = _in_thread(self._server_ns, self._listen)
            self._server = await asyncio.start_server(self._handle, sock=listening)
            self._port = listening.getsockname()[1]
        except BaseException:
            await self.stop()
            raise

    def _make(self) -> None:
        client, server = self._client_ns, self._server_ns
        client_if, server_if = self._veth
        _run("ip", "netns", "add", client)
        _run("ip", "netns", "add", server)
        _run(
            "ip", "link", "add", client_if, "netns", client, "type", "veth",
            "peer", "name", server_if, "netns", server,
        )  # fmt: skip
        for ns, interface, address in (
            (client, client_if, _CLIENT_ADDRESS),
            (server, server_if, _SERVER_ADDRESS),
        ):
            _run("ip", "-n", ns, "addr", "add", f"{address}/30", "dev", interface)
            _run("ip", "-n", ns, "link", "set", interface, "up")
            _run("ip", "-n", ns, "link", "set", "lo", "up")
        nft = ("ip", "netns", "exec", server, "nft")
        _run(*nft, "add", "table", "inet", _TABLE)
        for chain, hook in (("in", "input"), ("out", "output")):
            _run(
                *nft, "add", "chain", "inet", _TABLE, chain,
                f"{{ type filter hook {hook} priority 0; policy accept; }}",
            )  # fmt: skip

    def _listen(self) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((_SERVER_ADDRESS, 0))
        sock.listen(128)
        sock.setblocking(False)
        return sock

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._relays.add(writer)
        backend_writer: asyncio.StreamWriter | None = None
        try:
            backend_reader, backend_writer = await asyncio.open_connection(*self._backend)
            self._relays.add(backend_writer)
            await relay(reader, writer, backend_reader, backend_writer)
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            for each in (writer, backend_writer):
                if each is not None:
                    self._relays.discard(each)
                    each.transport.abort()

    async def drop(self) -> None:
        """Drop every packet on the link, both ways: no FIN, no RST, no ICMP reaches anyone."""
        server_if = self._veth[1]
        nft = ("ip", "netns", "exec", self._server_ns, "nft")
        await asyncio.to_thread(
            _run, *nft, "add", "rule", "inet", _TABLE, "in", "iifname", server_if, "drop"
        )
        await asyncio.to_thread(
            _run, *nft, "add", "rule", "inet", _TABLE, "out", "oifname", server_if, "drop"
        )
        self.dropping = True

    async def restore(self) -> None:
        """Let packets through again."""
        nft = ("ip", "netns", "exec", self._server_ns, "nft")
        for chain in ("in", "out"):
            await asyncio.to_thread(_run, *nft, "flush", "chain", "inet", _TABLE, chain)
        self.dropping = False

    async def run_client(self, fn: Callable[[], Awaitable[T]]) -> T:
        """Run ``await fn()`` on a new event loop in a thread inside the client namespace."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[T] = loop.create_future()

        def target() -> None:
            try:
                _enter(self._client_ns)
                result: Any = asyncio.run(_as_coroutine(fn))
            except BaseException as exc:  # handed to the caller's loop
                loop.call_soon_threadsafe(_settle, done, None, exc)
            else:
                loop.call_soon_threadsafe(_settle, done, result, None)

        threading.Thread(target=target, name=f"netns {self._client_ns}", daemon=True).start()
        return await done

    async def stop(self) -> None:
        """Stop the relay and delete both namespaces (and with them the link)."""
        if self._server is not None:
            self._server.close()
            for writer in list(self._relays):
                writer.transport.abort()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)
            self._server = None
        for ns in (self._client_ns, self._server_ns):
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                await asyncio.to_thread(_run, "ip", "netns", "del", ns)

    def __repr__(self) -> str:
        state = "dropping" if self.dropping else "passing"
        return f"NetworkPartition({_SERVER_ADDRESS}:{self._port} -> {self._backend}, {state})"


async def _as_coroutine(fn: Callable[[], Awaitable[T]]) -> T:
    return await fn()


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
