"""RDS IAM authentication tokens: a pure SigV4 presigner, and the region of an RDS endpoint.

A token is a SigV4 presigned ``GET`` URL for the ``rds-db`` service without its scheme. The
output of `build_auth_token` equals botocore's ``generate_db_auth_token`` byte for byte for the
same inputs and time, including botocore's quirks: the ``host`` header is lowercased and omits
port 443, while the URL keeps the host as given. Nothing here does I/O; the only state is a
few bounded caches of values that do not change between calls (the derived signing key changes
once a day per secret key and region).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import hmac
import re
from functools import lru_cache
from urllib.parse import quote

from ._errors import ConfigurationError

__all__ = ["Credentials", "build_auth_token", "region_from_host"]

_SERVICE = "rds-db"
_EXPIRES = 900  # seconds; fixed by RDS
_EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
_SAFE = "-_.~"


@dataclasses.dataclass(frozen=True, slots=True)
class Credentials:
    """AWS credentials frozen at one point in time.

    `expiry` is when temporary credentials stop working (timezone-aware), None for long-term
    keys. The repr shows a masked access key and the expiry only, never the secret key or the
    session token.
    """

    access_key: str
    secret_key: str = dataclasses.field(repr=False)
    token: str | None = dataclasses.field(default=None, repr=False)
    expiry: dt.datetime | None = None

    def __post_init__(self) -> None:
        if not self.access_key or not self.secret_key:
            raise ConfigurationError("Credentials need a non-empty access_key and secret_key")
        if self.expiry is not None and self.expiry.tzinfo is None:
            raise ConfigurationError(
                "Credentials.expiry must be timezone-aware (use tzinfo=datetime.timezone.utc)"
            )

    def expires_in(self, now: dt.datetime) -> float | None:
        """Return the seconds left at `now` before expiry (negative once expired), or None."""
        if self.expiry is None:
            return None
        return (self.expiry - now).total_seconds()

    def __repr__(self) -> str:
        expiry = "None" if self.expiry is None else self.expiry.isoformat()
        return f"Credentials(access_key={mask_access_key(self.access_key)!r}, expiry={expiry})"


def mask_access_key(access_key: str) -> str:
    """Return an access key id with all but its first and last four characters hidden."""
    if len(access_key) <= 8:
        return "…"
    return f"{access_key[:4]}…{access_key[-4:]}"


@lru_cache(maxsize=256)
def _encode(value: str) -> str:
    # Users, access keys, regions and session tokens repeat from call to call.
    return quote(value.encode("utf-8"), safe=_SAFE)


@lru_cache(maxsize=128)
def _signing_key(secret_key: str, date: str, region: str) -> bytes:
    key = hmac.digest(("AWS4" + secret_key).encode("utf-8"), date.encode("utf-8"), "sha256")
    key = hmac.digest(key, region.encode("utf-8"), "sha256")
    key = hmac.digest(key, _SERVICE.encode("utf-8"), "sha256")
    return hmac.digest(key, b"aws4_request", "sha256")


@lru_cache(maxsize=256)
def _endpoint(host: str, port: int) -> tuple[str, str]:
    """Return (URL prefix, canonical host header) for a host and port, as botocore forms them."""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # a bare IPv6 literal; botocore would fail on it
    header = host.lower()
    if port != 443:  # botocore drops the default https port from the host header only
        header = f"{header}:{port}"
    return f"{host}:{port}/?", f"\nhost:{header}\n\nhost\n{_EMPTY_SHA256}"


@lru_cache(maxsize=64)
def _timestamp(epoch_seconds: int) -> tuple[str, str]:
    stamp = dt.datetime.fromtimestamp(epoch_seconds, dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return stamp, stamp[:8]


def build_auth_token(
    *,
    host: str,
    port: int,
    user: str,
    region: str,
    credentials: Credentials,
    now: dt.datetime | None = None,
) -> str:
    """Return an RDS IAM authentication token, valid for 15 minutes from `now`.

    `host` is the endpoint name the database is reached by (its DNS name, not a CNAME), `now`
    a timezone-aware time (default: the current time). Only the whole second of `now` counts.
    """
    if now is None:
        now = dt.datetime.now(dt.timezone.utc)
    elif now.tzinfo is None:
        raise ConfigurationError(
            "build_auth_token(now=...) must be timezone-aware (use tzinfo=datetime.timezone.utc)"
        )
    if type(port) is not int or not 0 < port < 65536:
        raise ConfigurationError(f"port must be an int between 1 and 65535, not {port!r}")
    if not host:
        raise ConfigurationError("host must be the database endpoint name, not empty")
    if not region:
        raise ConfigurationError("region must be an AWS region name such as 'us-east-1'")

    stamp, date = _timestamp(int(now.timestamp()))
    prefix, canonical_tail = _endpoint(host, port)
    scope = f"{date}/{region}/{_SERVICE}/aws4_request"
    query = (
        f"Action=connect&DBUser={_encode(user)}&X-Amz-Algorithm=AWS4-HMAC-SHA256"
        f"&X-Amz-Credential={_encode(credentials.access_key)}%2F{date}%2F{_encode(region)}"
        f"%2F{_SERVICE}%2Faws4_request&X-Amz-Date={stamp}&X-Amz-Expires={_EXPIRES}"
    )
    token = credentials.token
    if token is None:
        query += "&X-Amz-SignedHeaders=host"
        canonical_query = query
    else:
        # The URL lists the session token last; the canonical query sorts it before
        # X-Amz-SignedHeaders.
        encoded_token = f"&X-Amz-Security-Token={_encode(token)}"
        canonical_query = f"{query}{encoded_token}&X-Amz-SignedHeaders=host"
        query = f"{query}&X-Amz-SignedHeaders=host{encoded_token}"
    canonical_request = f"GET\n/\n{canonical_query}{canonical_tail}"
    string_to_sign = (
        f"AWS4-HMAC-SHA256\n{stamp}\n{scope}\n"
        + hashlib.sha256(canonical_request.encode("utf-8")).hexdigest()
    )
    signature = hmac.digest(
        _signing_key(credentials.secret_key, date, region),
        string_to_sign.encode("utf-8"),
        "sha256",
    ).hex()
    return f"{prefix}{query}&X-Amz-Signature={signature}"


_REGION = r"(?P<region>[a-z]{2}(?:-[a-z]+)+-\d+)"
_LABEL = r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?"
_RDS_HOST = re.compile(
    # <name>.<id | cluster-id | cluster-ro-id | cluster-custom-id | proxy-id>.<region>.rds.<suffix>
    # and the China form <name>.<id>.rds.<region>.amazonaws.com.cn
    rf"(?:{_LABEL}\.)+(?:{_REGION}\.rds\.amazonaws\.com(?:\.cn)?"
    rf"|rds\.(?P<region2>[a-z]{{2}}(?:-[a-z]+)+-\d+)\.amazonaws\.com(?:\.cn)?)"
)


def region_from_host(host: str) -> str | None:
    """Return the AWS region named in an RDS, Aurora or RDS Proxy endpoint, or None.

    None means the host is not an RDS endpoint name (an IP address, a CNAME, localhost): the
    region must then be given explicitly.
    """
    name = host.strip().lower().rstrip(".")
    match = _RDS_HOST.fullmatch(name)
    if match is None:
        return None
    return match.group("region") or match.group("region2")
