"""Options validated once: the pool's and engine's own options, and the validators they share.

One validator per kind of value (seconds, a timeout, a fraction, a rate, a port, a host, a
count, a pattern), each strict: it refuses ``bool`` (an ``int`` to Python), NaN, infinities,
values out of its bounds and strings that only match up to a trailing newline, and raises
`ConfigurationError` naming the setting and what it takes. The bounds are the constants below.
`PoolOptions` is the pool's and the engine's frozen options value, checked when it is made.
"""

from __future__ import annotations

import math
import re
from typing import Any

from ._errors import ConfigurationError

__all__ = [
    "BLUE_GREEN_HOLD",
    "MAX_RATE",
    "MAX_SECONDS",
    "MAX_TIMEOUT",
    "MIN_RATE",
    "PoolOptions",
    "count",
    "fraction",
    "host",
    "matches",
    "port",
    "positive_seconds",
    "rate",
    "seconds",
    "timeout",
]

#: The longest duration any setting takes, in seconds (a year): longer is a mistake.
MAX_SECONDS = 365 * 86400.0
#: The longest connect or command timeout, in seconds (a day).
MAX_TIMEOUT = 86400.0
#: The fastest rate a setting takes (events per second).
MAX_RATE = 1_000_000.0
#: The slowest rate a setting takes (one event every 100 s): slower would wait past any
#: timeout.
MIN_RATE = 0.01
#: Seconds a blue/green switchover holds connects at most by default (`BlueGreenSettings`).
BLUE_GREEN_HOLD = 30.0


def _number(value: Any) -> float | None:
    """Return `value` as a finite float, or None when it is not a real, finite number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:  # an int too large for a float
        return None
    return number if math.isfinite(number) else None


def _shown(value: Any) -> str:
    """Return `value`'s repr for a message, cut to 40 characters (10**400 is 401 digits)."""
    try:
        shown = repr(value)
    except ValueError:  # an int beyond Python's digit limit for str()
        return "a number too large to print"
    return shown if len(shown) <= 40 else shown[:37] + "..."


def positive_seconds(name: str, value: Any, *, hint: str = "") -> float:
    """Return `value`, seconds in (0, `MAX_SECONDS`]; else raise naming `name`."""
    number = _number(value)
    if number is None or not 0 < number <= MAX_SECONDS:
        raise ConfigurationError(
            f"{name} must be seconds > 0 and at most {MAX_SECONDS:g}{hint}, not {_shown(value)}"
        )
    return number


def timeout(name: str, value: Any) -> float | None:
    """Return `value`, None (no limit) or seconds in (0, `MAX_TIMEOUT`]; else raise naming
    `name`."""
    if value is None:
        return None
    number = _number(value)
    if number is None or not 0 < number <= MAX_TIMEOUT:
        raise ConfigurationError(
            f"{name} must be seconds > 0 and at most {MAX_TIMEOUT:g} (a day), or None, "
            f"not {_shown(value)}"
        )
    return number


def seconds(name: str, value: Any, *, hint: str = "") -> float:
    """Return `value`, seconds in [0, `MAX_SECONDS`]; else raise naming `name`."""
    number = _number(value)
    if number is None or not 0 <= number <= MAX_SECONDS:
        raise ConfigurationError(
            f"{name} must be seconds >= 0 and at most {MAX_SECONDS:g}{hint}, not {_shown(value)}"
        )
    return number


def fraction(name: str, value: Any, *, hint: str = "") -> float:
    """Return `value`, a fraction in [0, 1); else raise naming `name`."""
    number = _number(value)
    if number is None or not 0 <= number < 1:
        raise ConfigurationError(f"{name} must be a fraction in [0, 1){hint}, not {_shown(value)}")
    return number


def rate(name: str, value: Any, *, what: str = "events", hint: str = "") -> float:
    """Return `value`, `what` per second in [`MIN_RATE`, `MAX_RATE`]; else raise."""
    number = _number(value)
    if number is None or not MIN_RATE <= number <= MAX_RATE:
        raise ConfigurationError(
            f"{name} must be {what} per second from {MIN_RATE:g} to {MAX_RATE:g}{hint}, "
            f"not {_shown(value)}"
        )
    return number


def count(name: str, value: Any, *, minimum: int = 0, maximum: int = 1_000_000) -> int:
    """Return `value`, a whole number in [`minimum`, `maximum`]; else raise naming `name`."""
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        raise ConfigurationError(
            f"{name} must be a whole number from {minimum} to {maximum}, not {_shown(value)}"
        )
    return value


def port(name: str, value: Any) -> int:
    """Return `value`, a TCP port from 1 to 65535; else raise naming `name`."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise ConfigurationError(f"{name} must be a TCP port from 1 to 65535, not {_shown(value)}")
    return value


def matches(pattern: re.Pattern[str], value: Any) -> bool:
    """Tell whether `value` is a string `pattern` matches whole (no trailing newline)."""
    return isinstance(value, str) and pattern.fullmatch(value) is not None


def host(name: str, value: Any) -> str:
    """Return `value`, a host name or address: a string, not blank, without whitespace or
    characters that do not print (control, format, separators); else raise naming `name`."""
    if (
        not isinstance(value, str)
        or not value
        or any(c.isspace() or not c.isprintable() for c in value)
    ):
        raise ConfigurationError(
            f"{name} must be a host name or address without spaces, not {_shown(value)}"
        )
    return value


class PoolOptions:
    """The pool's (and the engine's) own options, checked when made; defaults already applied
    (`_dsql.limits`).

    `max_lifetime`: seconds a connection lives at most (None: forever);
    `max_lifetime_jitter`: the fraction of `max_lifetime` a replacement's lifetime is spread
    over; `max_connect_rate`: new connections a second at most (None: no limit). A plain
    slotted class (as `_tls.TLSSetting` says why), never changed once made.
    """

    __slots__ = ("max_connect_rate", "max_lifetime", "max_lifetime_jitter")

    def __init__(
        self,
        max_lifetime: float | None,
        max_lifetime_jitter: float,
        max_connect_rate: float | None,
    ) -> None:
        self.max_lifetime = max_lifetime
        self.max_lifetime_jitter = max_lifetime_jitter
        self.max_connect_rate = max_connect_rate
        self._check()

    def _check(self) -> None:
        if self.max_lifetime is not None:
            positive_seconds(
                "max_lifetime",
                self.max_lifetime,
                hint=" (900 matches the token's validity), or None to keep connections forever",
            )
        fraction(
            "max_lifetime_jitter",
            self.max_lifetime_jitter,
            hint=" (0.1 spreads reconnects over the last 10% of the lifetime)",
        )
        if self.max_connect_rate is not None:
            rate(
                "max_connect_rate",
                self.max_connect_rate,
                what="new connections",
                hint=", or None for no limit",
            )
