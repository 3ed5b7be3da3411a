"""``asyncpg-iam psql``: run psql with a fresh token, verify-full TLS and the RDS CA bundle.

Nothing here re-parses psql's arguments. Where psql connects is fixed by a connection string
this command writes (host, port, user, database and every TLS setting of the plan), passed as
psql's last ``--dbname``: psql keeps the last ``--dbname``, and libpq lets its settings
override ``-h``, ``-p``, ``-U`` and positional names. It is passed twice, so that an option
at the end of the caller's arguments that takes a value (``-c``) takes the first copy and
not the second. The caller's ``--`` is refused (everything after it would be a name, our
``--dbname`` included). The token travels in a password file scoped to that one host, port,
database and user (mode 0600, removed when psql exits), never in argv or ``PGPASSWORD``: a
psql pointed anywhere else has no password to send. The caller's libpq variables are dropped.

What a user types inside psql (``\\connect`` with its own ``sslmode``, a script run with
``\\i``) is not policed: a ``\\connect`` to the same host, port, database and user would find
the token in the password file.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from .._connect import ConnectPlan
from .._errors import ConfigurationError
from ._options import EXIT_FAILED, Commands, add_aws, add_target, connector_from
from .token import sign

__all__ = ["check_psql_arguments", "psql_command", "psql_environment", "register"]

# libpq variables that cannot redirect a connection or weaken its TLS: kept for psql. Every
# other PG* variable of the caller's environment (PGSERVICE, PGHOSTADDR, PGSSLMODE,
# PGREQUIRESSL, PGSSLNEGOTIATION, PGPASSFILE, ...) is dropped.
_PSQL_KEPT = frozenset(
    {"PGAPPNAME", "PGCLIENTENCODING", "PGCONNECT_TIMEOUT", "PGDATESTYLE", "PGTZ", "PGGEQO"}
)
# TLS parameters at libpq's default value (left out of psql's connection string).
_LIBPQ_DEFAULTS = {"sslsni": "1", "sslcertmode": "allow"}
# Variables outside PG* that change how psql reads its arguments: POSIXLY_CORRECT stops
# getopt at the first name, so our trailing --dbname would become a name.
_DROPPED = frozenset({"POSIXLY_CORRECT"})


def register(commands: Commands) -> None:
    """Add the ``psql`` command."""
    parser = commands.add_parser(
        "psql",
        help="run psql with a fresh token, verify-full TLS and the RDS CA bundle",
        description="Run psql connected where these options say, with the token in a "
        "password file scoped to that server (never on the command line), "
        "sslmode=verify-full and the CA bundle. Arguments after `--` go to psql; any that "
        "name another server, user or database are overridden.",
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
    """Refuse a ``--`` among psql's arguments: after it, our ``--dbname`` would be a name."""
    if "--" in extra:
        raise ConfigurationError(
            "psql argument '--' would turn the connection string asyncpg-iam passes into a "
            "database or user name: drop it (pass names with --dbname and --user to "
            "asyncpg-iam)"
        )


def _quote(value: str) -> str:
    """Quote a libpq connection string value."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _passfile_field(value: str) -> str:
    return value.replace("\\", "\\\\").replace(":", "\\:")


def connection_string(plan: ConnectPlan, passfile: str) -> str:
    """Return the libpq connection string for `plan`: server, user, database and TLS."""
    tls = plan.tls
    if tls.ca_file is None:
        raise ConfigurationError(
            f"psql needs a CA file to verify the server ({tls.ca_source}): run `asyncpg-iam "
            "ca-bundle` (downloads the RDS global bundle), or pass --ca PATH, or set "
            "PGSSLROOTCERT"
        )
    key_password = tls.setting("sslpassword")
    if key_password is not None:
        raise ConfigurationError(
            f"{key_password.source} cannot be handed to psql without showing it on its "
            "command line: psql asks for the key's password itself; drop it"
        )
    host, port = plan.endpoints[0]
    settings = {
        "host": host,
        "port": str(port),
        "user": plan.user,
        "dbname": plan.database,
        "passfile": passfile,
        "sslmode": tls.mode,
        "sslrootcert": tls.ca_file,
        # GSSAPI encryption would replace TLS (and its certificate check) if a ticket exists.
        "gssencmode": "disable",
    }
    if plan.direct_tls:
        settings["sslnegotiation"] = "direct"
    for setting in tls.settings:
        if setting.name in ("sslrootcert", "sslpassword", "sslnegotiation"):
            continue
        # libpq's own defaults are left out: an older psql may not know the parameter.
        if _LIBPQ_DEFAULTS.get(setting.name) != setting.value:
            settings[setting.name] = setting.value
    if tls.cert_file is not None:
        settings["sslcert"] = tls.cert_file
    if tls.key_file is not None:
        settings["sslkey"] = tls.key_file
    return " ".join(f"{key}={_quote(value)}" for key, value in settings.items())


def psql_command(program: str, extra: Sequence[str], conninfo: str) -> list[str]:
    """Return psql's argv: the caller's arguments, then our connection string (twice)."""
    check_psql_arguments(extra)
    dbname = f"--dbname={conninfo}"
    return [program, *extra, dbname, dbname]


def psql_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """Return psql's environment: the caller's without libpq settings (no token in it)."""
    return {
        k: v
        for k, v in environ.items()
        if (not k.startswith("PG") or k in _PSQL_KEPT) and k not in _DROPPED
    }


@contextlib.contextmanager
def password_file(plan: ConnectPlan, token: str) -> Iterator[str]:
    """Write the token to a password file for the plan's one server; remove it afterwards."""
    host, port = plan.endpoints[0]
    fields = (host, str(port), plan.database, plan.user, token)
    with tempfile.TemporaryDirectory(prefix="asyncpg-iam-psql-") as directory:
        path = Path(directory) / "pgpass"
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as file:
            file.write(":".join(_passfile_field(field) for field in fields) + "\n")
        yield str(path)


def run(args: argparse.Namespace) -> int:
    """Run ``asyncpg-iam psql``: psql (arguments after ``--``) until it exits."""
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
    connection_string(connector.plan, "")
    token = asyncio.run(sign(args, connector))
    with password_file(connector.plan, token) as passfile:
        argv = psql_command(program, extra, connection_string(connector.plan, passfile))
        sys.stdout.flush()
        sys.stderr.flush()
        child = subprocess.Popen(argv, env=psql_environment(os.environ))
        # psql handles Ctrl-C itself (it cancels the query); this process waits it out.
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            return child.wait()
        finally:
            signal.signal(signal.SIGINT, previous)
