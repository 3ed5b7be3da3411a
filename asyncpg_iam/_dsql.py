"""Aurora DSQL: what a pool does differently for a DSQL cluster, decided in one place.

DSQL accepts IAM logins only, with tokens for the ``dsql`` service (`build_dsql_token`). It ends
every connection after one hour, refuses more than 100 new connections per second per cluster
(SQLSTATE 53400), serves the database ``postgres``, and presents a certificate from a public CA
(not the RDS bundle). `connect_defaults` adds DSQL's connect defaults to the
plan (`_connect.plan_connect` calls it) and `limits` its lifetime and rate limits.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from ._dsn import DSN
from ._errors import ConfigurationError
from ._signing import is_dsql_host
from ._tls import CA_BUNDLE_ENV

if TYPE_CHECKING:
    from ._auth import IAMAuth

__all__ = [
    "DEFAULT_CONNECT_RATE",
    "DEFAULT_DATABASE",
    "DEFAULT_MAX_LIFETIME",
    "MAX_LIFETIME",
    "UNSET",
    "Unset",
    "connect_defaults",
    "is_dsql",
    "limits",
]

#: DSQL closes a connection one hour after it opened.
MAX_LIFETIME = 3600.0
#: Recycle well before the hour, so a connection is never cut under a query.
DEFAULT_MAX_LIFETIME = 3300.0
#: New connections per second a DSQL pool opens at most by default (DSQL's limit: 100 per
#: cluster, shared by every client).
DEFAULT_CONNECT_RATE = 50.0
DEFAULT_DATABASE = "postgres"
#: The pool's max_lifetime for RDS, where the token is valid for 900 s.
RDS_MAX_LIFETIME = 900.0


class Unset:
    """The type of `UNSET`: a keyword argument the caller did not pass.

    A plain class, not an enum: building an enum class costs every cold start 0.15 ms.
    """

    __slots__ = ()

    def __repr__(self) -> str:
        return "UNSET"


UNSET = Unset()


def _hosts(dsn: DSN, connect_kwargs: Mapping[str, Any], env: Mapping[str, str]) -> list[str]:
    host = connect_kwargs.get("host")
    if isinstance(host, str):
        return [host]
    if isinstance(host, Iterable):
        return [h for h in host if isinstance(h, str)]
    if dsn.hosts:
        return list(dsn.hosts)
    return [h for h in env.get("PGHOST", "").split(",") if h]


def is_dsql(auth: IAMAuth | None, hosts: Iterable[str]) -> bool:
    """Tell whether a pool with these IAM settings dialling `hosts` talks to DSQL."""
    if auth is None:
        return False
    if auth.service is not None:
        return auth.service == "dsql"
    if auth.signing_host is not None:
        return is_dsql_host(auth.signing_host)
    return any(is_dsql_host(host) for host in hosts)


def root_chosen(
    kwargs: Mapping[str, Any], dsn_query: Mapping[str, Any], env: Mapping[str, str]
) -> bool:
    """Tell whether the caller chose what verifies the server: a TLS context, a root
    certificate or a service (arguments, DSN or environment)."""
    return bool(
        isinstance(kwargs.get("ssl"), ssl.SSLContext)
        or kwargs.get("sslrootcert")
        or {"sslrootcert", "service"} & dsn_query.keys()
        or kwargs.get("service")
        or env.get("PGSSLROOTCERT")
        or env.get("PGSERVICE")
    )


def connect_defaults(
    dsn: DSN,
    connect_kwargs: Mapping[str, Any],
    *,
    auth: IAMAuth | None,
    environ: Mapping[str, str],
) -> tuple[bool, dict[str, Any]]:
    """Return whether the arguments describe a DSQL endpoint, and the connect arguments to plan.

    For DSQL, ``database="postgres"`` unless a database is named, and ``sslrootcert="system"``
    unless a TLS context, a root certificate, a service or ``$ASYNCPG_IAM_CA_BUNDLE`` is given:
    DSQL's certificates come from a public CA, which the cached RDS bundle would refuse.
    """
    kwargs = dict(connect_kwargs)
    if not is_dsql(auth, _hosts(dsn, kwargs, environ)):
        return False, kwargs
    named_database = (
        kwargs.get("database")
        or dsn.path
        or "dbname" in dsn.query
        or "database" in dsn.query
        or environ.get("PGDATABASE")
    )
    if not named_database:
        kwargs["database"] = DEFAULT_DATABASE
    if not (root_chosen(kwargs, dsn.query, environ) or environ.get(CA_BUNDLE_ENV)):
        kwargs["sslrootcert"] = "system"
    return True, kwargs


def limits(
    dsql: bool, max_lifetime: float | Unset | None, max_connect_rate: float | Unset | None
) -> tuple[float | None, float | None]:
    """Return the `max_lifetime` and `max_connect_rate` of an RDS or DSQL pool or engine.

    For DSQL: `max_lifetime` 3300 s by default and at most 3600 s, `max_connect_rate` 50 per
    second by default. For RDS: `max_lifetime` 900 s, no rate.
    """
    if not dsql:
        return (
            RDS_MAX_LIFETIME if isinstance(max_lifetime, Unset) else max_lifetime,
            None if isinstance(max_connect_rate, Unset) else max_connect_rate,
        )
    if isinstance(max_lifetime, Unset):
        max_lifetime = DEFAULT_MAX_LIFETIME
    elif max_lifetime is None or (
        isinstance(max_lifetime, (int, float))
        and not isinstance(max_lifetime, bool)
        and max_lifetime > MAX_LIFETIME
    ):
        raise ConfigurationError(
            f"max_lifetime must be at most {MAX_LIFETIME:g} s for Aurora DSQL, which ends every "
            f"connection after one hour (default {DEFAULT_MAX_LIFETIME:g}), not {max_lifetime!r}"
        )
    if isinstance(max_connect_rate, Unset):
        max_connect_rate = DEFAULT_CONNECT_RATE
    return max_lifetime, max_connect_rate
