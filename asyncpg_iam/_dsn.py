"""A DSN, parsed once: hosts, database, query and password, for every decision that reads it.

asyncpg parses the DSN again when it resolves the plan (`_connect`); everything of ours that
looks into a DSN (the TLS decision, Aurora DSQL's defaults, the writer default, the refused
``password=`` with IAM) reads this one parse.
"""

from __future__ import annotations

import urllib.parse

from ._errors import ConfigurationError

__all__ = ["DSN", "parse_dsn"]


class DSN:
    """The parts of a ``postgresql://`` DSN our defaults read (empty for no DSN).

    `path` is the database named in the path (``/app``), without the slash; `query` the
    query's settings (a setting given twice keeps its last value, as libpq does); `password`
    the password in the user info, else the query's ``password=`` (None: neither); `name`
    what messages call it (the SQLAlchemy engine's is "the URL"). A plain slotted class (as
    `_tls.TLSSetting` says why), never changed once made, with no repr (the password).
    """

    __slots__ = ("hosts", "name", "password", "path", "query")

    def __init__(
        self,
        *,
        hosts: tuple[str, ...] = (),
        path: str = "",
        query: dict[str, str] | None = None,
        password: str | None = None,
        name: str = "the DSN",
    ) -> None:
        self.hosts = hosts
        self.path = path
        self.query: dict[str, str] = {} if query is None else query
        self.password = password
        self.name = name


NO_DSN = DSN()


def parse_dsn(dsn: str | None, *, name: str = "the DSN") -> DSN:
    """Parse `dsn` (None: no DSN), which messages call `name`; raise `ConfigurationError` for
    one that cannot be split."""
    if not dsn:
        return NO_DSN
    try:
        parts = urllib.parse.urlsplit(dsn)
        query = urllib.parse.parse_qs(parts.query)
        # libpq takes the password from the user info or the query (``?password=``, blank too).
        in_query = urllib.parse.parse_qs(parts.query, keep_blank_values=True).get("password")
        password = parts.password or (in_query[-1] if in_query else None)
    except (ValueError, TypeError) as exc:
        raise ConfigurationError(
            f"invalid dsn: {exc}; pass one like 'postgresql://user@host:5432/database'"
        ) from exc
    netloc = parts.netloc.rpartition("@")[2]
    hosts = []
    for item in netloc.split(","):
        host = item[1:].partition("]")[0] if item.startswith("[") else item.partition(":")[0]
        if host:
            hosts.append(urllib.parse.unquote(host))
    return DSN(
        hosts=tuple(hosts),
        path=parts.path.lstrip("/"),
        query={key: values[-1] for key, values in query.items() if values},
        password=password,
        name=name,
    )
