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
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from ._errors import ConfigurationError
from ._signing import is_dsql_host

if TYPE_CHECKING:
    from ._auth import IAMAuth

__all__ = [
    "DEFAULT_CONNECT_RATE",
    "DEFAULT_MAX_LIFETIME",
    "MAX_LIFETIME",
    "UNSET",
    "PoolSettings",
    "Unset",
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


def _hosts(dsn_hosts: list[str], connect_kwargs: dict[str, Any]) -> list[str]:
    host = connect_kwargs.get("host")
    if isinstance(host, str):
        return [host]
    if isinstance(host, Iterable):
        return [h for h in host if isinstance(h, str)]
    if dsn_hosts:
        return dsn_hosts
    return [h for h in os.environ.get("PGHOST", "").split(",") if h]


def is_dsql(auth: IAMAuth | None, hosts: Iterable[str]) -> bool:
    """Tell whether a pool with these IAM settings dialling `hosts` talks to DSQL."""
    if auth is None:
        return False
    if auth.service is not None:
        return auth.service == "dsql"
    if auth.signing_host is not None:
        return is_dsql_host(auth.signing_host)
    return any(is_dsql_host(host) for host in hosts)


def dsql_ssl_context() -> ssl.SSLContext:
    """Return a verify-full context for DSQL: ``$ASYNCPG_IAM_CA_BUNDLE`` or the system store.

    DSQL's certificates come from a public CA, so the cached RDS bundle would refuse them.
    """
    bundle = os.environ.get("ASYNCPG_IAM_CA_BUNDLE") or None
    context = ssl.create_default_context(cafile=bundle)
    context.check_hostname = True
    context.verify_mode = ssl.CERT_REQUIRED
    return context


def pool_settings(
    *,
    dsn: str | None,
    auth: IAMAuth | None,
    max_lifetime: float | Unset | None,
    max_connect_rate: float | Unset | None,
    connect_kwargs: dict[str, Any],
) -> PoolSettings:
    """Fill in the defaults (and check the limits) of an RDS or DSQL pool.

    For DSQL: database ``postgres`` unless one is named, `max_lifetime` 3300 s by default and
    at most 3600 s, `max_connect_rate` 50 per second by default, and verify-full TLS against
    the system store unless TLS settings are given. For RDS: `max_lifetime` 900 s, no rate.
    """
    dsn_hosts, dsn_path, dsn_query = _dsn_parts(dsn)
    if not is_dsql(auth, _hosts(dsn_hosts, connect_kwargs)):
        return PoolSettings(
            dsql=False,
            max_lifetime=RDS_MAX_LIFETIME if max_lifetime is UNSET else max_lifetime,
            max_connect_rate=None if max_connect_rate is UNSET else max_connect_rate,
            connect_kwargs=connect_kwargs,
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
    kwargs = dict(connect_kwargs)
    named_database = (
        "database" in kwargs
        or dsn_path
        or "dbname" in dsn_query
        or "database" in dsn_query
        or os.environ.get("PGDATABASE")
    )
    if not named_database:
        kwargs["database"] = DEFAULT_DATABASE
    chose_tls = (
        "ssl" in kwargs
        or {"ssl", "sslmode", "sslrootcert"} & dsn_query.keys()
        or os.environ.get("PGSSLMODE")
        or os.environ.get("PGSSLROOTCERT")
    )
    if not chose_tls:
        kwargs["ssl"] = dsql_ssl_context()
    return PoolSettings(
        dsql=True,
        max_lifetime=max_lifetime,
        max_connect_rate=max_connect_rate,
        connect_kwargs=kwargs,
    )
