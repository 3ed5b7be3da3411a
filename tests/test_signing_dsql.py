"""The DSQL token signer equals botocore's generate_db_connect[_admin]_auth_token; DSQL hosts."""

from __future__ import annotations

import datetime as dt
from unittest import mock

import botocore.session
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asyncpg_iam import Credentials, build_auth_token, build_dsql_token, region_from_host
from asyncpg_iam._errors import ConfigurationError
from asyncpg_iam._signing import _signing_key, is_dsql_host

from .test_signing import _dns, _label, _regions, _times

UTC = dt.timezone.utc
_BOTOCORE = botocore.session.get_session()


def botocore_dsql_token(
    host: str,
    region: str,
    credentials: Credentials,
    now: dt.datetime,
    *,
    admin: bool,
    expires_in: int,
) -> str:
    """Sign with botocore's dsql client, its clock frozen at `now`."""
    client = _BOTOCORE.create_client(
        "dsql",
        region_name="us-east-1",
        aws_access_key_id=credentials.access_key,
        aws_secret_access_key=credentials.secret_key,
        aws_session_token=credentials.token,
    )
    naive = now.astimezone(UTC).replace(tzinfo=None)
    sign = (
        client.generate_db_connect_admin_auth_token
        if admin
        else client.generate_db_connect_auth_token
    )
    with mock.patch("botocore.auth.get_current_datetime", return_value=naive):
        return str(sign(host, region, ExpiresIn=expires_in))


_dsql_hosts = st.builds(
    lambda ident, region, upper: (
        f"{ident}.dsql.{region}.on.aws".upper() if upper else f"{ident}.dsql.{region}.on.aws"
    ),
    st.from_regex(r"[a-z0-9]{26}", fullmatch=True) | _label,
    st.sampled_from(["us-east-1", "us-east-2", "eu-west-1", "ap-northeast-1"]),
    st.booleans(),
)
_printable = st.characters(min_codepoint=33, max_codepoint=126)
# Hypothesis also draws strings from literals in the project's source; a "session token" equal
# to an error message would then trip the secret-leak guard when that message is raised. The
# prefixes (as real secrets and session tokens have) keep the generated secrets apart from it.
_credentials = st.builds(
    Credentials,
    access_key=st.from_regex(r"(AKIA|ASIA)[A-Z0-9]{16}", fullmatch=True),
    secret_key=st.text(alphabet=_printable, min_size=1, max_size=40).map("wJalr/".__add__),
    token=st.one_of(
        st.none(),
        st.text(alphabet=_printable, min_size=1, max_size=300).map("IQoJb3JpZ2lu".__add__),
    ),
)
_expiries = st.one_of(
    st.sampled_from([1, 900, 3600, 604_800]), st.integers(min_value=1, max_value=604_800)
)


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    host=st.one_of(_dsql_hosts, _dns),
    region=_regions,
    credentials=_credentials,
    admin=st.booleans(),
    expires_in=_expiries,
    now=_times,
)
def test_dsql_token_equals_botocore_byte_for_byte(
    host: str,
    region: str,
    credentials: Credentials,
    admin: bool,
    expires_in: int,
    now: dt.datetime,
) -> None:
    """Over 1,000 generated inputs the DSQL token is byte-identical to botocore's."""
    ours = build_dsql_token(
        host=host,
        region=region,
        credentials=credentials,
        admin=admin,
        expires_in=expires_in,
        now=now,
    )
    assert ours == botocore_dsql_token(
        host, region, credentials, now, admin=admin, expires_in=expires_in
    )


def test_dsql_token_shape_for_known_inputs() -> None:
    """A DSQL token has no port, DbConnect[Admin], service dsql and the session token last."""
    creds = Credentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", "tok/en+=")
    now = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    host = "abc123.dsql.us-east-1.on.aws"
    token = build_dsql_token(host=host, region="us-east-1", credentials=creds, now=now)
    assert token.startswith(
        "abc123.dsql.us-east-1.on.aws/?Action=DbConnect&X-Amz-Algorithm=AWS4-HMAC-SHA256"
        "&X-Amz-Credential=AKIDEXAMPLE%2F20260102%2Fus-east-1%2Fdsql%2Faws4_request"
        "&X-Amz-Date=20260102T030405Z&X-Amz-Expires=900&X-Amz-SignedHeaders=host"
        "&X-Amz-Security-Token=tok%2Fen%2B%3D&X-Amz-Signature="
    )
    admin = build_dsql_token(
        host=host, region="us-east-1", credentials=creds, admin=True, expires_in=3600, now=now
    )
    assert "/?Action=DbConnectAdmin&" in admin
    assert "&X-Amz-Expires=3600&" in admin


def test_dsql_and_rds_signing_keys_differ() -> None:
    """The signing-key cache keeps rds-db and dsql keys apart for the same secret, day, region."""
    creds = Credentials("AKIDEXAMPLE", "secret")
    now = dt.datetime(2026, 1, 2, tzinfo=UTC)
    rds = build_auth_token(
        host="h", port=5432, user="u", region="us-east-1", credentials=creds, now=now
    )
    dsql = build_dsql_token(host="h", region="us-east-1", credentials=creds, now=now)
    assert rds != dsql
    assert _signing_key("secret", "20260102", "us-east-1", "dsql") != _signing_key(
        "secret", "20260102", "us-east-1", "rds-db"
    )
    assert dsql == botocore_dsql_token("h", "us-east-1", creds, now, admin=False, expires_in=900)


@pytest.mark.parametrize("expires_in", [0, -1, 604_801, 900.0, True, "900", None])
def test_dsql_expires_in_is_validated(expires_in: object) -> None:
    """expires_in outside whole seconds 1..604800 is a ConfigurationError naming the range."""
    with pytest.raises(ConfigurationError, match="1 to 604800"):
        build_dsql_token(
            host="abc.dsql.us-east-1.on.aws",
            region="us-east-1",
            credentials=Credentials("AKIDEXAMPLE", "secret"),
            expires_in=expires_in,  # type: ignore[arg-type]
        )


@pytest.mark.parametrize("host", ["", "abc.dsql.us-east-1.on.aws:5432", "abc/x", "::1"])
def test_dsql_host_is_validated(host: str) -> None:
    """A DSQL token refuses an empty host or one with a port or a path."""
    with pytest.raises(ConfigurationError, match="host"):
        build_dsql_token(
            host=host, region="us-east-1", credentials=Credentials("AKIDEXAMPLE", "secret")
        )


def test_dsql_now_must_be_aware() -> None:
    """A naive `now` is refused, as for RDS tokens."""
    with pytest.raises(ConfigurationError, match="timezone-aware"):
        build_dsql_token(
            host="abc.dsql.us-east-1.on.aws",
            region="us-east-1",
            credentials=Credentials("AKIDEXAMPLE", "secret"),
            now=dt.datetime(2026, 1, 1),
        )


@pytest.mark.parametrize(
    ("host", "region"),
    [
        ("abcdefghijklmnopqrstuvwxyz.dsql.us-east-1.on.aws", "us-east-1"),
        ("ABC123.DSQL.EU-WEST-1.ON.AWS.", "eu-west-1"),
        ("x.dsql.ap-southeast-2.on.aws", "ap-southeast-2"),
        ("x.dsql-gamma.us-west-2.on.aws", "us-west-2"),
        ("dsql.us-east-1.on.aws", None),
        ("abc.dsql.us-east-1.on.aws.example.com", None),
        ("abc.dsql.notaregion.on.aws", None),
        ("abc.lambda-url.us-east-1.on.aws", None),
        ("abc.xdsql.us-east-1.on.aws", None),
    ],
)
def test_region_and_kind_of_dsql_hosts(host: str, region: str | None) -> None:
    """region_from_host reads DSQL endpoint names; is_dsql_host tells them apart."""
    assert region_from_host(host) == region
    assert is_dsql_host(host) is (region is not None)


def test_rds_hosts_are_not_dsql() -> None:
    """An RDS endpoint is not taken for a DSQL one."""
    assert not is_dsql_host("mydb.abcdefghijkl.us-east-1.rds.amazonaws.com")
