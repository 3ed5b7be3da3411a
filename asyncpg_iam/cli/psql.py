"""``asyncpg-iam psql``: run psql with a fresh token, verify-full TLS and the RDS CA bundle.

The token goes to psql in its environment (never on its command line), and nothing of the
caller's libpq settings that could redirect the connection or weaken its TLS is kept.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
from collections.abc import Mapping, Sequence

from .._connect import ConnectPlan
from .._errors import ConfigurationError
from ._options import EXIT_FAILED, Commands, add_aws, add_target, connector_from
from .token import sign

__all__ = ["check_psql_arguments", "psql_environment", "register"]

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


def register(commands: Commands) -> None:
    """Add the ``psql`` command."""
    parser = commands.add_parser(
        "psql",
        help="run psql with a fresh token, verify-full TLS and the RDS CA bundle",
        description="Run psql with the token in PGPASSWORD (never on the command line), "
        "sslmode=verify-full and the CA bundle. Arguments after `--` go to psql.",
    )
    add_target(parser, database=True)
    add_aws(parser)
    parser.add_argument(
        "--ca",
        help="CA bundle to verify the server with (default: $PGSSLROOTCERT, "
        "$ASYNCPG_IAM_CA_BUNDLE, then the bundle `asyncpg-iam ca-bundle` cached)",
    )
    parser.add_argument("--psql", default="psql", help="the psql program (default: psql on PATH)")
    parser.set_defaults(run=run, psql_arguments=[])


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


def run(args: argparse.Namespace) -> int:
    """Run ``asyncpg-iam psql``: replace this process with psql (arguments after ``--``)."""
    extra: list[str] = args.psql_arguments
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
    token = asyncio.run(sign(args, connector))
    env = psql_environment(os.environ, connector.plan, token)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(program, [program, *extra], env)  # noqa: S606 - argv is a list, no shell
