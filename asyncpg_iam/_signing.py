"""IAM authentication tokens: a pure SigV4 presigner, and the region of an endpoint name.

A token is a SigV4 presigned ``GET`` URL without its scheme: for the ``rds-db`` service
(`build_auth_token`, RDS, Aurora and RDS Proxy) or the ``dsql`` service (`build_dsql_token`,
Aurora DSQL). The output equals botocore's ``generate_db_auth_token`` and
``generate_db_connect_auth_token`` / ``generate_db_connect_admin_auth_token`` byte for byte for
the same inputs and time, including botocore's quirks: the ``host`` header is lowercased and
omits port 443, while the URL keeps the host as given. Nothing here does I/O; the only state is
a few bounded caches of values that do not change between calls (the derived signing key changes
once a day per secret key, region and service).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import re
from functools import lru_cache
from urllib.parse import quote

from ._errors import ConfigurationError
from ._record import Record

__all__ = [
    "DSQL_MAX_EXPIRES",
    "Credentials",
    "build_auth_token",
    "build_dsql_token",
    "is_dsql_host",
    "is_reader_endpoint",
    "is_writer_endpoint",
    "region_from_host",
]

_SERVICE = "rds-db"
_DSQL_SERVICE = "dsql"
_EXPIRES = 900  # seconds; fixed by RDS
#: The longest validity a DSQL token may ask for (``X-Amz-Expires``), in seconds: 7 days.
DSQL_MAX_EXPIRES = 604_800
_EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
_SAFE = "-_.~"


class Credentials(Record):
    """AWS credentials frozen at one point in time.

    `expiry` is when temporary credentials stop working (timezone-aware), None for long-term
    keys. The repr shows a masked access key and the expiry only, never the secret key or the
    session token.
    """

    _fields = ("access_key", "secret_key", "token", "expiry")
    __slots__ = _fields

    access_key: str
    secret_key: str
    token: str | None
    expiry: dt.datetime | None

    def __init__(
        self,
        access_key: str,
        secret_key: str,
        token: str | None = None,
        expiry: dt.datetime | None = None,
    ) -> None:
        self._assign(access_key, secret_key, token, expiry)
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
def _signing_key(secret_key: str, date: str, region: str, service: str = _SERVICE) -> bytes:
    key = hmac.digest(("AWS4" + secret_key).encode("utf-8"), date.encode("utf-8"), "sha256")
    key = hmac.digest(key, region.encode("utf-8"), "sha256")
    key = hmac.digest(key, service.encode("utf-8"), "sha256")
    return hmac.digest(key, b"aws4_request", "sha256")


@lru_cache(maxsize=256)
def _endpoint(host: str, port: int | None) -> tuple[str, str]:
    """Return (URL prefix, canonical request tail) for a host and port, as botocore forms them.

    A None port (DSQL) leaves the port out of both the URL and the host header.
    """
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # a bare IPv6 literal; botocore would fail on it
    header = host.lower()
    if port is not None and port != 443:  # botocore drops port 443 from the host header only
        header = f"{header}:{port}"
    netloc = host if port is None else f"{host}:{port}"
    return f"{netloc}/?", f"\nhost:{header}\n\nhost\n{_EMPTY_SHA256}"


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
    now = _check_now(now, "build_auth_token")
    if type(port) is not int or not 0 < port < 65536:
        raise ConfigurationError(f"port must be an int between 1 and 65535, not {port!r}")
    if not host:
        raise ConfigurationError("host must be the database endpoint name, not empty")
    if not region:
        raise ConfigurationError("region must be an AWS region name such as 'us-east-1'")

    return _presign(
        host=host,
        port=port,
        leading_query=f"Action=connect&DBUser={_encode(user)}",
        region=region,
        service=_SERVICE,
        expires=_EXPIRES,
        credentials=credentials,
        now=now,
    )


def build_dsql_token(
    *,
    host: str,
    region: str,
    credentials: Credentials,
    admin: bool = False,
    expires_in: int = 900,
    now: dt.datetime | None = None,
) -> str:
    """Return an Aurora DSQL authentication token, valid for `expires_in` seconds from `now`.

    `host` is the cluster endpoint (``<id>.dsql.<region>.on.aws``); the token names no port.
    `admin` signs for the ``admin`` role (``Action=DbConnectAdmin``), otherwise for any other
    role (``Action=DbConnect``). `expires_in` is whole seconds from 1 to 604,800 (7 days); DSQL
    checks it only when a connection is opened. `now` as in `build_auth_token`.
    """
    now = _check_now(now, "build_dsql_token")
    if not host:
        raise ConfigurationError("host must be the DSQL cluster endpoint name, not empty")
    if ":" in host or "/" in host:
        raise ConfigurationError(
            f"host must be the DSQL endpoint name without port or path, like "
            f"'abc123.dsql.us-east-1.on.aws', not {host!r}"
        )
    if not region:
        raise ConfigurationError("region must be an AWS region name such as 'us-east-1'")
    if type(expires_in) is not int or not 1 <= expires_in <= DSQL_MAX_EXPIRES:
        raise ConfigurationError(
            f"expires_in must be whole seconds from 1 to {DSQL_MAX_EXPIRES} (7 days), "
            f"not {expires_in!r}"
        )
    return _presign(
        host=host,
        port=None,
        leading_query="Action=DbConnectAdmin" if admin else "Action=DbConnect",
        region=region,
        service=_DSQL_SERVICE,
        expires=expires_in,
        credentials=credentials,
        now=now,
    )


def _check_now(now: dt.datetime | None, caller: str) -> dt.datetime:
    if now is None:
        return dt.datetime.now(dt.timezone.utc)
    if now.tzinfo is None:
        raise ConfigurationError(
            f"{caller}(now=...) must be timezone-aware (use tzinfo=datetime.timezone.utc)"
        )
    return now


def _presign(
    *,
    host: str,
    port: int | None,
    leading_query: str,
    region: str,
    service: str,
    expires: int,
    credentials: Credentials,
    now: dt.datetime,
) -> str:
    """Presign ``GET https://host[:port]/?<leading_query>`` the way botocore does.

    `leading_query` is the encoded parameters that sort before ``X-Amz-*`` (Action, DBUser).
    """
    stamp, date = _timestamp(int(now.timestamp()))
    prefix, canonical_tail = _endpoint(host, port)
    scope = f"{date}/{region}/{service}/aws4_request"
    query = (
        f"{leading_query}&X-Amz-Algorithm=AWS4-HMAC-SHA256"
        f"&X-Amz-Credential={_encode(credentials.access_key)}%2F{date}%2F{_encode(region)}"
        f"%2F{service}%2Faws4_request&X-Amz-Date={stamp}&X-Amz-Expires={expires}"
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
        _signing_key(credentials.secret_key, date, region, service),
        string_to_sign.encode("utf-8"),
        "sha256",
    ).hex()
    return f"{prefix}{query}&X-Amz-Signature={signature}"


_REGION = r"(?P<region>[a-z]{2}(?:-[a-z]+)+-\d+)"
_LABEL = r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?"
_LOWER = frozenset("abcdefghijklmnopqrstuvwxyz")
_LABEL_CHARS = _LOWER | frozenset("0123456789-")


def _is_label(label: str) -> bool:
    """Tell whether `label` matches `_LABEL` (letters, digits and inner hyphens)."""
    return bool(label) and label[0] != "-" and label[-1] != "-" and _LABEL_CHARS.issuperset(label)


def _is_region(label: str) -> bool:
    """Tell whether `label` matches `_REGION` (``us-east-1``, ``us-gov-west-1``)."""
    parts = label.split("-")
    return (
        len(parts) >= 3
        and len(parts[0]) == 2
        and all(part and _LOWER.issuperset(part) for part in parts[:-1])
        and parts[-1].isdecimal()
    )


def _rds_region(name: str) -> str | None:
    """Return the region of an RDS endpoint name, or None.

    ``<name>.<id | cluster-id | cluster-ro-id | cluster-custom-id | proxy-id>.<region>.rds.
    amazonaws.com[.cn]``, and the China form ``<name>.<id>.rds.<region>.amazonaws.com[.cn]``.
    Read label by label, not with a regular expression, whose compiling cost every cold start
    0.3 ms; `tests/test_signing.py` checks it against the expression.
    """
    labels = name.split(".")
    if labels[-1] == "cn":
        labels.pop()
    if len(labels) < 5 or labels[-2:] != ["amazonaws", "com"]:
        return None
    del labels[-2:]
    for region, rds in (labels[-2], labels[-1]), (labels[-1], labels[-2]):
        if rds == "rds" and _is_region(region) and all(map(_is_label, labels[:-2])):
            return region
    return None


# <cluster-id>.dsql[-suffix].<region>.on.aws (AWS's own connector allows the suffix). This and
# `_CLUSTER` are compiled on first use (by re's cache), for a name that may match only: a cold
# start on any other endpoint saves their compiling.
_DSQL_HOST = rf"(?:{_LABEL}\.)+dsql(?:-[a-z0-9]+)*\.{_REGION}\.on\.aws"
_DSQL_SUFFIX = ".on.aws"


def _normalize(host: str) -> str:
    return host.strip().lower().rstrip(".")


def _dsql_match(name: str) -> re.Match[str] | None:
    return re.fullmatch(_DSQL_HOST, name) if name.endswith(_DSQL_SUFFIX) else None


def is_dsql_host(host: str) -> bool:
    """Tell whether `host` is an Aurora DSQL endpoint name (``<id>.dsql.<region>.on.aws``)."""
    return _dsql_match(_normalize(host)) is not None


def region_from_host(host: str) -> str | None:
    """Return the AWS region named in an RDS, Aurora, RDS Proxy or Aurora DSQL endpoint, or None.

    None means the host is not an endpoint name (an IP address, a CNAME, localhost): the
    region must then be given explicitly.
    """
    name = _normalize(host)
    region = _rds_region(name)
    if region is not None:
        return region
    match = _dsql_match(name)
    return None if match is None else match.group("region")


# <cluster>.cluster-<id>.<region>.rds.amazonaws.com[.cn]; readers are cluster-ro-, custom
# endpoints cluster-custom- (either may point at readers).
_CLUSTER = (
    r"[^.]+\.cluster-(ro-|custom-)?(?P<suffix>[a-z0-9]+\.[a-z0-9-]+\.rds\.amazonaws\.com"
    r"(?:\.cn)?)\.?"
)


def _cluster_match(host: str) -> re.Match[str] | None:
    name = host.lower()
    return re.fullmatch(_CLUSTER, name) if ".cluster-" in name else None


def is_cluster_endpoint(host: str) -> bool:
    """Tell whether `host` is an Aurora cluster, reader or custom endpoint name."""
    return _cluster_match(host) is not None


def instance_host_pattern(cluster_host: str) -> str | None:
    """Return the instance endpoint pattern of an Aurora cluster or reader endpoint name.

    ``mydb.cluster-abc.us-east-1.rds.amazonaws.com`` gives ``?.abc.us-east-1.rds.amazonaws.com``;
    any other name (an instance endpoint, a CNAME) gives None.
    """
    match = _cluster_match(cluster_host)
    return None if match is None else f"?.{match.group('suffix')}"


def is_writer_endpoint(host: str) -> bool:
    """Tell whether `host` is an Aurora cluster (writer) endpoint name."""
    match = _cluster_match(host)
    return match is not None and match.group(1) is None


def is_reader_endpoint(host: str) -> bool:
    """Tell whether `host` is an Aurora reader endpoint name (``*.cluster-ro-*``)."""
    match = _cluster_match(host)
    return match is not None and match.group(1) == "ro-"
