"""The ``asyncpg-iam`` command: token, psql, doctor, emulate, demo, ca-bundle.

    asyncpg-iam token --host H --user U [AWS options]        print a token
    asyncpg-iam token --host ID.dsql.REGION.on.aws --user admin   an Aurora DSQL token
    asyncpg-iam psql --host H --user U [AWS options] [-- psql args]
    asyncpg-iam doctor --host H --user U [AWS options] [--json]
    asyncpg-iam emulate [--iam-user NAME]                     a local RDS with IAM, until Ctrl-C
    asyncpg-iam demo [--duration S]                           an IAM pool under load, offline
    asyncpg-iam ca-bundle [--output PATH] [--url URL]         download the RDS CA bundle

`asyncpg-iam --version` (or `python -m asyncpg_iam --version`) prints the installed version.

Exit status: 0 on success, 1 when the command failed (a check, a query, a download), 2 for
bad arguments. Only `token` ever prints a token: that is its job.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from .. import __version__
from .._errors import ConfigurationError, IAMError
from . import ca_bundle, demo, doctor, emulate, psql, token
from ._options import EXIT_FAILED, EXIT_USAGE, iam_auth_from, plan_from

__all__ = ["build_parser", "iam_auth_from", "main", "plan_from"]

# In the order `asyncpg-iam --help` lists them; each module adds its own subparser.
_COMMANDS = (token, psql, doctor, emulate, demo, ca_bundle)


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of the ``asyncpg-iam`` command."""
    parser = argparse.ArgumentParser(
        prog="asyncpg-iam",
        description="IAM database authentication for Amazon RDS and Aurora PostgreSQL.",
    )
    parser.add_argument("--version", action="version", version=f"asyncpg-iam {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in _COMMANDS:
        command.register(commands)
    return parser


def _split_passthrough(argv: list[str]) -> tuple[list[str], list[str]]:
    if argv and argv[0] == "psql" and "--" in argv:
        index = argv.index("--")
        return argv[:index], argv[index + 1 :]
    return argv, []


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``asyncpg-iam`` command with `argv` (default: the process's arguments)."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    arguments, extra = _split_passthrough(arguments)
    parser = build_parser()
    args: Any = parser.parse_args(arguments)
    if extra:
        args.psql_arguments = extra
    try:
        return int(args.run(args))
    except ConfigurationError as exc:
        sys.stderr.write(f"asyncpg-iam {args.command}: {exc}\n")
        return EXIT_USAGE
    except IAMError as exc:
        sys.stderr.write(f"asyncpg-iam {args.command}: {exc}\n")
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130
