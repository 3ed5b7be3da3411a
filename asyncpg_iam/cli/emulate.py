"""``asyncpg-iam emulate``: a throwaway PostgreSQL behind the RDS IAM emulator, until Ctrl-C.

It starts an `asyncpg_iam.testing.Sandbox` (PostgreSQL, the emulator, a container-credentials
endpoint issuing rotating keys the emulator trusts), prints how to reach it from another shell,
and prints why each rejected login was rejected: what RDS keeps to itself.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import shlex
import signal
import socket
import sys
from typing import Any

from .._proxy import is_proxy_host
from ._options import Commands, positive, require_testing, tcp_port

__all__ = ["format_pin", "format_proxy_summary", "format_rejection", "register", "run"]


def register(commands: Commands) -> None:
    """Add the ``emulate`` command."""
    parser = commands.add_parser(
        "emulate",
        help="run a throwaway PostgreSQL behind the RDS IAM emulator until interrupted",
        description="Start a throwaway PostgreSQL, the RDS IAM emulator and a credential "
        "endpoint on loopback, print the settings to use from another shell, and run until "
        "Ctrl-C or SIGTERM.",
    )
    parser.add_argument("--port", type=tcp_port, default=None, help="emulator port (default: free)")
    parser.add_argument(
        "--endpoint",
        default=None,
        help="the RDS endpoint name tokens must be signed for "
        "(default mydb.abcdefghijkl.us-east-1.rds.amazonaws.com)",
    )
    parser.add_argument(
        "--proxy",
        action="store_true",
        help="stand in for an RDS Proxy endpoint: print each pinned session with the proxy's "
        "reason, refuse the options startup parameter (default endpoint "
        "myproxy.proxy-abcdefghijkl.us-east-1.rds.amazonaws.com)",
    )
    parser.add_argument(
        "--credential-lifetime",
        type=positive,
        default=3600.0,
        help="seconds each issued AWS key lives (rotated at half of it; default 3600)",
    )
    parser.add_argument(
        "--no-sts", action="store_true", help="do not start a local STS (moto) even if installed"
    )
    parser.add_argument(
        "--iam-user",
        action="append",
        default=[],
        metavar="NAME",
        help="create database user NAME and GRANT rds_iam to it (repeatable); in SQL: "
        "CREATE USER name; GRANT rds_iam TO name;",
    )
    parser.add_argument(
        "--quiet-rejections",
        action="store_true",
        help="do not print why each rejected login was rejected",
    )
    parser.set_defaults(run=run)


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


def _iam_user_lines(sandbox: Any, admin: str) -> list[str]:
    """Return a connect line that works for each IAM user, and how to give it a database."""
    emu, database = sandbox.emulator, sandbox.cluster.database
    users = sorted(u for u in emu.iam_users if u != admin)
    if not users:
        return []
    target = f"--host {emu.host} --port {emu.port}"
    signing = f"--signing-host {emu.endpoint}"
    lines = [
        "",
        "IAM users: as on RDS, a new user has no database of its own, and no CREATE on schema",
        f"public (PostgreSQL 15 and later). Each logs in to {database}; to give one a database:",
    ]
    for name in users:
        quoted = shlex.quote(name)
        create = shlex.quote(f'CREATE DATABASE "{name}" OWNER "{name}"')
        lines += [
            f"  {name}: asyncpg-iam psql {target} --user {quoted} --dbname {database} {signing}",
            f"    as {admin}: asyncpg-iam psql {target} --user {admin} {signing} -- -c {create}",
            f"    then --dbname {quoted}",
        ]
    return lines


def _emulate_banner(sandbox: Any, *, rejections: bool = True, sts_error: str | None) -> str:
    from ..testing._aws import AWS_CREDENTIAL_VARIABLES

    emu, cluster = sandbox.emulator, sandbox.cluster
    user, database = cluster.user, cluster.database
    host, port, endpoint = emu.host, emu.port, emu.endpoint
    kind = "an RDS Proxy endpoint" if emu.proxy else "an RDS endpoint"
    lines = [
        f"asyncpg-iam emulate: {kind} with IAM authentication is running on loopback.",
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
        *_iam_user_lines(sandbox, user),
        "",
        "Rejected logins are printed below with the reason RDS would not tell the client."
        if rejections
        else "Rejected logins are not printed (--quiet-rejections).",
        "Running until Ctrl-C (SIGINT) or SIGTERM.",
    ]
    if emu.proxy:
        lines.insert(-1, "Pinned sessions are printed below with the reason RDS Proxy logs.")
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


def format_pin(event: Any) -> str:
    """Return one line for a pinned session: the proxy's reason, who sent it, the statement."""
    sql = " ".join(event.sql.split())
    sql = sql if len(sql) <= 80 else sql[:77] + "..."
    return f"pinned session ({event.cause}): {event.reason} [{sql}]"


def _print_pin(event: Any) -> None:
    sys.stdout.write(format_pin(event) + "\n")
    sys.stdout.flush()


def format_proxy_summary(report: Any) -> str:
    """Return the RDS Proxy mode's counts in one line."""
    causes = ", ".join(f"{n} by {cause}" for cause, n in sorted(report.pinned_by_cause.items()))
    return (
        f"RDS Proxy: {report.pinned_sessions} of {report.sessions} sessions pinned"
        f"{f' ({causes})' if causes else ''}; {report.options_refused} startups refused for "
        "options"
    )


def _print_rejections(record: Any) -> None:
    if not record.accepted:
        sys.stdout.write(format_rejection(record) + "\n")
        sys.stdout.flush()


async def _emulate(args: argparse.Namespace) -> int:
    stop = _stop_event()
    testing = require_testing()
    sts_error = None if args.no_sts else _moto_missing()
    default_endpoint = testing.DEFAULT_PROXY_ENDPOINT if args.proxy else testing.DEFAULT_ENDPOINT
    sandbox = testing.Sandbox(
        port=args.port or 0,
        endpoint=args.endpoint or default_endpoint,
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
        if sandbox.emulator.proxy:
            sandbox.emulator.on_pin = _print_pin
        banner = _emulate_banner(sandbox, rejections=not args.quiet_rejections, sts_error=sts_error)
        sys.stdout.write(banner)
        sys.stdout.flush()
        await stop.wait()
        if sandbox.emulator.proxy:
            sys.stdout.write(format_proxy_summary(sandbox.emulator.proxy_report()) + "\n")
        sys.stdout.write("stopping...\n")
        sys.stdout.flush()
    finally:
        await sandbox.aclose()
    sys.stdout.write(f"stopped; removed {data_dir.parent}\n")
    return 0


def run(args: argparse.Namespace) -> int:
    """Run ``asyncpg-iam emulate``."""
    testing = require_testing()
    if args.proxy and args.endpoint and not is_proxy_host(args.endpoint):
        raise SystemExit(
            f"asyncpg-iam emulate: --proxy needs an RDS Proxy endpoint name "
            f"(<name>.proxy-<id>.<region>.rds.amazonaws.com), not {args.endpoint!r}; "
            f"leave --endpoint out for {testing.DEFAULT_PROXY_ENDPOINT}"
        )
    if args.port:
        _check_port_free("127.0.0.1", args.port)
    return asyncio.run(_emulate(args))
