"""Verify an RDS or Aurora DSQL IAM token the way the service does, independently of the library.

This is a separate SigV4 implementation on purpose (hashlib and hmac only): the library's
signer must not be able to hide a bug behind the emulator that tests it. A verdict carries a
short stable reason code and a human detail; neither ever contains the token or a secret.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, quote

__all__ = ["TOKEN_LIFETIME", "RegisteredKey", "Verdict", "verify_dsql_token", "verify_token"]

TOKEN_LIFETIME = 900
DSQL_MAX_EXPIRES = 604_800
_ALGORITHM = "AWS4-HMAC-SHA256"
_SERVICE = "rds-db"
_DSQL_SERVICE = "dsql"
_DSQL_REQUIRED = (
    "Action",
    "X-Amz-Algorithm",
    "X-Amz-Credential",
    "X-Amz-Date",
    "X-Amz-Expires",
    "X-Amz-SignedHeaders",
    "X-Amz-Signature",
)
_EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
_REQUIRED = (
    "Action",
    "DBUser",
    "X-Amz-Algorithm",
    "X-Amz-Credential",
    "X-Amz-Date",
    "X-Amz-Expires",
    "X-Amz-SignedHeaders",
    "X-Amz-Signature",
)


@dataclass(frozen=True, slots=True)
class RegisteredKey:
    """An access key the emulator knows, with its secret and optional session token."""

    access_key: str
    secret_key: str = field(repr=False)
    session_token: str | None = field(default=None, repr=False)
    expiration: dt.datetime | None = None


@dataclass(frozen=True, slots=True)
class Verdict:
    """The outcome of checking one token."""

    accepted: bool
    reason: str
    detail: str
    access_key: str | None = None
    token_age: float | None = None


def _reject(
    reason: str, detail: str, access_key: str | None = None, token_age: float | None = None
) -> Verdict:
    return Verdict(False, reason, detail, access_key, token_age)


def _hmac(key: bytes, message: str) -> bytes:
    return hmac.new(key, message.encode("utf-8"), hashlib.sha256).digest()


def _encode(value: str) -> str:
    return quote(value, safe="-_.~")


def expected_signature(
    *,
    secret_key: str,
    host: str,
    params: Mapping[str, str],
    amz_date: str,
    scope_date: str,
    region: str,
    service: str,
) -> str:
    """Compute the SigV4 query-string signature of a token's request."""
    query = "&".join(
        f"{_encode(name)}={_encode(value)}"
        for name, value in sorted(params.items())
        if name != "X-Amz-Signature"
    )
    canonical_request = "\n".join(
        ["GET", "/", query, f"host:{host.lower()}", "", "host", _EMPTY_SHA256]
    )
    scope = f"{scope_date}/{region}/{service}/aws4_request"
    string_to_sign = "\n".join(
        [_ALGORITHM, amz_date, scope, hashlib.sha256(canonical_request.encode()).hexdigest()]
    )
    key = _hmac(("AWS4" + secret_key).encode("utf-8"), scope_date)
    key = _hmac(key, region)
    key = _hmac(key, service)
    key = _hmac(key, "aws4_request")
    return hmac.new(key, string_to_sign.encode("utf-8"), hashlib.sha256).hexdigest()


def verify_token(
    token: str,
    *,
    user: str,
    endpoint: str,
    port: int,
    region: str,
    keys: Mapping[str, RegisteredKey],
    now: dt.datetime,
    max_clock_skew: float = 300.0,
) -> Verdict:
    """Check `token` for a login of `user` to `endpoint:port` in `region` at time `now`."""
    host, sep, query = token.partition("/?")
    if not sep or not host or not query:
        return _reject("malformed_token", "the password is not an RDS IAM token (no host/?query)")
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=True)
    except ValueError:
        return _reject("malformed_token", "the token's query string cannot be parsed")
    params = dict(pairs)
    if len(params) != len(pairs):
        return _reject("malformed_token", "the token repeats a query parameter")
    missing = [name for name in _REQUIRED if name not in params]
    if missing:
        return _reject("malformed_token", f"the token lacks {', '.join(missing)}")

    credential = params["X-Amz-Credential"].split("/")
    access_key = credential[0] if credential else None
    if len(credential) != 5 or credential[4] != "aws4_request":
        return _reject(
            "malformed_token", "X-Amz-Credential is not AK/date/region/service/aws4_request"
        )
    _, scope_date, token_region, service, _ = credential

    if params["Action"] != "connect":
        return _reject("wrong_action", f"Action is {params['Action']!r}, not 'connect'", access_key)
    if params["X-Amz-Algorithm"] != _ALGORITHM:
        return _reject("malformed_token", f"X-Amz-Algorithm is not {_ALGORITHM}", access_key)
    if params["X-Amz-SignedHeaders"] != "host":
        return _reject("malformed_token", "X-Amz-SignedHeaders is not 'host'", access_key)
    if service != _SERVICE:
        return _reject("wrong_service", f"signed for service {service!r}, not 'rds-db'", access_key)
    if token_region != region:
        return _reject(
            "wrong_region", f"signed for region {token_region!r}, this is {region!r}", access_key
        )
    token_host, _, token_port = host.rpartition(":")
    if token_host.lower() != endpoint.lower():
        return _reject(
            "wrong_host", f"signed for host {token_host!r}, this is {endpoint!r}", access_key
        )
    if token_port != str(port):
        return _reject("wrong_port", f"signed for port {token_port!r}, this is {port}", access_key)
    if params["DBUser"] != user:
        return _reject(
            "wrong_user", f"signed for DBUser {params['DBUser']!r}, login is {user!r}", access_key
        )
    if params["X-Amz-Expires"] != str(TOKEN_LIFETIME):
        return _reject(
            "bad_expires", f"X-Amz-Expires is {params['X-Amz-Expires']!r}, not 900", access_key
        )
    try:
        signed_at = dt.datetime.strptime(params["X-Amz-Date"], "%Y%m%dT%H%M%SZ").replace(
            tzinfo=dt.timezone.utc
        )
    except ValueError:
        return _reject("malformed_token", "X-Amz-Date is not yyyymmddThhmmssZ", access_key)
    if params["X-Amz-Date"][:8] != scope_date:
        return _reject(
            "malformed_token", "the credential scope date is not X-Amz-Date's", access_key
        )
    return _check_signed(
        host=host,
        params=params,
        scope_date=scope_date,
        region=token_region,
        service=service,
        signed_at=signed_at,
        lifetime=TOKEN_LIFETIME,
        access_key=access_key,
        keys=keys,
        now=now,
        max_clock_skew=max_clock_skew,
    )


def _check_signed(
    *,
    host: str,
    params: Mapping[str, str],
    scope_date: str,
    region: str,
    service: str,
    signed_at: dt.datetime,
    lifetime: int,
    access_key: str | None,
    keys: Mapping[str, RegisteredKey],
    now: dt.datetime,
    max_clock_skew: float,
) -> Verdict:
    """Check the key, session token, signature, age and credential expiry of a parsed token."""
    age = (now - signed_at).total_seconds()

    key = keys.get(access_key or "")
    if key is None:
        return _reject(
            "unknown_access_key", f"access key {access_key} is not registered", access_key, age
        )
    presented = params.get("X-Amz-Security-Token")
    if key.session_token is None and presented is not None:
        return _reject(
            "session_token_mismatch",
            "the token carries a session token; the key has none",
            access_key,
            age,
        )
    if key.session_token is not None and presented is None:
        return _reject(
            "session_token_mismatch",
            "the key needs a session token; the token has none",
            access_key,
            age,
        )
    if (
        key.session_token is not None
        and presented is not None
        and not hmac.compare_digest(key.session_token.encode(), presented.encode())
    ):
        return _reject(
            "session_token_mismatch", "the session token is not the key's", access_key, age
        )
    signature = expected_signature(
        secret_key=key.secret_key,
        host=host,
        params=params,
        amz_date=params["X-Amz-Date"],
        scope_date=scope_date,
        region=region,
        service=service,
    )
    if not hmac.compare_digest(signature, params["X-Amz-Signature"]):
        return _reject(
            "signature_mismatch", "the signature does not match the key's secret", access_key, age
        )
    if age > lifetime:
        return _reject(
            "expired", f"the token is {age:.0f} s old (limit {lifetime} s)", access_key, age
        )
    if -age > max_clock_skew:
        return _reject(
            "future_dated",
            f"the token is dated {-age:.0f} s in the future (allowed skew {max_clock_skew:.0f} s)",
            access_key,
            age,
        )
    if key.expiration is not None and now >= key.expiration:
        return _reject(
            "credentials_expired",
            f"the signing credentials expired at {key.expiration.isoformat()}",
            access_key,
            age,
        )
    return Verdict(True, "ok", "token verified", access_key, age)


def verify_dsql_token(
    token: str,
    *,
    user: str,
    endpoint: str,
    region: str,
    keys: Mapping[str, RegisteredKey],
    now: dt.datetime,
    max_clock_skew: float = 300.0,
) -> Verdict:
    """Check an Aurora DSQL `token` for a login of `user` to `endpoint` in `region` at `now`.

    The role ``admin`` needs ``Action=DbConnectAdmin``, every other role ``Action=DbConnect``;
    the token names the endpoint without a port and lives ``X-Amz-Expires`` seconds.
    """
    host, sep, query = token.partition("/?")
    if not sep or not host or not query:
        return _reject("malformed_token", "the password is not a DSQL token (no host/?query)")
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=True)
    except ValueError:
        return _reject("malformed_token", "the token's query string cannot be parsed")
    params = dict(pairs)
    if len(params) != len(pairs):
        return _reject("malformed_token", "the token repeats a query parameter")
    missing = [name for name in _DSQL_REQUIRED if name not in params]
    if missing:
        return _reject("malformed_token", f"the token lacks {', '.join(missing)}")
    credential = params["X-Amz-Credential"].split("/")
    access_key = credential[0] if credential else None
    if len(credential) != 5 or credential[4] != "aws4_request":
        return _reject(
            "malformed_token", "X-Amz-Credential is not AK/date/region/service/aws4_request"
        )
    _, scope_date, token_region, service, _ = credential
    wanted = "DbConnectAdmin" if user == "admin" else "DbConnect"
    if params["Action"] != wanted:
        return _reject(
            "wrong_action",
            f"Action is {params['Action']!r}; role {user!r} logs in with {wanted!r}",
            access_key,
        )
    if params["X-Amz-Algorithm"] != _ALGORITHM:
        return _reject("malformed_token", f"X-Amz-Algorithm is not {_ALGORITHM}", access_key)
    if params["X-Amz-SignedHeaders"] != "host":
        return _reject("malformed_token", "X-Amz-SignedHeaders is not 'host'", access_key)
    if service != _DSQL_SERVICE:
        return _reject("wrong_service", f"signed for service {service!r}, not 'dsql'", access_key)
    if token_region != region:
        return _reject(
            "wrong_region", f"signed for region {token_region!r}, this is {region!r}", access_key
        )
    if host.lower() != endpoint.lower():
        return _reject("wrong_host", f"signed for host {host!r}, this is {endpoint!r}", access_key)
    expires = params["X-Amz-Expires"]
    if not expires.isdigit() or not 1 <= int(expires) <= DSQL_MAX_EXPIRES:
        return _reject(
            "bad_expires",
            f"X-Amz-Expires is {expires!r}, not seconds from 1 to {DSQL_MAX_EXPIRES}",
            access_key,
        )
    try:
        signed_at = dt.datetime.strptime(params["X-Amz-Date"], "%Y%m%dT%H%M%SZ").replace(
            tzinfo=dt.timezone.utc
        )
    except ValueError:
        return _reject("malformed_token", "X-Amz-Date is not yyyymmddThhmmssZ", access_key)
    if params["X-Amz-Date"][:8] != scope_date:
        return _reject(
            "malformed_token", "the credential scope date is not X-Amz-Date's", access_key
        )
    return _check_signed(
        host=host,
        params=params,
        scope_date=scope_date,
        region=token_region,
        service=service,
        signed_at=signed_at,
        lifetime=int(expires),
        access_key=access_key,
        keys=keys,
        now=now,
        max_clock_skew=max_clock_skew,
    )
