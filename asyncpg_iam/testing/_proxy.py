"""The emulator's RDS Proxy mode: the pinning rules for PostgreSQL, applied to what it relays.

RDS Proxy multiplexes client sessions over database connections one transaction at a time
until it sees session state; then it pins the client session to its database connection for
the rest of the session and logs why. `PinRules` holds the conditions AWS's "Avoiding pinning
an RDS Proxy" page lists for PostgreSQL, `classify` applies them to one SQL text, and
`ProxySession` watches one client session's protocol messages (simple ``Query`` and the
extended protocol's ``Parse``). `ProxyLog` counts pinned sessions by reason and by cause, and
the startups refused for the ``options`` parameter.

Rules chosen where AWS's page is silent or has changed (each a `PinRules` switch):

- Protocol-level prepared statements (``Parse``) were a pin reason ("A parse message was
  detected") and are multiplexed now: they do not pin unless `parse_pins` is on.
- ``Declaring cursors`` pins: any ``DECLARE`` by default; with `cursors="with_hold"` only
  ``DECLARE ... WITH HOLD`` (a cursor without HOLD ends with its transaction).
- ``RESET`` pins as ``SET`` does (the page once listed "resetting a parameter to its
  default"), `reset_pins`. ``SET LOCAL``, ``SET TRANSACTION`` and ``SET CONSTRAINTS`` are
  transaction-scoped and do not pin.
- ``set_config(name, value, is_local)`` pins unless `is_local` is the literal ``true``: the
  proxy reads SQL text, so a parameter (``$3``) counts as session scope.
- Session-level advisory lock functions pin, unlocking included; the ``_xact_`` ones do not.
- ``UNLISTEN`` and ``CLOSE`` remove state and do not pin.

A pin's cause is ``"library"`` when the message is one a driver sends on its own (asyncpg's
default reset query, its type introspection's ``set_config('jit', ...)``; `LIBRARY_SQL`),
``"user"`` otherwise. The emulator keeps one backend connection per client: it counts what
would pin, it does not multiplex.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import re
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Literal

__all__ = [
    "LIBRARY_SQL",
    "OPTIONS_REFUSED",
    "PinEvent",
    "PinRules",
    "ProxyLog",
    "ProxyReport",
    "ProxySession",
    "classify",
    "is_library_sql",
    "statements",
]

logger = logging.getLogger("asyncpg_iam.testing.proxy")

#: What RDS Proxy answers a startup packet that carries ``options`` with (SQLSTATE 0A000).
OPTIONS_REFUSED = "Feature not supported: RDS Proxy currently doesn't support command-line options."

#: Statements drivers send on their own, by pattern: asyncpg's default pool reset query and the
#: ``jit`` switch around its type introspection.
LIBRARY_SQL = (
    re.compile(r"^\s*SELECT\s+pg_advisory_unlock_all\(\);\s*CLOSE ALL;", re.IGNORECASE),
    re.compile(r"set_config\('jit',", re.IGNORECASE),
)

_PIN_LOG = (
    "[clientConnection=%s] The client session was pinned to the database connection "
    "[dbConnection=%s] for the remainder of the session. The proxy can't reuse this "
    "connection until the session ends. Reason: %s"
)
_SETTINGS_REASON = (
    "SQL changed session settings that the proxy doesn't track. Consider moving session "
    'configuration to the proxy\'s initialization query. Digest: "{digest}".'
)
_REASONS = {
    "set": "A SET statement was detected.",
    "prepare": "A PREPARE, EXECUTE or DEALLOCATE statement was detected.",
    "temporary": "A temporary table, sequence or view was created.",
    "cursor": "A cursor was declared.",
    "discard": "A DISCARD statement was detected.",
    "listen": "A LISTEN statement was detected.",
    "load": "A LOAD statement was detected.",
    "sequence": "A sequence function (nextval, setval, currval, lastval) was called.",
    "advisory_lock": "A session-level advisory lock function was called.",
    "parse": "A parse message was detected.",
}
_SEQUENCE_FUNCTIONS = frozenset({"nextval", "setval", "currval", "lastval"})
_ADVISORY = re.compile(r"^pg_(try_)?advisory_(un)?lock(_shared|_all)?$")
_TOKEN = re.compile(r"[A-Za-z_][A-Za-z0-9_$]*|\$\d+|\S")
_DOLLAR_TAG = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)?\$")


@dataclasses.dataclass(frozen=True, slots=True)
class PinRules:
    """Which conditions pin a session; the defaults follow AWS's current page (see module doc)."""

    parse_pins: bool = False
    """A protocol-level ``Parse`` message pins (RDS Proxy's former behaviour)."""
    cursors: Literal["any", "with_hold"] = "any"
    """``any``: every ``DECLARE`` pins (AWS: "Declaring cursors"); ``with_hold``: only
    ``DECLARE ... WITH HOLD``."""
    reset_pins: bool = True
    """``RESET`` pins as ``SET`` does."""


@dataclasses.dataclass(frozen=True, slots=True)
class PinEvent:
    """Why one session was pinned: the rule, the proxy's log reason, who sent it, the SQL."""

    rule: str
    reason: str
    cause: Literal["library", "user"]
    sql: str


@dataclasses.dataclass(frozen=True, slots=True)
class ProxyReport:
    """What the proxy mode saw: sessions, pinned sessions by cause and by rule, refusals."""

    sessions: int
    pinned_sessions: int
    pinned_by_cause: dict[str, int]
    pinned_by_rule: dict[str, int]
    options_refused: int
    events: tuple[PinEvent, ...]


def _mask(sql: str) -> str:
    """Return `sql` with comments removed and literals and quoted names blanked out."""
    out: list[str] = []
    i, n = 0, len(sql)
    while i < n:
        c = sql[i]
        if sql.startswith("--", i):
            end = sql.find("\n", i)
            i = n if end < 0 else end
            continue
        if sql.startswith("/*", i):
            depth, i = 1, i + 2
            while i < n and depth:
                if sql.startswith("/*", i):
                    depth, i = depth + 1, i + 2
                elif sql.startswith("*/", i):
                    depth, i = depth - 1, i + 2
                else:
                    i += 1
            out.append(" ")
            continue
        if c in "'\"":
            backslashes = c == "'" and i > 0 and sql[i - 1] in "eE"
            j = i + 1
            while j < n:
                if backslashes and sql[j] == "\\":
                    j += 2
                    continue
                if sql[j] == c:
                    if j + 1 < n and sql[j + 1] == c:
                        j += 2
                        continue
                    break
                j += 1
            out.append(" '' " if c == "'" else ' "x" ')
            i = j + 1
            continue
        if c == "$":
            tag = _DOLLAR_TAG.match(sql, i)
            if tag is not None:
                end = sql.find(tag.group(0), tag.end())
                i = n if end < 0 else end + len(tag.group(0))
                out.append(" '' ")
                continue
        out.append(c)
        i += 1
    return "".join(out)


def statements(sql: str) -> Iterator[list[str]]:
    """Yield the lower-cased tokens of each statement of `sql` (literals blanked)."""
    for text in _mask(sql).split(";"):
        tokens = [token.lower() for token in _TOKEN.findall(text)]
        if tokens:
            yield tokens


def _first_rule(tokens: list[str], rules: PinRules) -> str | None:
    head = tokens[0]
    second = tokens[1] if len(tokens) > 1 else ""
    if head == "set":
        return None if second in ("local", "transaction", "constraints") else "set"
    if head == "reset":
        return "set" if rules.reset_pins else None
    if head in ("prepare", "execute", "deallocate"):
        return "prepare"
    if head == "discard":
        return "discard"
    if head == "listen":
        return "listen"
    if head == "load":
        return "load"
    if head == "declare":
        held = any(a == "with" and b == "hold" for a, b in itertools.pairwise(tokens))
        return "cursor" if rules.cursors == "any" or held else None
    if head == "create" and _creates_temporary(tokens):
        return "temporary"
    if head == "select" and _selects_into_temporary(tokens):
        return "temporary"
    return _function_rule(tokens)


def _creates_temporary(tokens: list[str]) -> bool:
    # CREATE [OR REPLACE] [GLOBAL | LOCAL] {TEMP | TEMPORARY} {TABLE | SEQUENCE | VIEW} ...
    for token in tokens[1:5]:
        if token in ("temp", "temporary"):
            return True
        if token not in ("or", "replace", "global", "local"):
            return False
    return False


def _selects_into_temporary(tokens: list[str]) -> bool:
    return any(a == "into" and b in ("temp", "temporary") for a, b in itertools.pairwise(tokens))


def _function_rule(tokens: list[str]) -> str | None:
    for index, token in enumerate(tokens[:-1]):
        if tokens[index + 1] != "(":
            continue  # not a call (a schema-qualified call: the name before the "(")
        if token in _SEQUENCE_FUNCTIONS:
            return "sequence"
        if _ADVISORY.match(token):
            return "advisory_lock"
        if token == "set_config" and not _local_set_config(tokens, index + 1):
            return "settings"
    return None


def _local_set_config(tokens: list[str], open_paren: int) -> bool:
    """Tell whether the ``set_config(...)`` call opening at `open_paren` has is_local = true."""
    depth, commas, third = 0, 0, []
    for token in tokens[open_paren:]:
        if token == "(":
            depth += 1
            if depth == 1:
                continue
        elif token == ")":
            depth -= 1
            if depth == 0:
                break
        if depth == 1 and token == ",":
            commas += 1
            continue
        if commas == 2:
            third.append(token)
    return third == ["true"]


def classify(sql: str, rules: PinRules = PinRules()) -> str | None:
    """Return the rule by which `sql` pins a session (``"set"``, ``"settings"``, ...) or None."""
    for tokens in statements(sql):
        rule = _first_rule(tokens, rules)
        if rule is not None:
            return rule
    return None


def is_library_sql(sql: str) -> bool:
    """Tell whether `sql` is a statement a driver sends on its own (`LIBRARY_SQL`)."""
    return any(pattern.search(sql) for pattern in LIBRARY_SQL)


def _digest(sql: str) -> str:
    return " ".join(_mask(sql).split()).lower()


def _reason(rule: str, sql: str) -> str:
    if rule == "settings":
        return _SETTINGS_REASON.format(digest=_digest(sql))
    return _REASONS[rule]


class ProxyLog:
    """Every session's pin, the refused startups, and the counts the report gives."""

    def __init__(self, rules: PinRules) -> None:
        self.rules = rules
        self.sessions = 0
        self.options_refused = 0
        self.events: list[PinEvent] = []
        self.on_pin: Callable[[PinEvent], None] | None = None

    def session(self, client: object, backend_pid: int | None) -> ProxySession:
        """Start watching one client session."""
        self.sessions += 1
        return ProxySession(self, client, backend_pid)

    def report(self) -> ProxyReport:
        """Return the counts so far."""
        return ProxyReport(
            sessions=self.sessions,
            pinned_sessions=len(self.events),
            pinned_by_cause=dict(Counter(event.cause for event in self.events)),
            pinned_by_rule=dict(Counter(event.rule for event in self.events)),
            options_refused=self.options_refused,
            events=tuple(self.events),
        )

    def reset(self) -> None:
        """Forget the counts (a benchmark between its runs)."""
        self.sessions = self.options_refused = 0
        self.events.clear()


class ProxySession:
    """One client session: pinned at most once, at the first message that pins it."""

    __slots__ = ("_backend_pid", "_client", "_log", "pinned")

    def __init__(self, log: ProxyLog, client: object, backend_pid: int | None) -> None:
        self._log = log
        self._client = client
        self._backend_pid = backend_pid
        self.pinned: PinEvent | None = None

    def observe(self, kind: bytes, body: bytes) -> None:
        """Look at one client message (type byte and payload) for session state."""
        if self.pinned is not None:
            return
        if kind == b"Q":
            sql = body.rstrip(b"\x00").decode("utf-8", "replace")
        elif kind == b"P":
            _name, _, rest = body.partition(b"\x00")
            sql = rest.partition(b"\x00")[0].decode("utf-8", "replace")
            if self._log.rules.parse_pins:
                self._pin("parse", sql)
                return
        else:
            return
        rule = classify(sql, self._log.rules)
        if rule is not None:
            self._pin(rule, sql)

    def _pin(self, rule: str, sql: str) -> None:
        cause: Literal["library", "user"] = "library" if is_library_sql(sql) else "user"
        event = PinEvent(rule, _reason(rule, sql), cause, sql)
        self.pinned = event
        self._log.events.append(event)
        logger.warning(_PIN_LOG, self._client, self._backend_pid, event.reason)
        if self._log.on_pin is not None:
            self._log.on_pin(event)
