"""``asyncpg-iam token``: print an IAM auth token (like ``aws rds generate-db-auth-token``)."""

from __future__ import annotations

import argparse
import asyncio
import sys

from .._connect import Connector
from .._errors import ConfigurationError
from .._signing import build_dsql_token
from ._options import EXIT_OK, Commands, add_aws, add_target, connector_from

__all__ = ["register", "sign"]


def register(commands: Commands) -> None:
    """Add the ``token`` command."""
    parser = commands.add_parser(
        "token",
        help="print an IAM auth token (like `aws rds generate-db-auth-token`)",
        description="Print an IAM authentication token for a database user, signed with the "
        "AWS credentials the options select (assume-role included).",
    )
    add_target(parser, database=False)
    add_aws(parser)
    dsql = parser.add_argument_group("Aurora DSQL")
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
    parser.set_defaults(run=run)


async def sign(args: argparse.Namespace, connector: Connector | None = None) -> str:
    """Return a token for the command's options, signed on the pool's connect path."""
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


def run(args: argparse.Namespace) -> int:
    """Run ``asyncpg-iam token``: the token on standard output."""
    token = asyncio.run(sign(args))
    sys.stdout.write(token + "\n")
    return EXIT_OK
