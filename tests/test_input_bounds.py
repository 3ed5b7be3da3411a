"""Every input is validated in full and bounded (issue 27, class 6).

Property tests over each argument's domain: whatever is accepted lies inside the documented
bounds, and whatever lies outside is refused with a `ConfigurationError` naming the setting,
before any I/O. Strings are matched whole (a trailing newline is not a region), numbers are
bounded at both ends (``10**400`` and ``1e-300`` are not rates), ports are checked when the
pool is made, not at the first connect.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import asyncpg_iam
from asyncpg_iam import ConfigurationError, Credentials, IAMAuth
from asyncpg_iam.testing._aws_fixtures import isolate_aws_environment

KEY = Credentials("AKIABOUNDSBOUNDS0001", "bounds-secret-" + "b" * 26)
ENDPOINT = "mydb.abcdefghijkl.us-east-1.rds.amazonaws.com"
PROPERTY = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
# The documented bounds (docs/reference and asyncpg_iam._connect).
MIN_CONNECT_RATE, MAX_CONNECT_RATE, MAX_TIMEOUT = 0.01, 1e6, 86_400.0
# Characters that end or pad a line: never part of a region, name or ARN.
_PADDING = st.sampled_from(["\n", "\r\n", " ", "\t", "\x00", "%0A", "\u2028"])


@pytest.fixture(autouse=True)
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """No host AWS configuration."""
    isolate_aws_environment(monkeypatch, tmp_path_factory)
    for name in ("PGHOST", "PGPORT", "PGSSLMODE", "PGSERVICE", "PGPASSWORD", "PGKRBSRVNAME"):
        monkeypatch.delenv(name, raising=False)


def _pool(dsn: str | None = None, **kwargs: Any) -> asyncpg_iam.Pool:
    async def build() -> asyncpg_iam.Pool:
        return asyncpg_iam.create_pool(dsn, **kwargs)

    return asyncio.run(build())


def _iam(**kwargs: Any) -> IAMAuth:
    return IAMAuth(region="us-east-1", credentials=KEY, **kwargs)


VALID = {
    "region": "us-east-1",
    "signing_host": ENDPOINT,
    "role_arn": "arn:aws:iam::123456789012:role/app",
    "role_session_name": "app-session",
}


@PROPERTY
@given(name=st.sampled_from(sorted(VALID)), padding=_PADDING, front=st.booleans())
@example(name="region", padding="\n", front=False)
def test_padded_names_are_refused(name: str, padding: str, front: bool) -> None:
    """A region, signing host, role ARN or session name with a newline, space, NUL or
    encoded newline before or after it is refused, naming the setting."""
    kwargs: dict[str, Any] = dict(VALID)
    value = padding + kwargs[name] if front else kwargs[name] + padding
    kwargs[name] = value
    if name != "region":
        kwargs.pop("region")
        kwargs["region"] = "us-east-1"
    with pytest.raises(ConfigurationError) as caught:
        IAMAuth(credentials=KEY, **kwargs)
    assert name in str(caught.value)


@PROPERTY
@given(region=st.text(max_size=20))
def test_an_accepted_region_is_a_region_name(region: str) -> None:
    """Any text accepted as a region is a whole AWS region name (letters, dashes, digits)."""
    try:
        IAMAuth(region=region, credentials=KEY)
    except ConfigurationError as exc:
        message = str(exc)
    else:
        assert region.isascii()
        assert region == region.strip()
        assert region.replace("-", "").isalnum()
        return
    assert "region" in message


_rates: st.SearchStrategy[Any] = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-(10**500), max_value=10**500),
    st.sampled_from([10**400, 1e-300, 5e-324, 0.009, 0.01, 1e6, 1e6 + 1, True]),
)


@PROPERTY
@given(rate=_rates)
@example(rate=10**400)
@example(rate=1e-300)
def test_max_connect_rate_is_bounded(rate: Any) -> None:
    """max_connect_rate is accepted from one connect per 100 s to a million a second, and
    refused otherwise with a ConfigurationError (never an OverflowError, never a wait that
    outlasts every timeout)."""
    inside = (
        not isinstance(rate, bool)
        and isinstance(rate, (int, float))
        and MIN_CONNECT_RATE <= rate <= MAX_CONNECT_RATE
    )
    if inside:
        pool = _pool(host=ENDPOINT, user="app", iam=_iam(), max_connect_rate=rate)
        assert pool.settings.max_connect_rate == rate
        return
    with pytest.raises(ConfigurationError, match="max_connect_rate must be"):
        _pool(host=ENDPOINT, user="app", iam=_iam(), max_connect_rate=rate)


@PROPERTY
@given(
    name=st.sampled_from(["timeout", "command_timeout"]),
    value=st.one_of(
        st.floats(allow_nan=True, allow_infinity=True),
        st.integers(min_value=-(10**400), max_value=10**400),
        st.sampled_from([-1, 0, 1e-9, MAX_TIMEOUT, MAX_TIMEOUT + 1]),
    ),
)
@example(name="timeout", value=-1)
def test_timeouts_are_bounded(name: str, value: Any) -> None:
    """A connect or command timeout must be seconds in (0, a day]: -1, 0, NaN and 10**400
    are refused when the pool is made."""
    inside = (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and not (isinstance(value, float) and math.isnan(value))
        and 0 < value <= MAX_TIMEOUT
    )
    if inside:
        _pool(host=ENDPOINT, user="app", iam=_iam(), **{name: value})
        return
    with pytest.raises(ConfigurationError, match=f"{name} must be"):
        _pool(host=ENDPOINT, user="app", iam=_iam(), **{name: value})


@PROPERTY
@given(
    port=st.integers(min_value=-5, max_value=200_000),
    where=st.sampled_from(["argument", "dsn", "list"]),
)
@example(port=70000, where="argument")
@example(port=0, where="dsn")
def test_ports_are_checked_when_the_pool_is_made(port: int, where: str) -> None:
    """A port outside 1..65535 is refused at creation, from an argument, a list or the DSN."""
    if where == "dsn":
        make = lambda: _pool(f"postgresql://app@{ENDPOINT}:{port}/app", iam=_iam())  # noqa: E731
    elif where == "list":
        make = lambda: _pool(  # noqa: E731
            host=[ENDPOINT, ENDPOINT], port=[5432, port], user="app", iam=_iam()
        )
    else:
        make = lambda: _pool(host=ENDPOINT, port=port, user="app", iam=_iam())  # noqa: E731
    if 1 <= port <= 65535:
        make()
        return
    with pytest.raises(ConfigurationError, match="port"):
        make()


@pytest.mark.parametrize("host", [" ", "  ", "\t", "db\n", "db .example", "\x00db"])
@pytest.mark.parametrize("iam", [True, False])
def test_blank_or_padded_hosts_are_refused(host: str, iam: bool) -> None:
    """A host of spaces, or with a newline, space or NUL in it, is refused at creation."""
    if iam:
        kwargs: dict[str, Any] = {"iam": _iam(signing_host=ENDPOINT)}
    else:
        kwargs = {"iam": False, "password": "x"}
    with pytest.raises(ConfigurationError, match="host"):
        _pool(host=host, user="app", **kwargs)


@pytest.mark.parametrize(
    "dsn",
    [
        f"postgresql://app@{ENDPOINT}/app?password=secret",
        f"postgresql://app@{ENDPOINT}/app?password=",
        f"postgresql://app:secret@{ENDPOINT}/app",
    ],
)
def test_a_password_in_the_dsn_is_refused_with_iam(dsn: str) -> None:
    """A password in the DSN, in its user info or as ?password=, is refused with IAM."""
    with pytest.raises(ConfigurationError, match="password cannot be combined"):
        _pool(dsn, iam=_iam())


@pytest.mark.parametrize("name", ["krbsrvname", "gsslib"])
@pytest.mark.parametrize("source", ["argument", "dsn"])
def test_kerberos_settings_are_refused_with_iam(name: str, source: str) -> None:
    """krbsrvname and gsslib are refused with IAM (a token login never uses Kerberos)."""
    value = "postgres" if name == "krbsrvname" else "gssapi"
    if source == "dsn":
        dsn, kwargs = f"postgresql://app@{ENDPOINT}/app?{name}={value}", {}
    else:
        dsn, kwargs = None, {"host": ENDPOINT, "user": "app", name: value}
    with pytest.raises(ConfigurationError, match=name):
        _pool(dsn, iam=_iam(), **kwargs)


@pytest.mark.parametrize("source", ["argument", "dsn", "environment"])
def test_kerberos_settings_are_applied_without_iam(
    source: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without IAM, krbsrvname reaches asyncpg's connect arguments from every source."""
    dsn, kwargs = None, {"host": "127.0.0.1", "user": "app", "password": "x"}
    if source == "argument":
        kwargs["krbsrvname"] = "kerb"
    elif source == "dsn":
        dsn, kwargs = "postgresql://app:x@127.0.0.1/app?krbsrvname=kerb", {}
    else:
        monkeypatch.setenv("PGKRBSRVNAME", "kerb")
    pool = _pool(dsn, iam=False, **kwargs)
    assert pool._connector.plan.asyncpg_kwargs()["krbsrvname"] == "kerb"


@PROPERTY
@given(value=_rates)
@example(value=10**400)
def test_max_lifetime_is_bounded(value: Any) -> None:
    """max_lifetime is seconds more than 0 and at most a year (or None), else refused."""
    inside = (
        not isinstance(value, bool)
        and isinstance(value, (int, float))
        and 0 < value <= 366 * 86_400
    )
    if inside:
        _pool(host=ENDPOINT, user="app", iam=_iam(), max_lifetime=value)
        return
    with pytest.raises(ConfigurationError, match="max_lifetime must be"):
        _pool(host=ENDPOINT, user="app", iam=_iam(), max_lifetime=value)
