"""The token signer equals botocore's generate_db_auth_token; region_from_host; Credentials."""

from __future__ import annotations

import datetime as dt
import re
from unittest import mock

import botocore.session
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asyncpg_iam._errors import ConfigurationError
from asyncpg_iam._signing import (
    Credentials,
    _rds_region,
    _signing_key,
    build_auth_token,
    region_from_host,
)

UTC = dt.timezone.utc
_BOTOCORE = botocore.session.get_session()


def botocore_token(
    host: str, port: int, user: str, region: str, credentials: Credentials, now: dt.datetime
) -> str:
    """Sign with botocore, its clock frozen at `now` (as botocore's own tests freeze it)."""
    client = _BOTOCORE.create_client(
        "rds",
        region_name="us-east-1",
        aws_access_key_id=credentials.access_key,
        aws_secret_access_key=credentials.secret_key,
        aws_session_token=credentials.token,
    )
    naive = now.astimezone(UTC).replace(tzinfo=None)
    with mock.patch("botocore.auth.get_current_datetime", return_value=naive):
        return str(client.generate_db_auth_token(host, port, user, region))


_label = st.from_regex(r"[a-zA-Z0-9]([a-zA-Z0-9-]{0,14}[a-zA-Z0-9])?", fullmatch=True)
_dns = st.lists(_label, min_size=1, max_size=6).map(".".join)
_rds = st.builds(
    lambda name, kind, ident, region, upper: (
        (f"{name}.{kind}{ident}.{region}.rds.amazonaws.com").upper()
        if upper
        else f"{name}.{kind}{ident}.{region}.rds.amazonaws.com"
    ),
    _label,
    st.sampled_from(["", "cluster-", "cluster-ro-", "cluster-custom-", "proxy-"]),
    st.from_regex(r"[a-z0-9]{12}", fullmatch=True),
    st.sampled_from(["us-east-1", "eu-west-2", "us-gov-west-1", "ap-southeast-3"]),
    st.booleans(),
)
_ipv4 = st.ip_addresses(v=4).map(str)
_ipv6 = st.ip_addresses(v=6).map(lambda ip: f"[{str(ip).upper()}]")
_hosts = st.one_of(_dns, _rds, _ipv4, _ipv6)
_users = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=24
)
_regions = st.one_of(
    st.sampled_from(["us-east-1", "eu-central-1", "cn-north-1", "us-gov-east-1", "il-central-1"]),
    st.from_regex(r"[a-z]{2}-[a-z]{4,9}-[1-9]", fullmatch=True),
)
_printable = st.characters(min_codepoint=33, max_codepoint=126)
# Hypothesis also draws strings from literals in the project's source: a secret key equal to a
# word of an error message would then trip the secret-leak guard when that message is raised
# (seen: a ConfigurationError flagged in another test). The prefixes, as real secret keys and
# session tokens have, keep generated secrets apart from the source's literals.
_secrets = st.text(alphabet=_printable, min_size=1, max_size=40).map("wJalr/".__add__)
_credentials = st.builds(
    Credentials,
    access_key=st.from_regex(r"(AKIA|ASIA)[A-Z0-9]{16}", fullmatch=True),
    secret_key=_secrets,
    token=st.one_of(
        st.none(),
        st.text(alphabet=_printable, min_size=1, max_size=300).map("IQoJb3JpZ2lu".__add__),
    ),
)
# Times around midnight UTC, so that the date (and the signing key) changes within the range.
_times = st.datetimes(
    min_value=dt.datetime(2026, 12, 31, 23, 50),
    max_value=dt.datetime(2027, 1, 1, 0, 10),
    timezones=st.just(UTC),
) | st.datetimes(
    min_value=dt.datetime(2020, 1, 1), max_value=dt.datetime(2035, 1, 1), timezones=st.just(UTC)
)


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    host=_hosts,
    port=st.one_of(st.sampled_from([443, 5432, 3306, 80]), st.integers(1, 65535)),
    user=_users,
    region=_regions,
    credentials=_credentials,
    now=_times,
)
def test_token_equals_botocore_byte_for_byte(
    host: str, port: int, user: str, region: str, credentials: Credentials, now: dt.datetime
) -> None:
    """Over 1,000 generated inputs the token is byte-identical to botocore's."""
    ours = build_auth_token(
        host=host, port=port, user=user, region=region, credentials=credentials, now=now
    )
    assert ours == botocore_token(host, port, user, region, credentials, now)


def test_token_shape_for_known_inputs() -> None:
    """A token is host:port/?Action=connect... with the session token last and a hex signature."""
    creds = Credentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", "tok/en+=")
    now = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    token = build_auth_token(
        host="Db.Example.com",
        port=5432,
        user="app user",
        region="us-east-1",
        credentials=creds,
        now=now,
    )
    assert token.startswith(
        "Db.Example.com:5432/?Action=connect&DBUser=app%20user&X-Amz-Algorithm=AWS4-HMAC-SHA256"
        "&X-Amz-Credential=AKIDEXAMPLE%2F20260102%2Fus-east-1%2Frds-db%2Faws4_request"
        "&X-Amz-Date=20260102T030405Z&X-Amz-Expires=900&X-Amz-SignedHeaders=host"
        "&X-Amz-Security-Token=tok%2Fen%2B%3D&X-Amz-Signature="
    )
    assert token == botocore_token("Db.Example.com", 5432, "app user", "us-east-1", creds, now)


def test_bare_ipv6_literal_is_bracketed() -> None:
    """A bare IPv6 address signs as its bracketed form (botocore cannot parse the bare one)."""
    creds = Credentials("AKIDEXAMPLE", "secret")
    now = dt.datetime(2026, 1, 2, tzinfo=UTC)
    bare = build_auth_token(
        host="fd00::1", port=5432, user="u", region="us-east-1", credentials=creds, now=now
    )
    assert bare == botocore_token("[fd00::1]", 5432, "u", "us-east-1", creds, now)


def test_signing_key_cache_is_bounded() -> None:
    """The derived-key cache never holds more than its bound, however many secrets sign."""
    now = dt.datetime(2026, 1, 2, tzinfo=UTC)
    for i in range(400):
        build_auth_token(
            host="h",
            port=5432,
            user="u",
            region="us-east-1",
            credentials=Credentials("AKIDEXAMPLE", f"secret-{i}"),
            now=now,
        )
    info = _signing_key.cache_info()
    assert info.maxsize is not None
    assert info.currsize <= info.maxsize <= 256


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"now": dt.datetime(2026, 1, 1)}, "timezone-aware"),
        ({"port": 0}, "port must be an int between 1 and 65535"),
        ({"port": "5432"}, "port must be an int"),
        ({"host": ""}, "host must be"),
        ({"region": ""}, "region must be"),
    ],
)
def test_invalid_arguments_are_rejected(kwargs: dict[str, object], message: str) -> None:
    """Bad arguments raise ConfigurationError saying what is allowed."""
    args: dict[str, object] = {
        "host": "h",
        "port": 5432,
        "user": "u",
        "region": "us-east-1",
        "credentials": Credentials("AKIDEXAMPLE", "s"),
    }
    args.update(kwargs)
    with pytest.raises(ConfigurationError, match=message):
        build_auth_token(**args)  # type: ignore[arg-type]


def test_credentials_repr_hides_secrets() -> None:
    """The repr shows a masked access key and the expiry, never the secret or token."""
    expiry = dt.datetime(2026, 1, 1, tzinfo=UTC)
    creds = Credentials("AKIAABCDEFGHIJKLWXYZ", "SECRETSECRET", "TOKENTOKEN", expiry)
    text = repr(creds) + str(creds)
    assert "AKIA…WXYZ" in text
    assert "2026-01-01" in text
    for secret in ("SECRETSECRET", "TOKENTOKEN", "AKIAABCDEFGHIJKLWXYZ"):
        assert secret not in text
    assert creds.expires_in(expiry - dt.timedelta(seconds=30)) == 30


def test_credentials_reject_naive_expiry() -> None:
    """A naive expiry is refused: expiry comparisons need a timezone."""
    with pytest.raises(ConfigurationError, match="timezone-aware"):
        Credentials("AKIDEXAMPLE", "s", None, dt.datetime(2026, 1, 1))


@pytest.mark.parametrize(
    ("host", "region"),
    [
        ("mydb.c9akciq32.us-east-1.rds.amazonaws.com", "us-east-1"),
        ("app.cluster-c9akciq32.eu-west-1.rds.amazonaws.com", "eu-west-1"),
        ("app.cluster-ro-c9akciq32.eu-west-1.rds.amazonaws.com", "eu-west-1"),
        ("app.cluster-custom-c9akciq32.ap-southeast-2.rds.amazonaws.com", "ap-southeast-2"),
        ("proxy1.proxy-c9akciq32.us-west-2.rds.amazonaws.com", "us-west-2"),
        ("mydb.c9akciq32.rds.cn-north-1.amazonaws.com.cn", "cn-north-1"),
        ("mydb.c9akciq32.cn-northwest-1.rds.amazonaws.com.cn", "cn-northwest-1"),
        ("mydb.c9akciq32.us-gov-west-1.rds.amazonaws.com", "us-gov-west-1"),
        ("MyDB.C9AKCIQ32.US-EAST-2.RDS.AMAZONAWS.COM.", "us-east-2"),
        ("10.0.0.12", None),
        ("[fd00::1]", None),
        ("fd00::1", None),
        ("db.example.com", None),
        ("localhost", None),
        ("rds.amazonaws.com", None),
        ("us-east-1.rds.amazonaws.com", None),
        ("mydb.c9akciq32.us-east-1.rds.amazonaws.com.evil.example", None),
    ],
)
def test_region_from_host(host: str, region: str | None) -> None:
    """The region is read from RDS, Aurora, Proxy, China and GovCloud names, None otherwise."""
    assert region_from_host(host) == region


# The expression the endpoint names were once read with: `_rds_region` reads them label by label
# (no compiling on a cold start) and must agree with it on every name.
_RDS_HOST_REFERENCE = re.compile(
    r"(?:[a-z0-9](?:[a-z0-9-]*[a-z0-9])?\.)+"
    r"(?:(?P<region>[a-z]{2}(?:-[a-z]+)+-\d+)\.rds\.amazonaws\.com(?:\.cn)?"
    r"|rds\.(?P<region2>[a-z]{2}(?:-[a-z]+)+-\d+)\.amazonaws\.com(?:\.cn)?)"
)
_NAME_PARTS = st.sampled_from(
    [
        "mydb", "c9akciq32", "cluster-c9", "cluster-ro-c9", "proxy-c9", "a", "0", "a-b", "-a",
        "a-", "", "a_b", "é", "rds", "amazonaws", "com", "cn", "on", "aws", "dsql",
        "us-east-1", "us-gov-west-1", "cn-north-1", "u-east-1", "us-1", "us-east-", "us--1",
        "us-east-1a", "use-east-1", "us-east-\u0661", "us-east-\u00b2", "us-e4st-1",
    ]
)  # fmt: skip


@given(
    st.lists(_NAME_PARTS, min_size=1, max_size=7),
    st.sampled_from(["", ".rds.amazonaws.com", ".amazonaws.com", ".amazonaws.com.cn"]),
    st.sampled_from(["", ".", " "]),
    st.booleans(),
)
@settings(max_examples=3000, deadline=None)
def test_rds_names_read_label_by_label_agree_with_the_expression(
    parts: list[str], suffix: str, trailing: str, upper: bool
) -> None:
    """region_from_host reads the region of exactly the RDS names the expression matches."""
    host = ".".join(parts) + suffix + trailing
    host = host.upper() if upper else host
    normalized = host.strip().lower().rstrip(".")
    match = _RDS_HOST_REFERENCE.fullmatch(normalized)
    expected = None if match is None else match.group("region") or match.group("region2")
    if expected is None and normalized.endswith(".on.aws"):
        return  # a DSQL name: read by its own expression
    assert _rds_region(normalized) == expected
    assert region_from_host(host) == expected
