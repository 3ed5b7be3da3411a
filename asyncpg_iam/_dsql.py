"""Aurora DSQL: what a pool does differently for a DSQL cluster, decided in one place.

DSQL accepts IAM logins only, with tokens for the ``dsql`` service (`build_dsql_token`). It ends
every connection after one hour, refuses more than 100 new connections per second per cluster
(SQLSTATE 53400), serves the database ``postgres``, and presents a certificate from a public CA
(not the RDS bundle). `pool_settings` turns what the caller passed into the settings a pool or an
engine uses: the same for RDS, DSQL defaults and limits for DSQL.
"""

from __future__ import annotations

import dataclasses
import enum
import os
import ssl
import urllib.parse
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

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
    "PoolSettings",
    "Unset",
    "connect_defaults",
    "is_dsql",
    "pool_settings",
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


class Unset(enum.Enum):
    """The type of `UNSET`: a keyword argument the caller did not pass."""

    UNSET = "UNSET"


UNSET = Unset.UNSET


@dataclasses.dataclass(frozen=True, slots=True)
class PoolSettings:
    """The settings a pool or engine runs with once DSQL has been accounted for."""

    dsql: bool
    max_lifetime: float | None
    max_connect_rate: float | None
    connect_kwargs: dict[str, Any]


def _dsn_parts(dsn: str | None) -> tuple[list[str], str, dict[str, list[str]]]:
    """Return the hosts, the path and the query of a DSN (empty when it has none)."""
    if not dsn:
        return [], "", {}
    try:
        parts = urllib.parse.urlsplit(dsn)
    except ValueError:
        return [], "", {}  # the pool's own parse reports a malformed DSN
    netloc = parts.netloc.rpartition("@")[2]
    hosts = []
    for item in netloc.split(","):
        host = item[1:].partition("]")[0] if item.startswith("[") else item.partition(":")[0]
        if host:
            hosts.append(urllib.parse.unquote(host))
    return hosts, parts.path.lstrip("/"), urllib.parse.parse_qs(parts.query)


def _hosts(
    dsn_hosts: list[str], connect_kwargs: Mapping[str, Any], env: Mapping[str, str]
) -> list[str]:
    host = connect_kwargs.get("host")
    if isinstance(host, str):
        return [host]
    if isinstance(host, Iterable):
        return [h for h in host if isinstance(h, str)]
    if dsn_hosts:
        return dsn_hosts
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
    *,
    dsn: str | None,
    auth: IAMAuth | None,
    connect_kwargs: Mapping[str, Any],
    environ: Mapping[str, str] | None = None,
) -> tuple[bool, dict[str, Any]]:
    """Return whether the arguments describe a DSQL endpoint, and the connect arguments to plan.

    For DSQL, ``database="postgres"`` unless a database is named, and ``sslrootcert="system"``
    unless a TLS context, a root certificate, a service or ``$ASYNCPG_IAM_CA_BUNDLE`` is given:
    DSQL's certificates come from a public CA, which the cached RDS bundle would refuse.
    """
    env = os.environ if environ is None else environ
    kwargs = dict(connect_kwargs)
    dsn_hosts, dsn_path, dsn_query = _dsn_parts(dsn)
    if not is_dsql(auth, _hosts(dsn_hosts, kwargs, env)):
        return False, kwargs
    named_database = (
        kwargs.get("database")
        or dsn_path
        or "dbname" in dsn_query
        or "database" in dsn_query
        or env.get("PGDATABASE")
    )
    if not named_database:
        kwargs["database"] = DEFAULT_DATABASE
    if not (root_chosen(kwargs, dsn_query, env) or env.get(CA_BUNDLE_ENV)):
        kwargs["sslrootcert"] = "system"
    return True, kwargs


def pool_settings(
    *,
    dsn: str | None,
    auth: IAMAuth | None,
    max_lifetime: float | Unset | None,
    max_connect_rate: float | Unset | None,
    connect_kwargs: dict[str, Any],
) -> PoolSettings:
    """Fill in the defaults (and check the limits) of an RDS or DSQL pool.

    For DSQL: `connect_defaults`, `max_lifetime` 3300 s by default and at most 3600 s,
    `max_connect_rate` 50 per second by default. For RDS: `max_lifetime` 900 s, no rate.
    """
    dsql, kwargs = connect_defaults(dsn=dsn, auth=auth, connect_kwargs=connect_kwargs)
    if not dsql:
        return PoolSettings(
            dsql=False,
            max_lifetime=RDS_MAX_LIFETIME if max_lifetime is UNSET else max_lifetime,
            max_connect_rate=None if max_connect_rate is UNSET else max_connect_rate,
            connect_kwargs=kwargs,
        )
    if max_lifetime is UNSET:
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
    if max_connect_rate is UNSET:
        max_connect_rate = DEFAULT_CONNECT_RATE
    return PoolSettings(
        dsql=True,
        max_lifetime=max_lifetime,
        max_connect_rate=max_connect_rate,
        connect_kwargs=kwargs,
    )
