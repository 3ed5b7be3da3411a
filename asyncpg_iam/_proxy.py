"""RDS Proxy: what a pool does differently on a proxy endpoint, decided in one place.

RDS Proxy multiplexes client sessions over few database connections, one transaction at a
time, until it sees session state; then it pins the session to one database connection for
good. asyncpg creates session state on its own: its default reset query (``SELECT
pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL;``) and the ``set_config('jit',
'off', false)`` around its type introspection pin every session that runs them. On a proxy
endpoint (``<name>.proxy-<id>.<region>.rds.amazonaws.com``, or ``rds_proxy=True``):

- each connection is adopted (`adopt`): its reset sends nothing to the server (asyncpg still
  rolls back an open transaction and drops its listeners), and its type introspection runs
  without switching ``jit``, so what the library and asyncpg send on their own never pins;
- the certificate is verified (verify-full) against the system trust store unless a root is
  chosen: the proxy presents certificates from Amazon's public CAs, not the RDS CA bundle;
- ``options`` in the startup packet, which the proxy refuses, is a `ConfigurationError`;
  other ``server_settings`` travel in the startup packet and do not pin;
- `warn_session_state` says once, at creation, when the pool's ``init``, ``setup`` or
  ``reset`` will run the caller's SQL on every connection or acquire, where a ``SET`` pins.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from ._dsql import _hosts, root_chosen
from ._errors import ConfigurationError

if TYPE_CHECKING:
    from ._auth import IAMAuth
    from ._dsn import DSN

__all__ = ["adopt", "is_proxy_host", "proxy_defaults", "refuse_options", "warn_session_state"]

logger = logging.getLogger("asyncpg_iam.pool")

#: The keyword that says the endpoint is (True) or is not (False) an RDS Proxy.
KEYWORD = "rds_proxy"
_OPTIONS_REFUSED = (
    "RDS Proxy currently doesn't support command-line options (the `options` startup "
    "parameter, from {source}): pass each setting in server_settings={{'name': 'value'}} "
    "instead (sent at startup, it does not pin the session), or set it on the database user "
    "(ALTER ROLE ... SET)"
)
_POOL_HOOKS = ("init", "setup", "reset")


def is_proxy_host(host: str) -> bool:
    """Tell whether `host` is an RDS Proxy endpoint name (``*.proxy-*.<region>.rds...``)."""
    labels = host.lower().rstrip(".").split(".")
    if len(labels) < 6 or not labels[1].startswith("proxy-"):
        return False
    return labels[3:6] == ["rds", "amazonaws", "com"] and labels[6:] in ([], ["cn"])


def _is_proxy(explicit: Any, auth: IAMAuth | None, hosts: Iterable[str]) -> bool:
    if explicit is not None:
        if not isinstance(explicit, bool):
            raise ConfigurationError(
                f"rds_proxy must be True (the endpoint is an RDS Proxy), False (it is not) or "
                f"left out (decided from the host name), not {explicit!r}"
            )
        return explicit
    if auth is not None and auth.signing_host is not None:
        return is_proxy_host(auth.signing_host)
    return any(is_proxy_host(host) for host in hosts)


def proxy_defaults(
    dsn: DSN,
    connect_kwargs: Mapping[str, Any],
    *,
    auth: IAMAuth | None,
    environ: Mapping[str, str],
) -> tuple[bool, dict[str, Any]]:
    """Return whether the arguments describe an RDS Proxy endpoint, and the arguments to plan.

    Takes the ``rds_proxy`` keyword out. For a proxy, adds ``sslrootcert="system"`` unless a
    TLS context, a root certificate or a service is given (``$ASYNCPG_IAM_CA_BUNDLE`` is the
    RDS bundle, which does not verify a proxy, so it does not count).
    """
    kwargs = dict(connect_kwargs)
    explicit = kwargs.pop(KEYWORD, None)
    if not _is_proxy(explicit, auth, _hosts(dsn, kwargs, environ)):
        return False, kwargs
    if not root_chosen(kwargs, dsn.query, environ):
        kwargs["sslrootcert"] = "system"
    return True, kwargs


def refuse_options(server_settings: Mapping[str, str] | None, dsn: str | None) -> None:
    """Raise `ConfigurationError` when the startup packet would carry ``options``."""
    if server_settings and "options" in server_settings:
        source = "the DSN" if dsn and "options=" in dsn else "server_settings"
        raise ConfigurationError(_OPTIONS_REFUSED.format(source=source))


def adopt(con: Any) -> Any:
    """Make `con` (an asyncpg connection to a proxy) send no session state on its own.

    Its reset query becomes empty (asyncpg's ``reset`` still rolls back and drops listeners)
    and its type introspection no longer wraps itself in ``set_config('jit', ...)``, which
    asyncpg does when the server capabilities say ``jit``. Return `con`.
    """
    con._reset_query = ""
    caps = con._server_caps
    if caps.jit:
        con._server_caps = caps._replace(jit=False)
    return con


def warn_session_state(name: str, pool_kwargs: Mapping[str, Any]) -> None:
    """Log once, at creation, which of the pool's hooks run the caller's SQL on a proxy."""
    given = [hook for hook in _POOL_HOOKS if pool_kwargs.get(hook) is not None]
    if not given:
        return
    logger.warning(
        "pool %s: RDS Proxy endpoint: %s run%s your code on every %s; a SET (not SET LOCAL), "
        "set_config(..., false), PREPARE, LISTEN, temporary table, sequence function or "
        "session-level advisory lock there pins each session to one database connection. "
        "Pass settings as server_settings (sent at startup, no pin) or move them to the "
        "proxy's initialization query",
        name,
        " and ".join(given),
        "s" if len(given) == 1 else "",
        "connection, acquire or release" if len(given) > 1 else _WHEN[given[0]],
    )


_WHEN = {"init": "new connection", "setup": "acquire", "reset": "release"}
