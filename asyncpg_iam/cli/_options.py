"""What the commands share: exit statuses, argument types, the database and AWS options, and
the connect plan those options describe (made as a pool makes it)."""

from __future__ import annotations

import argparse
import ssl
from typing import TYPE_CHECKING, Any, TypeAlias

from .. import _options as options
from .._auth import IAMAuth, TokenProvider
from .._connect import Connector, ConnectPlan, plan_connect
from .._dsql import is_dsql
from .._errors import ConfigurationError

if TYPE_CHECKING:
    Commands: TypeAlias = argparse._SubParsersAction[argparse.ArgumentParser]
else:
    Commands: TypeAlias = Any

__all__ = [
    "EXIT_FAILED",
    "EXIT_OK",
    "EXIT_USAGE",
    "Commands",
    "add_aws",
    "add_target",
    "connector_from",
    "iam_auth_from",
    "plan_from",
    "positive",
    "require_testing",
    "tcp_port",
]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


def tcp_port(text: str) -> int:
    """Parse a TCP port number (1 to 65535)."""
    try:
        return options.port("port", int(text))
    except (ValueError, ConfigurationError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a TCP port number (1..65535)") from None


def positive(text: str) -> float:
    """Parse a number of seconds greater than 0."""
    try:
        return options.positive_seconds("seconds", float(text))
    except (ValueError, ConfigurationError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds > 0") from None


def add_target(parser: argparse.ArgumentParser, *, database: bool) -> None:
    """Add the options naming the database endpoint and user (and the database)."""
    group = parser.add_argument_group("database")
    group.add_argument("--host", required=True, help="the host to connect to (RDS endpoint)")
    group.add_argument("--port", type=tcp_port, default=5432, help="its port (default 5432)")
    group.add_argument("--user", required=True, help="the database user (GRANT rds_iam)")
    if database:
        group.add_argument("--dbname", help="the database (default: the user name)")


def add_aws(parser: argparse.ArgumentParser) -> None:
    """Add the options choosing the AWS credentials and what to sign for."""
    group = parser.add_argument_group("AWS")
    group.add_argument("--profile", help="AWS profile (default: the default credential chain)")
    group.add_argument(
        "--region", help="region to sign for (default: from the endpoint name, then AWS_REGION)"
    )
    group.add_argument("--role-arn", help="assume this IAM role before signing")
    group.add_argument("--role-session-name", help="session name for the assumed role")
    group.add_argument("--external-id", help="external id for the assumed role")
    group.add_argument(
        "--duration",
        type=int,
        help="assumed-role session length in seconds (900 to 43200)",
    )
    group.add_argument(
        "--signing-host",
        help="the RDS endpoint name to sign for, when --host is a CNAME, tunnel or IP",
    )
    group.add_argument(
        "--signing-port", type=tcp_port, help="the port to sign for (default: --port)"
    )


def require_testing() -> Any:
    """Return ``asyncpg_iam.testing``; exit with one line naming the extra when it is missing."""
    try:
        # trustme is imported lazily by the cluster and the emulator: ask for it up front.
        import trustme  # noqa: F401

        from .. import testing
    except ImportError as exc:
        raise SystemExit(
            f"asyncpg-iam: this command needs the cli extra ({exc.name} is missing): "
            "pip install 'asyncpg-iam[cli]'"
        ) from None
    return testing


def iam_auth_from(args: argparse.Namespace) -> IAMAuth:
    """Return the IAMAuth the AWS options describe; raises ConfigurationError."""
    return IAMAuth(
        region=args.region,
        profile=args.profile,
        role_arn=args.role_arn,
        role_session_name=args.role_session_name,
        external_id=args.external_id,
        role_duration=args.duration,
        signing_host=args.signing_host,
        signing_port=args.signing_port,
        service="dsql" if getattr(args, "dsql", False) else None,
    )


def plan_from(args: argparse.Namespace, auth: IAMAuth, *, tls: bool = True) -> ConnectPlan:
    """Return the connect plan the command's options describe, made as a pool makes it.

    Raises ConfigurationError for options a pool would refuse, TLS settings included.
    """
    kwargs: dict[str, Any] = {"host": args.host, "port": args.port, "user": args.user}
    if getattr(args, "dbname", None):
        kwargs["database"] = args.dbname
    if getattr(args, "ca", None):
        kwargs["sslrootcert"] = args.ca
    if not tls:
        # Printing a token sends nothing: no TLS decision to make or to refuse.
        kwargs["ssl"] = ssl.create_default_context()
    if hasattr(args, "dbname") and not is_dsql(auth, [args.host]):
        # The user name, as --dbname's help says (not $PGDATABASE); DSQL's plan says postgres.
        kwargs.setdefault("database", args.user)
    return plan_connect(None, kwargs, auth=auth)


def connector_from(args: argparse.Namespace, *, tls: bool = True) -> Connector:
    """Return the Connector the command's options describe (the pool's connect path)."""
    auth = iam_auth_from(args)
    plan = plan_from(args, auth, tls=tls)
    return Connector(plan, provider=TokenProvider(auth), kind=args.command)
