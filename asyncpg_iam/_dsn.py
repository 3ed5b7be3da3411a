"""A DSN, parsed once: hosts, database, query and password, for every decision that reads it.

asyncpg parses the DSN again when it resolves the plan (`_connect`); everything of ours that
looks into a DSN (the TLS decision, Aurora DSQL's defaults, the writer default, the refused
``password=`` with IAM) reads this one parse.
"""

from __future__ import annotations

import dataclasses
import urllib.parse

from ._errors import ConfigurationError

__all__ = ["DSN", "parse_dsn"]


@dataclasses.dataclass(frozen=True, slots=True)
class DSN:
    """The parts of a ``postgresql://`` DSN our defaults read (empty for no DSN)."""

    hosts: tuple[str, ...] = ()
    path: str = ""
    """The database named in the path (``/app``), without the slash."""
    query: dict[str, str] = dataclasses.field(default_factory=dict)
    """The query's settings; a setting given twice keeps its last value, as libpq does."""
    password: str | None = dataclasses.field(default=None, repr=False)
    """The password in the user info, else the query's ``password=`` (None: neither)."""
    name: str = "the DSN"
    """What messages call it (the SQLAlchemy engine's is "the URL")."""


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
