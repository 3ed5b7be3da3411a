"""``asyncpg-iam demo``: an IAM pool under load against a local RDS with IAM.

It starts an `asyncpg_iam.testing.Sandbox` on loopback (a throwaway PostgreSQL, the RDS IAM
emulator in front of it, and a container-credentials endpoint that issues rotating keys the
emulator trusts), points an IAM pool at it, runs a concurrent workload with short connection
lifetimes and shows what the pool does.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import sys
import time
from typing import Any, TextIO

from ._options import Commands, positive, require_testing

__all__ = ["register", "run"]


def register(commands: Commands) -> None:
    """Add the ``demo`` command."""
    parser = commands.add_parser(
        "demo",
        help="run an IAM pool under load against an embedded emulator, then summarize",
        description="Start a throwaway PostgreSQL, the RDS IAM emulator and rotating "
        "credentials, run an IAM pool under a concurrent workload with short connection "
        "lifetimes, show live progress and a summary. Exit status 1 if any query failed.",
    )
    parser.add_argument(
        "--duration", type=positive, default=20.0, help="seconds of load (default 20)"
    )
    parser.add_argument("--workers", type=int, default=32, help="concurrent workers (default 32)")
    parser.add_argument("--max-size", type=int, default=10, help="pool max_size (default 10)")
    parser.add_argument(
        "--max-lifetime",
        type=positive,
        default=3.0,
        help="connection max_lifetime in seconds (default 3)",
    )
    parser.add_argument(
        "--credential-lifetime",
        type=positive,
        default=12.0,
        help="seconds each issued AWS key lives, rotated at half of it (default 12)",
    )
    parser.set_defaults(run=run)


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


async def _progress(
    pool: Any, load: _Workload, creds: Any, started: float, duration: float, out: TextIO
) -> None:
    """Print a line of figures every second (every half second, rewritten, on a terminal)."""
    tty = out.isatty()
    last_queries, last_at = 0, time.monotonic()
    deadline = started + duration
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
    if tty:
        out.write("\n")


def _summary(
    out: TextIO, load: _Workload, stats: Any, elapsed: float, emu: Any, creds: Any
) -> None:
    """Print what the run did: queries, connections, tokens, logins, credentials, errors."""
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


async def _demo(args: argparse.Namespace) -> int:
    import asyncpg_iam

    out = sys.stdout
    out.write(
        "asyncpg-iam demo: starting PostgreSQL, the RDS IAM emulator and a credential "
        "endpoint on loopback...\n"
    )
    out.flush()
    testing = require_testing()
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
            await _progress(pool, load, creds, started, args.duration, out)
            stop.set()
            await asyncio.gather(*workers)
            elapsed = time.monotonic() - started
            stats = pool.stats()
        finally:
            stop.set()
            await pool.close()
        _summary(out, load, stats, elapsed, emu, creds)
    ok = load.failures == 0 and load.queries > 0
    out.write("demo: OK\n" if ok else "demo: FAILED (see the errors above)\n")
    return 0 if ok else 1


def run(args: argparse.Namespace) -> int:
    """Run ``asyncpg-iam demo``; exit status 1 if any query failed."""
    if args.workers < 1 or args.max_size < 1:
        raise SystemExit("asyncpg-iam demo: --workers and --max-size must be at least 1")
    require_testing()
    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(_demo(args))
    return 130
