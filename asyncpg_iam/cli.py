"""The ``asyncpg-iam`` command: token, psql, doctor, emulate, demo, ca-bundle.

    asyncpg-iam token --host H --user U [AWS options]        print a token
    asyncpg-iam token --host ID.dsql.REGION.on.aws --user admin   an Aurora DSQL token
    asyncpg-iam psql --host H --user U [AWS options] [-- psql args]
    asyncpg-iam doctor --host H --user U [AWS options] [--json]
    asyncpg-iam emulate                                       a local RDS with IAM, until Ctrl-C
    asyncpg-iam demo [--duration S]                           an IAM pool under load, offline
    asyncpg-iam ca-bundle [--output PATH] [--url URL]         download the RDS CA bundle

Exit status: 0 on success, 1 when the command failed (a check, a query, a download), 2 for
bad arguments. Only `token` ever prints a token: that is its job.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import ssl
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from ._auth import IAMAuth, TokenProvider
from ._connect import Connector, ConnectPlan, plan_connect
from ._dsql import connect_defaults
from ._errors import ConfigurationError, IAMError
from ._signing import build_dsql_token

__all__ = ["build_parser", "main"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a TCP port number") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port {value} is not in 1..65535")
    return value


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be > 0 seconds")
    return value


def _add_target(parser: argparse.ArgumentParser, *, database: bool) -> None:
    group = parser.add_argument_group("database")
    group.add_argument("--host", required=True, help="the host to connect to (RDS endpoint)")
    group.add_argument("--port", type=_port, default=5432, help="its port (default 5432)")
    group.add_argument("--user", required=True, help="the database user (GRANT rds_iam)")
    if database:
        group.add_argument("--dbname", help="the database (default: the user name)")


def _add_aws(parser: argparse.ArgumentParser) -> None:
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
    group.add_argument("--signing-port", type=_port, help="the port to sign for (default: --port)")


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


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of the ``asyncpg-iam`` command."""
    parser = argparse.ArgumentParser(
        prog="asyncpg-iam",
        description="IAM database authentication for Amazon RDS and Aurora PostgreSQL.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    token = commands.add_parser(
        "token",
        help="print an IAM auth token (like `aws rds generate-db-auth-token`)",
        description="Print an IAM authentication token for a database user, signed with the "
        "AWS credentials the options select (assume-role included).",
    )
    _add_target(token, database=False)
    _add_aws(token)
    dsql = token.add_argument_group("Aurora DSQL")
    dsql.add_argument(
        "--dsql",
        action="store_true",
        help="sign an Aurora DSQL token (the default for <id>.dsql.<region>.on.aws hosts); "
        "the user admin gets DbConnectAdmin, any other DbConnect",
    )
    dsql.add_argument(
        "--expires-in",
        type=int,
        default=None,
        help="DSQL token validity in seconds, 1 to 604800 (default 900)",
    )

    psql = commands.add_parser(
        "psql",
        help="run psql with a fresh token, verify-full TLS and the RDS CA bundle",
        description="Run psql with the token in PGPASSWORD (never on the command line), "
        "sslmode=verify-full and the CA bundle. Arguments after `--` go to psql.",
    )
    _add_target(psql, database=True)
    _add_aws(psql)
    psql.add_argument(
        "--ca",
        help="CA bundle to verify the server with (default: $PGSSLROOTCERT, "
        "$ASYNCPG_IAM_CA_BUNDLE, then the bundle `asyncpg-iam ca-bundle` cached)",
    )
    psql.add_argument("--psql", default="psql", help="the psql program (default: psql on PATH)")

    doctor = commands.add_parser(
        "doctor",
        help="check every step of an IAM login and say how to fix what fails",
        description="Check, in order: proxy settings, credentials, caller identity, region, "
        "DNS, TCP, TLS, clock skew, token, login and SELECT 1. One line per check; exit "
        "status 0 only when all pass.",
    )
    _add_target(doctor, database=True)
    _add_aws(doctor)
    doctor.add_argument(
        "--ca",
        help="CA bundle to verify the server with (default: $ASYNCPG_IAM_CA_BUNDLE, the "
        "cached RDS bundle, else the system store)",
    )
    doctor.add_argument("--json", action="store_true", help="print the checks as JSON")
    doctor.add_argument(
        "--timeout",
        type=_positive,
        default=10.0,
        help="seconds each network check may take (default 10)",
    )
    # For tests: pretend the local clock is off by this many seconds.
    doctor.add_argument("--clock-offset", type=float, default=0.0, help=argparse.SUPPRESS)

    emulate = commands.add_parser(
        "emulate",
        help="run a throwaway PostgreSQL behind the RDS IAM emulator until interrupted",
        description="Start a throwaway PostgreSQL, the RDS IAM emulator and a credential "
        "endpoint on loopback, print the settings to use from another shell, and run until "
        "Ctrl-C or SIGTERM.",
    )
    emulate.add_argument("--port", type=_port, default=None, help="emulator port (default: free)")
    emulate.add_argument(
        "--endpoint",
        default=None,
        help="the RDS endpoint name tokens must be signed for "
        "(default mydb.abcdefghijkl.us-east-1.rds.amazonaws.com)",
    )
    emulate.add_argument(
        "--credential-lifetime",
        type=_positive,
        default=3600.0,
        help="seconds each issued AWS key lives (rotated at half of it; default 3600)",
    )
    emulate.add_argument(
        "--no-sts", action="store_true", help="do not start a local STS (moto) even if installed"
    )

    demo = commands.add_parser(
        "demo",
        help="run an IAM pool under load against an embedded emulator, then summarize",
        description="Start a throwaway PostgreSQL, the RDS IAM emulator and rotating "
        "credentials, run an IAM pool under a concurrent workload with short connection "
        "lifetimes, show live progress and a summary. Exit status 1 if any query failed.",
    )
    demo.add_argument(
        "--duration", type=_positive, default=20.0, help="seconds of load (default 20)"
    )
    demo.add_argument("--workers", type=int, default=32, help="concurrent workers (default 32)")
    demo.add_argument("--max-size", type=int, default=10, help="pool max_size (default 10)")
    demo.add_argument(
        "--max-lifetime",
        type=_positive,
        default=3.0,
        help="connection max_lifetime in seconds (default 3)",
    )
    demo.add_argument(
        "--credential-lifetime",
        type=_positive,
        default=12.0,
        help="seconds each issued AWS key lives, rotated at half of it (default 12)",
    )

    ca = commands.add_parser(
        "ca-bundle",
        help="download the RDS global CA bundle and print its path",
        description="Download the RDS global CA bundle, check that it is PEM certificates, "
        "store it (atomically) and print its path. The pool and `asyncpg-iam psql` use the "
        "cached bundle by default.",
    )
    ca.add_argument("--output", help="where to store it (default: the cache directory)")
    ca.add_argument(
        "--url",
        default=None,
        help="where to download it from (default: $ASYNCPG_IAM_CA_BUNDLE_URL or the RDS "
        "global bundle)",
    )
    ca.add_argument(
        "--cafile",
        help="CA certificates to verify the download server with (default: the system store)",
    )
    ca.add_argument("--timeout", type=_positive, default=30.0, help="seconds (default 30)")
    return parser


# -- token --------------------------------------------------------------------------------------


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
    # Aurora DSQL: database postgres and the system CA store unless given.
    _, kwargs = connect_defaults(dsn=None, auth=auth, connect_kwargs=kwargs)
    if hasattr(args, "dbname"):
        kwargs.setdefault("database", args.user)
    return plan_connect(None, kwargs, auth=auth)


def connector_from(args: argparse.Namespace, *, tls: bool = True) -> Connector:
    """Return the Connector the command's options describe (the pool's connect path)."""
    auth = iam_auth_from(args)
    plan = plan_from(args, auth, tls=tls)
    return Connector(plan, provider=TokenProvider(auth), kind=args.command)


async def _sign(args: argparse.Namespace, connector: Connector | None = None) -> str:
    connector = connector or connector_from(args, tls=False)
    try:
        expires_in = getattr(args, "expires_in", None)
        if expires_in is None:
            return await connector.sign()
        target, provider = connector.targets[0], connector.provider
        if target.service != "dsql" or provider is None:
            raise ConfigurationError(
                "--expires-in applies to Aurora DSQL tokens only (RDS tokens live 900 s): "
                "pass --dsql or a DSQL host, or drop --expires-in"
            )
        return build_dsql_token(
            host=target.signing_host,
            region=target.region,
            credentials=await provider.credentials.get(),
            admin=target.admin,
            expires_in=expires_in,
        )
    finally:
        await connector.aclose()


def _run_token(args: argparse.Namespace) -> int:
    token = asyncio.run(_sign(args))
    sys.stdout.write(token + "\n")
    return EXIT_OK


# -- psql ---------------------------------------------------------------------------------------

# libpq variables that cannot redirect a connection or weaken its TLS: kept for psql. Every
# other PG* variable of the caller's environment (PGSERVICE, PGHOSTADDR, PGSSLMODE,
# PGREQUIRESSL, PGSSLNEGOTIATION, PGPASSFILE, ...) is dropped.
_PSQL_KEPT = frozenset(
    {"PGAPPNAME", "PGCLIENTENCODING", "PGCONNECT_TIMEOUT", "PGDATESTYLE", "PGTZ", "PGGEQO"}
)
# psql's short options that choose where to connect: the plan decides that, so they are refused.
_PSQL_CONNECTION_SHORT = frozenset("hpUd")
_PSQL_CONNECTION_LONG = frozenset({"--host", "--port", "--username", "--dbname"})
# psql's short options that take a value (attached, or as the next argument).
_PSQL_VALUE_SHORT = frozenset("cfFLoPRTv")
_PSQL_VALUE_LONG = frozenset(
    {
        "--command",
        "--file",
        "--field-separator",
        "--log-file",
        "--output",
        "--pset",
        "--record-separator",
        "--table-attr",
        "--set",
        "--variable",
    }
)


def check_psql_arguments(extra: Sequence[str]) -> None:
    """Refuse psql arguments that would connect elsewhere than the plan (with the token)."""
    refused: str | None = None
    arguments = iter(extra)
    for argument in arguments:
        if argument.startswith("--"):
            name = argument.split("=", 1)[0]
            if name in _PSQL_CONNECTION_LONG:
                refused = argument
            elif name in _PSQL_VALUE_LONG and "=" not in argument:
                next(arguments, None)
        elif argument.startswith("-") and len(argument) > 1:
            for index, option in enumerate(argument[1:], 1):
                if option in _PSQL_CONNECTION_SHORT:
                    refused = argument
                    break
                if option in _PSQL_VALUE_SHORT:
                    if index == len(argument) - 1:
                        next(arguments, None)  # the value is the next argument
                    break  # the rest of this argument is the option's value
        else:
            refused = argument  # a database name, user name or connection string
        if refused is not None:
            raise ConfigurationError(
                f"psql argument {refused!r} would choose the server, user or database, and "
                "psql would send it the token: pass --host, --port, --user and --dbname to "
                "asyncpg-iam instead"
            )


def psql_environment(environ: Mapping[str, str], plan: ConnectPlan, token: str) -> dict[str, str]:
    """Return psql's environment: the caller's without libpq settings, plus the plan's."""
    tls = plan.tls
    if tls.ca_file is None:
        raise ConfigurationError(
            f"psql needs a CA file to verify the server ({tls.ca_source}): run `asyncpg-iam "
            "ca-bundle` (downloads the RDS global bundle), or pass --ca PATH, or set "
            "PGSSLROOTCERT"
        )
    host, port = plan.endpoints[0]
    env = {k: v for k, v in environ.items() if not k.startswith("PG") or k in _PSQL_KEPT}
    # The token goes in the environment, never in argv (visible to every user in `ps`).
    env.update(
        PGHOST=host,
        PGPORT=str(port),
        PGUSER=plan.user,
        PGDATABASE=plan.database,
        PGPASSWORD=token,
        PGSSLMODE=tls.mode,
        PGSSLROOTCERT=tls.ca_file,
        # GSSAPI encryption would replace TLS (and its certificate check) if a ticket exists.
        PGGSSENCMODE="disable",
    )
    if tls.cert_file is not None:
        env["PGSSLCERT"] = tls.cert_file
    if tls.key_file is not None:
        env["PGSSLKEY"] = tls.key_file
    return env


def _run_psql(args: argparse.Namespace, extra: list[str]) -> int:
    program = shutil.which(args.psql)
    if program is None:
        sys.stderr.write(
            f"asyncpg-iam: {args.psql!r} was not found: install the PostgreSQL client "
            "(Debian/Ubuntu: apt-get install postgresql-client; macOS: brew install libpq) "
            "or pass --psql /path/to/psql\n"
        )
        return EXIT_FAILED
    check_psql_arguments(extra)
    connector = connector_from(args)
    # Refuse before signing: psql cannot use a plan without a CA file.
    psql_environment({}, connector.plan, "")
    token = asyncio.run(_sign(args, connector))
    env = psql_environment(os.environ, connector.plan, token)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(program, [program, *extra], env)  # noqa: S606 - argv is a list, no shell


# -- dispatch -----------------------------------------------------------------------------------


def _split_passthrough(argv: list[str]) -> tuple[list[str], list[str]]:
    if argv and argv[0] == "psql" and "--" in argv:
        index = argv.index("--")
        return argv[:index], argv[index + 1 :]
    return argv, []


def _dispatch(args: argparse.Namespace, extra: list[str]) -> int:
    command: str = args.command
    if command == "token":
        return _run_token(args)
    if command == "psql":
        return _run_psql(args, extra)
    if command == "doctor":
        from ._cli_doctor import run_doctor

        return run_doctor(args)
    if command == "emulate":
        from ._cli_demo import run_emulate

        return run_emulate(args)
    if command == "demo":
        from ._cli_demo import run_demo

        return run_demo(args)
    if command == "ca-bundle":
        from ._cli_ca import run_ca_bundle

        return run_ca_bundle(args)
    raise AssertionError(command)  # argparse only accepts the commands above


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``asyncpg-iam`` command with `argv` (default: the process's arguments)."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    arguments, extra = _split_passthrough(arguments)
    parser = build_parser()
    args: Any = parser.parse_args(arguments)
    try:
        return _dispatch(args, extra)
    except ConfigurationError as exc:
        sys.stderr.write(f"asyncpg-iam {args.command}: {exc}\n")
        return EXIT_USAGE
    except IAMError as exc:
        sys.stderr.write(f"asyncpg-iam {args.command}: {exc}\n")
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
