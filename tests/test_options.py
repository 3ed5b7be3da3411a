"""The shared validators (asyncpg_iam._options): strict about type, range and whole matches."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest

from asyncpg_iam import ConfigurationError
from asyncpg_iam._options import (
    MAX_RATE,
    MAX_SECONDS,
    MIN_RATE,
    PoolOptions,
    count,
    fraction,
    host,
    matches,
    port,
    positive_seconds,
    rate,
    seconds,
)

NOT_NUMBERS = [True, False, "1", None, float("nan"), float("inf"), -float("inf"), 10**400]


@pytest.mark.parametrize(
    ("validator", "bad"),
    [
        (positive_seconds, [*NOT_NUMBERS, 0, -1, MAX_SECONDS * 2]),
        (seconds, [*NOT_NUMBERS, -0.001, MAX_SECONDS * 2]),
        (fraction, [*NOT_NUMBERS, -0.1, 1, 1.5]),
        (rate, [*NOT_NUMBERS, 0, -1, 1e-300, MIN_RATE / 2, MAX_RATE * 2]),
        (count, [*NOT_NUMBERS, -1, 1.0, 10**7]),
        (port, [*NOT_NUMBERS, 0, 65536, 70000, 5432.0]),
        (host, [None, 1, "", " ", "db\n", "a b", "db\x00"]),
    ],
)
def test_validators_refuse_what_is_out_of_their_domain(
    validator: Callable[[str, Any], Any], bad: list[Any]
) -> None:
    """Each validator refuses bools, NaN, infinities, huge ints and out-of-range values, naming
    the setting."""
    for value in bad:
        with pytest.raises(ConfigurationError, match=r"^the_setting must be"):
            validator("the_setting", value)


def test_validators_return_what_they_accept() -> None:
    """In-range values come back unchanged (as numbers where numbers are taken)."""
    assert positive_seconds("s", 900) == 900
    assert seconds("s", 0) == 0
    assert fraction("f", 0.1) == 0.1
    assert rate("r", 50) == 50
    assert count("c", 0) == 0
    assert port("p", 65535) == 65535
    assert host("h", "db.example.com") == "db.example.com"


def test_matches_refuses_a_trailing_newline() -> None:
    """A pattern must match the whole string: 'us-east-1\\n' is not a region."""
    region = re.compile(r"[a-z]{2}-[a-z]+-\d")
    assert matches(region, "us-east-1")
    assert not matches(region, "us-east-1\n")
    assert not matches(region, None)


def test_pool_options_are_checked_when_made() -> None:
    """PoolOptions refuses a bad lifetime, jitter or rate; None means unlimited."""
    assert PoolOptions(None, 0.0, None).max_lifetime is None
    with pytest.raises(ConfigurationError, match="max_lifetime"):
        PoolOptions(-1, 0.1, None)
    with pytest.raises(ConfigurationError, match="max_lifetime_jitter"):
        PoolOptions(900, 1.0, None)
    with pytest.raises(ConfigurationError, match="max_connect_rate"):
        PoolOptions(900, 0.1, 1e-300)
