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

__all__ = [
    "TOKEN_LIFETIME",
    "RegisteredKey",
    "Verdict",
    "signed_host",
    "verify_dsql_token",
    "verify_token",
]

TOKEN_LIFETIME = 900
DSQL_MAX_EXPIRES = 604_800
_ALGORITHM = "AWS4-HMAC-SHA256"
_SERVICE = "rds-db"
_DSQL_SERVICE = "dsql"
_EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
# The SigV4 query parameters of a presigned URL, in the order a missing one is named.
_SIGV4_QUERY = (
    "X-Amz-Algorithm",
    "X-Amz-Credential",
    "X-Amz-Date",
    "X-Amz-Expires",
    "X-Amz-SignedHeaders",
    "X-Amz-Signature",
)
_REQUIRED = ("Action", "DBUser", *_SIGV4_QUERY)
_DSQL_REQUIRED = ("Action", *_SIGV4_QUERY)


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


def signed_host(host: str, port: str) -> str:
    """Return the ``host`` header a token for `host`:`port` is signed with.

    The token is a presigned ``https://`` URL, so SigV4 signs the host without the scheme's
    default port: ``:443`` is dropped from the signed header (and only it; 80 is kept, since
    the scheme is https), while the token's URL keeps it.
    """
    return host if port == "443" else f"{host}:{port}"


@dataclass(frozen=True, slots=True)
class _Presigned:
    """A token split into its parts: the host before ``/?``, the query and the credential scope."""

    host: str
    params: dict[str, str]
    access_key: str
    scope_date: str
    region: str
    service: str


def _parse_presigned(token: str, *, required: tuple[str, ...], kind: str) -> _Presigned | Verdict:
    """Split a token into its parts, or refuse one that is not a well-formed presigned URL."""
    host, sep, query = token.partition("/?")
    if not sep or not host or not query:
        return _reject("malformed_token", f"the password is not {kind} (no host/?query)")
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=True)
    except ValueError:
        return _reject("malformed_token", "the token's query string cannot be parsed")
    params = dict(pairs)
    if len(params) != len(pairs):
        return _reject("malformed_token", "the token repeats a query parameter")
    missing = [name for name in required if name not in params]
    if missing:
        return _reject("malformed_token", f"the token lacks {', '.join(missing)}")
    credential = params["X-Amz-Credential"].split("/")
    if len(credential) != 5 or credential[4] != "aws4_request":
        return _reject(
            "malformed_token", "X-Amz-Credential is not AK/date/region/service/aws4_request"
        )
    access_key, scope_date, region, service, _ = credential
    return _Presigned(host, params, access_key, scope_date, region, service)


def _check_scope(token: _Presigned, *, service: str, region: str) -> Verdict | None:
    """Refuse a token not signed with SigV4 over ``host`` for `service` in `region`."""
    params, access_key = token.params, token.access_key
    if params["X-Amz-Algorithm"] != _ALGORITHM:
        return _reject("malformed_token", f"X-Amz-Algorithm is not {_ALGORITHM}", access_key)
    if params["X-Amz-SignedHeaders"] != "host":
        return _reject("malformed_token", "X-Amz-SignedHeaders is not 'host'", access_key)
    if token.service != service:
        return _reject(
            "wrong_service", f"signed for service {token.service!r}, not {service!r}", access_key
        )
    if token.region != region:
        return _reject(
            "wrong_region", f"signed for region {token.region!r}, this is {region!r}", access_key
        )
    return None


def _signing_time(token: _Presigned) -> dt.datetime | Verdict:
    """Return when the token was signed, or refuse a date that is malformed or off-scope."""
    amz_date = token.params["X-Amz-Date"]
    try:
        signed_at = dt.datetime.strptime(amz_date, "%Y%m%dT%H%M%SZ").replace(tzinfo=dt.timezone.utc)
    except ValueError:
        return _reject("malformed_token", "X-Amz-Date is not yyyymmddThhmmssZ", token.access_key)
    if amz_date[:8] != token.scope_date:
        return _reject(
            "malformed_token", "the credential scope date is not X-Amz-Date's", token.access_key
        )
    return signed_at


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
    parsed = _parse_presigned(token, required=_REQUIRED, kind="an RDS IAM token")
    if isinstance(parsed, Verdict):
        return parsed
    params, access_key = parsed.params, parsed.access_key
    if params["Action"] != "connect":
        return _reject("wrong_action", f"Action is {params['Action']!r}, not 'connect'", access_key)
    problem = _check_scope(parsed, service=_SERVICE, region=region) or _check_rds_target(
        parsed, user=user, endpoint=endpoint, port=port
    )
    if problem is not None:
        return problem
    signed_at = _signing_time(parsed)
    if isinstance(signed_at, Verdict):
        return signed_at
    token_host, _, token_port = parsed.host.rpartition(":")
    return _check_signed(
        parsed,
        host=signed_host(token_host, token_port),
        signed_at=signed_at,
        lifetime=TOKEN_LIFETIME,
        keys=keys,
        now=now,
        max_clock_skew=max_clock_skew,
    )


def _check_rds_target(token: _Presigned, *, user: str, endpoint: str, port: int) -> Verdict | None:
    """Refuse an RDS token for another host, port or user, or with another lifetime."""
    params, access_key = token.params, token.access_key
    token_host, _, token_port = token.host.rpartition(":")
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
    return None


def _check_signed(
    token: _Presigned,
    *,
    host: str,
    signed_at: dt.datetime,
    lifetime: int,
    keys: Mapping[str, RegisteredKey],
    now: dt.datetime,
    max_clock_skew: float,
) -> Verdict:
    """Check the key, session token, signature, age and credential expiry of a parsed token."""
    access_key = token.access_key
    age = (now - signed_at).total_seconds()
    key = keys.get(access_key)
    if key is None:
        return _reject(
            "unknown_access_key", f"access key {access_key} is not registered", access_key, age
        )
    problem = _session_token_problem(key, token.params.get("X-Amz-Security-Token"))
    if problem is not None:
        return _reject("session_token_mismatch", problem, access_key, age)
    signature = expected_signature(
        secret_key=key.secret_key,
        host=host,
        params=token.params,
        amz_date=token.params["X-Amz-Date"],
        scope_date=token.scope_date,
        region=token.region,
        service=token.service,
    )
    if not hmac.compare_digest(signature, token.params["X-Amz-Signature"]):
        return _reject(
            "signature_mismatch", "the signature does not match the key's secret", access_key, age
        )
    refusal = _time_problem(key, age=age, lifetime=lifetime, now=now, max_clock_skew=max_clock_skew)
    if refusal is not None:
        return _reject(refusal[0], refusal[1], access_key, age)
    return Verdict(True, "ok", "token verified", access_key, age)


def _session_token_problem(key: RegisteredKey, presented: str | None) -> str | None:
    """Say how the token's session token disagrees with the key's, if it does."""
    if key.session_token is None and presented is not None:
        return "the token carries a session token; the key has none"
    if key.session_token is not None and presented is None:
        return "the key needs a session token; the token has none"
    if (
        key.session_token is not None
        and presented is not None
        and not hmac.compare_digest(key.session_token.encode(), presented.encode())
    ):
        return "the session token is not the key's"
    return None


def _time_problem(
    key: RegisteredKey, *, age: float, lifetime: int, now: dt.datetime, max_clock_skew: float
) -> tuple[str, str] | None:
    """Return the reason and detail when the token is too old, too new, or its key expired."""
    if age > lifetime:
        return "expired", f"the token is {age:.0f} s old (limit {lifetime} s)"
    if -age > max_clock_skew:
        return (
            "future_dated",
            f"the token is dated {-age:.0f} s in the future (allowed skew {max_clock_skew:.0f} s)",
        )
    if key.expiration is not None and now >= key.expiration:
        return (
            "credentials_expired",
            f"the signing credentials expired at {key.expiration.isoformat()}",
        )
    return None


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
    parsed = _parse_presigned(token, required=_DSQL_REQUIRED, kind="a DSQL token")
    if isinstance(parsed, Verdict):
        return parsed
    params, access_key = parsed.params, parsed.access_key
    wanted = "DbConnectAdmin" if user == "admin" else "DbConnect"
    if params["Action"] != wanted:
        return _reject(
            "wrong_action",
            f"Action is {params['Action']!r}; role {user!r} logs in with {wanted!r}",
            access_key,
        )
    problem = _check_scope(parsed, service=_DSQL_SERVICE, region=region) or _check_dsql_target(
        parsed, endpoint=endpoint
    )
    if problem is not None:
        return problem
    signed_at = _signing_time(parsed)
    if isinstance(signed_at, Verdict):
        return signed_at
    return _check_signed(
        parsed,
        host=parsed.host,
        signed_at=signed_at,
        lifetime=int(params["X-Amz-Expires"]),
        keys=keys,
        now=now,
        max_clock_skew=max_clock_skew,
    )


def _check_dsql_target(token: _Presigned, *, endpoint: str) -> Verdict | None:
    """Refuse a DSQL token for another host, or with a lifetime DSQL does not allow."""
    if token.host.lower() != endpoint.lower():
        return _reject(
            "wrong_host", f"signed for host {token.host!r}, this is {endpoint!r}", token.access_key
        )
    expires = token.params["X-Amz-Expires"]
    if not expires.isdigit() or not 1 <= int(expires) <= DSQL_MAX_EXPIRES:
        return _reject(
            "bad_expires",
            f"X-Amz-Expires is {expires!r}, not seconds from 1 to {DSQL_MAX_EXPIRES}",
            token.access_key,
        )
    return None
