"""``asyncpg-iam emulate`` and ``asyncpg-iam demo``: a local RDS with IAM, and a pool under load.

Both start an `asyncpg_iam.testing.Sandbox` on loopback: a throwaway PostgreSQL, the RDS IAM
emulator in front of it, and a container-credentials endpoint that issues rotating keys the
emulator trusts.
`emulate` prints how to reach it and waits for Ctrl-C; `demo` points an IAM pool at it, runs a
concurrent workload with short connection lifetimes and shows what the pool does.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import errno
import shlex
import signal
import socket
import sys
import time
from typing import Any

from .testing._aws import AWS_CREDENTIAL_VARIABLES

__all__ = ["run_demo", "run_emulate"]


def _require_testing() -> Any:
    try:
        # trustme is imported lazily by the cluster and the emulator: ask for it up front.
        import trustme  # noqa: F401

        from . import testing
    except ImportError as exc:
        raise SystemExit(
            f"asyncpg-iam: this command needs the cli extra ({exc.name} is missing): "
            "pip install 'asyncpg-iam[cli]'"
        ) from None
    return testing


def _port_in_use(host: str, port: int) -> str:
    return (
        f"asyncpg-iam emulate: port {port} on {host} is already in use (another emulator or "
        "PostgreSQL?): pass a free one with --port N, or leave --port out to get a free port"
    )


def _check_port_free(host: str, port: int) -> None:
    """Exit with one line when `port` cannot be listened on (before starting PostgreSQL)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise SystemExit(_port_in_use(host, port)) from None
            message = f"asyncpg-iam emulate: cannot listen on {host}:{port}: {exc.strerror}"
            raise SystemExit(message) from None


def _moto_missing() -> str | None:
    """Return why moto's STS cannot start here, or None when it can."""
    try:
        import moto.server  # noqa: F401
    except ImportError:
        return "moto is not installed (pip install 'moto[server]')"
    return None


async def _start(sandbox: Any, port: int | None) -> None:
    """Start `sandbox`; a busy `port` exits with one line naming it."""
    try:
        await sandbox.start()
    except OSError as exc:
        if port and exc.errno == errno.EADDRINUSE:
            raise SystemExit(_port_in_use("127.0.0.1", port)) from None
        raise


# -- emulate ------------------------------------------------------------------------------------


def _emulate_banner(sandbox: Any, *, rejections: bool = True, sts_error: str | None) -> str:
    emu, cluster = sandbox.emulator, sandbox.cluster
    user, database = cluster.user, cluster.database
    host, port, endpoint = emu.host, emu.port, emu.endpoint
    lines = [
        "asyncpg-iam emulate: an RDS endpoint with IAM authentication is running on loopback.",
        "",
        "Environment for another shell:",
        f"unset {' '.join(AWS_CREDENTIAL_VARIABLES[:6])}",
    ]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in sandbox.environment().items()]
    lines += [
        "",
        "Connection settings:",
        f"  host={host} port={port} user={user} database={database} sslmode=verify-full",
        f"  sign tokens for: {endpoint}:{emu.endpoint_port} in {emu.region} "
        "(IAMAuth(signing_host=...), --signing-host)",
        f"  CA bundle: {emu.ca_path}",
        f"  IAM users: {', '.join(sorted(emu.iam_users))} (and every user you GRANT rds_iam TO; "
        "other users log in with their password)",
        f"  credentials: {sandbox.credential_server.url} "
        f"(keys live {sandbox.credential_lifetime:g} s)",
        f"  PostgreSQL data: {cluster.data_dir} (removed on exit)",
    ]
    if sandbox.sts is not None:
        lines.append(f"  STS (moto): {sandbox.sts.endpoint_url}")
    elif sts_error:
        lines.append(f"  STS: not started: {sts_error}")
    target = f"--host {host} --port {port} --user {user} --signing-host {endpoint}"
    lines += [
        "",
        "Try:",
        f"  asyncpg-iam psql {target} -- -c 'SELECT current_user'",
        f"  asyncpg-iam doctor {target}",
        f"  python: await asyncpg_iam.create_pool(host={host!r}, port={port}, user={user!r}, "
        f"database={database!r}, iam=asyncpg_iam.IAMAuth(signing_host={endpoint!r}))",
        "",
        "Rejected logins are printed below with the reason RDS would not tell the client."
        if rejections
        else "Rejected logins are not printed (--quiet-rejections).",
        "Running until Ctrl-C (SIGINT) or SIGTERM.",
    ]
    return "\n".join(lines) + "\n"


def _stop_event() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    return stop


# What RDS keeps to itself: the reason behind each `PAM authentication failed`, in words.
_REJECTION_WORDS = {
    "signature_mismatch": "bad signature (signed with another secret key, or altered)",
    "expired": "expired token (older than 900 s)",
    "future_dated": "token dated in the future (clock skew)",
    "credentials_expired": "the signing credentials had expired",
    "wrong_region": "wrong region",
    "wrong_host": "wrong host (sign for the endpoint name: --signing-host)",
    "wrong_port": "wrong port (sign for the endpoint port: --signing-port)",
    "wrong_user": "token signed for another user",
    "wrong_service": "signed for another service than rds-db",
    "wrong_action": "signed for another action than connect",
    "unknown_access_key": "unknown access key (not issued by this emulator's credentials)",
    "session_token_mismatch": "wrong or missing session token",
    "user_not_iam_enabled": "missing grant: the user is not a member of rds_iam",
    "malformed_token": "the password is not an IAM token",
    "password_mismatch": "wrong password (a user outside rds_iam logs in with its password)",
    "plaintext": "no TLS",
    "throttled": "throttled",
}


def format_rejection(record: Any) -> str:
    """Return one line saying why a login was rejected (from its record: never the token)."""
    words = _REJECTION_WORDS.get(record.reason, record.reason)
    return (
        f"rejected login: user {record.user!r} database {record.database!r}: {words} "
        f"[{record.reason}: {record.detail}]"
    )


def _print_rejections(record: Any) -> None:
    if not record.accepted:
        sys.stdout.write(format_rejection(record) + "\n")
        sys.stdout.flush()


async def _emulate(args: argparse.Namespace) -> int:
    stop = _stop_event()
    testing = _require_testing()
    sts_error = None if args.no_sts else _moto_missing()
    sandbox = testing.Sandbox(
        port=args.port or 0,
        endpoint=args.endpoint or testing.DEFAULT_ENDPOINT,
        credential_lifetime=args.credential_lifetime,
        sts=not args.no_sts and sts_error is None,
        iam_users=tuple(args.iam_user),
        isolate_environment=False,  # printed for another shell, not applied here
    )
    await _start(sandbox, args.port)
    try:
        data_dir = sandbox.cluster.data_dir
        if not args.quiet_rejections:
            sandbox.emulator.on_login = _print_rejections
        banner = _emulate_banner(sandbox, rejections=not args.quiet_rejections, sts_error=sts_error)
        sys.stdout.write(banner)
        sys.stdout.flush()
        await stop.wait()
        sys.stdout.write("stopping...\n")
        sys.stdout.flush()
    finally:
        await sandbox.aclose()
    sys.stdout.write(f"stopped; removed {data_dir.parent}\n")
    return 0


def run_emulate(args: argparse.Namespace) -> int:
    """Run ``asyncpg-iam emulate``."""
    _require_testing()
    if args.port:
        _check_port_free("127.0.0.1", args.port)
    return asyncio.run(_emulate(args))


# -- demo ---------------------------------------------------------------------------------------


class _Workload:
    def __init__(self) -> None:
        self.queries = 0
        self.failures = 0
        self.errors: collections.Counter[str] = collections.Counter()


async def _worker(pool: Any, load: _Workload, stop: asyncio.Event, seed: int) -> None:
    i = seed * 1_000_000
    while not stop.is_set():
        i += 1
        try:
            async with pool.acquire(timeout=10) as con:
                got = await con.fetchval("SELECT $1::int + 1", i)
            if got != i + 1:
                raise AssertionError(f"SELECT returned {got!r}, expected {i + 1}")
            load.queries += 1
        except Exception as exc:
            load.failures += 1
            first = str(exc).splitlines()[0] if str(exc) else ""
            load.errors[f"{type(exc).__name__}: {first}"[:200]] += 1
            await asyncio.sleep(0.05)


def _recycled(stats: Any) -> int:
    closed = stats.connections_closed
    return int(closed.get("max_lifetime", 0) + closed.get("discarded_on_acquire", 0))


async def _demo(args: argparse.Namespace) -> int:
    import asyncpg_iam

    out = sys.stdout
    tty = out.isatty()
    out.write(
        "asyncpg-iam demo: starting PostgreSQL, the RDS IAM emulator and a credential "
        "endpoint on loopback...\n"
    )
    out.flush()
    testing = _require_testing()
    # The sandbox points this process's AWS chain at its credential server until it stops.
    async with testing.Sandbox(credential_lifetime=args.credential_lifetime) as sandbox:
        emu, creds = sandbox.emulator, sandbox.credential_server
        out.write(
            f"IAM pool -> {emu.host}:{emu.port} signing for {emu.endpoint} ({emu.region}); "
            f"{args.workers} workers, max_size {args.max_size}, max_lifetime "
            f"{args.max_lifetime:g} s, AWS keys rotating every {creds.rotate_every:g} s, "
            f"{args.duration:g} s\n"
        )
        out.flush()
        load = _Workload()
        stop = asyncio.Event()
        started = time.monotonic()
        pool = await asyncpg_iam.create_pool(
            **sandbox.pool_kwargs(),
            min_size=2,
            max_size=args.max_size,
            max_lifetime=args.max_lifetime,
            max_lifetime_jitter=0.3,
        )
        try:
            workers = [
                asyncio.create_task(_worker(pool, load, stop, n)) for n in range(args.workers)
            ]
            last_queries, last_at = 0, time.monotonic()
            deadline = started + args.duration
            while (now := time.monotonic()) < deadline:
                await asyncio.sleep(min(0.5 if tty else 1.0, max(0.0, deadline - now)))
                now = time.monotonic()
                rate = (load.queries - last_queries) / max(now - last_at, 1e-6)
                last_queries, last_at = load.queries, now
                stats = pool.stats()
                line = (
                    f"{now - started:5.1f} s  {rate:7.0f} queries/s  "
                    f"open {stats.open_connections:2d}  tokens signed {stats.tokens_signed:4d}  "
                    f"recycled {_recycled(stats):4d}  credential fetches "
                    f"{stats.credential_fetches} (endpoint: {creds.requests} requests, "
                    f"{len(creds.issued)} keys)  failed {load.failures}"
                )
                out.write(("\r" + line) if tty else (line + "\n"))
                out.flush()
            stop.set()
            await asyncio.gather(*workers)
            elapsed = time.monotonic() - started
            stats = pool.stats()
        finally:
            stop.set()
            await pool.close()
        if tty:
            out.write("\n")
        out.write(
            f"\nSummary: {load.queries} queries in {elapsed:.1f} s "
            f"({load.queries / elapsed:.0f}/s), {load.failures} failed\n"
            f"  connections: {stats.connections_opened} opened, {_recycled(stats)} recycled at "
            f"max_lifetime, {stats.connect_failures} connect failures\n"
            f"  tokens signed: {stats.tokens_signed}; emulator logins accepted "
            f"{emu.logins_accepted}, rejected {emu.logins_rejected}\n"
            f"  credentials: {stats.credential_fetches} fetches by the pool, "
            f"{len(creds.issued)} keys issued by the endpoint\n"
        )
        for error, count in load.errors.most_common(5):
            out.write(f"  error x{count}: {error}\n")
    ok = load.failures == 0 and load.queries > 0
    out.write("demo: OK\n" if ok else "demo: FAILED (see the errors above)\n")
    return 0 if ok else 1


def run_demo(args: argparse.Namespace) -> int:
    """Run ``asyncpg-iam demo``; exit status 1 if any query failed."""
    if args.workers < 1 or args.max_size < 1:
        raise SystemExit("asyncpg-iam demo: --workers and --max-size must be at least 1")
    _require_testing()
    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(_demo(args))
    return 130
