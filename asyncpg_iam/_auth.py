"""IAM settings (`IAMAuth`) and the token provider that turns them into a token per connect.

The provider resolves, once, where to sign for (the endpoint name, the region and where that
region came from) and then, per connect, takes frozen credentials from the cache and signs. With
``token_reuse`` it may hand out a token it signed a moment ago for the same endpoint, port, user
and access key, never past the signing credentials' expiry.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import re
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Literal

from ._aws_env import FoundRegion, region_from_environment
from ._clock import SYSTEM_CLOCK, Clock
from ._credentials import AssumeRole, CredentialCache, build_cache, configured_region
from ._errors import ConfigurationError
from ._record import Record
from ._signing import (
    Credentials,
    build_auth_token,
    build_dsql_token,
    is_dsql_host,
    region_from_host,
)

if TYPE_CHECKING:
    from aiobotocore.session import AioSession

    from ._refusal import AuthFailureContext

__all__ = [
    "IAMAuth",
    "SigningTarget",
    "TokenProvider",
    "auth_from",
    "credential_cache_for",
    "failure_context",
    "find_region",
]

logger = logging.getLogger("asyncpg_iam.connect")

# Compiled on first use (by re's cache): only a pool given a region checks the first, only one
# that assumes a role the others.
_REGION = r"(?a)[a-z]{2,}(-[a-z]+)+-\d{1,2}"
_ROLE_ARN = r"(?a)arn:aws[a-z-]*:iam::\d{12}:role/[\w+=,.@/-]{1,512}"
_SESSION_NAME = r"(?a)[\w+=,.@-]{2,64}"
# RDS keeps a token for 900 s; reusing one for longer than 840 s leaves no margin for the
# connect that presents it.
MAX_TOKEN_REUSE = 840.0
# A reused token must outlive its signing credentials by at least this much.
_REUSE_EXPIRY_MARGIN = dt.timedelta(seconds=30)
_REUSE_CACHE_SIZE = 64
_ONE_SECOND = dt.timedelta(seconds=1)
_NEVER = dt.datetime.min.replace(tzinfo=dt.timezone.utc)


_HOST_LABEL_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")


def _is_host_label(label: str) -> bool:
    return (
        0 < len(label) <= 63
        and "-" not in (label[0], label[-1])
        and _HOST_LABEL_CHARS.issuperset(label)
    )


def _is_host_name(value: object) -> bool:
    """Tell whether `value` is a DNS name or an IP address (IPv6 optionally in brackets)."""
    if not isinstance(value, str) or not value or len(value) > 253:
        return False
    try:
        ipaddress.ip_address(value[1:-1] if value.startswith("[") else value)
    except ValueError:
        pass
    else:
        return True
    labels = value[:-1].split(".") if value.endswith(".") else value.split(".")
    return all(map(_is_host_label, labels))


def _check_region(region: str, what: str) -> None:
    if not isinstance(region, str) or not re.fullmatch(_REGION, region):
        raise ConfigurationError(
            f"{what} {region!r} is not an AWS region name: pass one like 'us-east-1' or 'eu-west-2'"
        )


class IAMAuth(Record):
    """How to obtain credentials and sign tokens; pass as ``create_pool(iam=IAMAuth(...))``.

    Credentials come from `credentials` (static), else `profile`, else the default chain
    (environment, SSO, web identity, container, instance metadata). With `role_arn` those
    credentials assume the role first (STS AssumeRole, refreshed before it expires).

    `region` defaults to the one in the RDS endpoint name, then the AWS configuration
    (``AWS_REGION``, ``AWS_DEFAULT_REGION``, the profile). `signing_host` / `signing_port` name
    the RDS endpoint to sign for when you connect through a CNAME, a tunnel or an IP address.
    `token_reuse` (seconds, at most 840) lets connects within that age share a token, for fleets
    close to RDS's IAM connection throttle; 0 signs a new token for every connect.

    `service` is ``"rds"`` (RDS, Aurora, RDS Proxy) or ``"dsql"`` (Aurora DSQL); None tells
    them apart by the endpoint name (``<id>.dsql.<region>.on.aws`` is DSQL), so pass it when
    you reach DSQL through a CNAME. `dsql_admin` chooses the DSQL token's action: True signs
    ``DbConnectAdmin``, False ``DbConnect``; None (the default) signs the admin action for the
    user ``admin`` only.

    `insecure_unverified_tls` lets sslmode ``require`` (or a context that does not verify
    certificates) carry the token: the connection is encrypted but anyone in the path can
    present a certificate and receive the token. Off by default; logged as a WARNING per pool.
    """

    _fields = (
        "region",
        "profile",
        "role_arn",
        "role_session_name",
        "external_id",
        "role_duration",
        "credentials",
        "session",
        "signing_host",
        "signing_port",
        "token_reuse",
        "insecure_unverified_tls",
        "service",
        "dsql_admin",
    )
    __slots__ = _fields
    _uncompared = frozenset({"session"})

    region: str | None
    profile: str | None
    role_arn: str | None
    role_session_name: str | None
    external_id: str | None
    role_duration: int | None
    credentials: Credentials | None
    session: AioSession | None
    signing_host: str | None
    signing_port: int | None
    token_reuse: float
    insecure_unverified_tls: bool
    service: Literal["rds", "dsql"] | None
    dsql_admin: bool | None

    def __init__(
        self,
        *,
        region: str | None = None,
        profile: str | None = None,
        role_arn: str | None = None,
        role_session_name: str | None = None,
        external_id: str | None = None,
        role_duration: int | None = None,
        credentials: Credentials | None = None,
        session: AioSession | None = None,
        signing_host: str | None = None,
        signing_port: int | None = None,
        token_reuse: float = 0.0,
        insecure_unverified_tls: bool = False,
        service: Literal["rds", "dsql"] | None = None,
        dsql_admin: bool | None = None,
    ) -> None:
        self._assign(
            region,
            profile,
            role_arn,
            role_session_name,
            external_id,
            role_duration,
            credentials,
            session,
            signing_host,
            signing_port,
            token_reuse,
            insecure_unverified_tls,
            service,
            dsql_admin,
        )
        self._check_modes()
        self._check_source()
        self._check_role()
        self._check_signing()

    def _check_modes(self) -> None:
        if not isinstance(self.insecure_unverified_tls, bool):
            raise ConfigurationError(
                "insecure_unverified_tls must be True or False (False: the server's "
                "certificate is always verified)"
            )
        if self.service not in (None, "rds", "dsql"):
            raise ConfigurationError(
                f"service must be 'rds' (RDS, Aurora, RDS Proxy), 'dsql' (Aurora DSQL) or None "
                f"to tell by the endpoint name, not {self.service!r}"
            )
        if self.dsql_admin is not None and not isinstance(self.dsql_admin, bool):
            raise ConfigurationError(
                "dsql_admin must be True (DbConnectAdmin), False (DbConnect) or None (admin "
                f"for the user 'admin'), not {self.dsql_admin!r}"
            )

    def _check_source(self) -> None:
        if self.region is not None:
            _check_region(self.region, "region")
        if self.profile is not None and (not isinstance(self.profile, str) or not self.profile):
            raise ConfigurationError("profile must be a non-empty profile name from ~/.aws/config")
        if self.credentials is not None and not isinstance(self.credentials, Credentials):
            raise ConfigurationError(
                "credentials must be an asyncpg_iam.Credentials(access_key=..., secret_key=...)"
            )
        if self.credentials is not None and self.profile is not None:
            raise ConfigurationError(
                "pass either credentials or profile, not both: static credentials do not read "
                "a profile"
            )
        session_profile = getattr(self.session, "profile", None)
        if (
            self.profile is not None
            and self.session is not None
            and session_profile != self.profile
        ):
            raise ConfigurationError(
                f"session is for profile {session_profile!r} but profile={self.profile!r} was "
                "given: pass one or the other"
            )

    def _check_signing(self) -> None:
        if self.signing_host is not None and not _is_host_name(self.signing_host):
            raise ConfigurationError(
                "signing_host must be the RDS endpoint name to sign for, like "
                "'mydb.abc123.us-east-1.rds.amazonaws.com'"
            )
        if self.signing_port is not None and (
            isinstance(self.signing_port, bool)
            or not isinstance(self.signing_port, int)
            or not 1 <= self.signing_port <= 65535
        ):
            raise ConfigurationError(
                f"signing_port must be a TCP port from 1 to 65535, not {self.signing_port!r}"
            )
        reuse = self.token_reuse
        if (
            isinstance(reuse, bool)
            or not isinstance(reuse, (int, float))
            or not 0 <= reuse <= MAX_TOKEN_REUSE
        ):
            raise ConfigurationError(
                f"token_reuse must be seconds from 0 (a new token per connect) to "
                f"{MAX_TOKEN_REUSE:g} (RDS accepts a token for 900 s), not {reuse!r}"
            )

    def _check_role(self) -> None:
        role_only = {
            "role_session_name": self.role_session_name,
            "external_id": self.external_id,
            "role_duration": self.role_duration,
        }
        if self.role_arn is None:
            given = [name for name, value in role_only.items() if value is not None]
            if given:
                raise ConfigurationError(
                    f"{', '.join(given)} only apply with role_arn: pass role_arn='arn:aws:iam::"
                    "<account>:role/<name>' or drop them"
                )
            return
        if not isinstance(self.role_arn, str) or not re.fullmatch(_ROLE_ARN, self.role_arn):
            raise ConfigurationError(
                f"role_arn {self.role_arn!r} is not an IAM role ARN like "
                "'arn:aws:iam::123456789012:role/app'"
            )
        if self.role_session_name is not None and (
            not isinstance(self.role_session_name, str)
            or not re.fullmatch(_SESSION_NAME, self.role_session_name)
        ):
            raise ConfigurationError(
                "role_session_name must be 2 to 64 characters of letters, digits and =,.@-_+"
            )
        if self.external_id is not None and (
            not isinstance(self.external_id, str) or not 2 <= len(self.external_id) <= 1224
        ):
            raise ConfigurationError("external_id must be a string of 2 to 1224 characters")
        duration = self.role_duration
        if duration is not None and (
            isinstance(duration, bool)
            or not isinstance(duration, int)
            or not 900 <= duration <= 43200
        ):
            raise ConfigurationError(
                f"role_duration must be whole seconds from 900 to 43200 (STS's limits), "
                f"not {duration!r}"
            )


def _is_dsql(auth: IAMAuth, signing_host: str) -> bool:
    return auth.service == "dsql" if auth.service is not None else is_dsql_host(signing_host)


def find_region(
    auth: IAMAuth, signing_host: str | None = None, *, given_as: str = "IAMAuth(region=...)"
) -> FoundRegion | None:
    """Return the region to sign for and where it came from, or None when there is none.

    In order: `auth.region` (named `given_as`), the region in `signing_host`'s endpoint name,
    ``AWS_REGION``, ``AWS_DEFAULT_REGION``, the profile's config. Never a default. The pool, the
    assume-role STS client and the doctor all ask this. Raises ConfigurationError for a profile
    that is not defined.
    """
    if auth.region is not None:
        return FoundRegion(auth.region, given_as)
    if signing_host is not None:
        endpoint_region = region_from_host(signing_host)
        if endpoint_region is not None:
            kind = "DSQL" if _is_dsql(auth, signing_host) else "RDS"
            return FoundRegion(endpoint_region, f"the {kind} endpoint name")
    from_environment = region_from_environment()
    if from_environment is not None:
        return from_environment
    configured = configured_region(profile=auth.profile, session=auth.session)
    if configured is None:
        return None
    profile = f"the profile {auth.profile!r}" if auth.profile else "the default profile"
    return FoundRegion(configured, f"{profile} in the AWS config file")


def credential_cache_for(
    auth: IAMAuth | None = None, *, clock: Clock = SYSTEM_CLOCK, **tuning: float
) -> CredentialCache:
    """Return the credential cache for `auth`'s credential settings (default: the chain).

    The settings are valid (`IAMAuth` checked them). The assume-role STS region is
    found by `find_region` without an endpoint (``IAMAuth(region=...)``, ``AWS_REGION``,
    ``AWS_DEFAULT_REGION``, the profile), else the region of the first database endpoint signed
    for; never a silent default. `tuning` names `CredentialCache`'s keyword arguments.
    """
    auth = auth if auth is not None else IAMAuth()
    role = None
    sts_region = None
    if auth.role_arn is not None:
        role = AssumeRole(
            role_arn=auth.role_arn,
            session_name=auth.role_session_name,
            external_id=auth.external_id,
            duration=auth.role_duration,
        )
        found = find_region(auth)
        if found is not None:
            sts_region = (found.name, found.source)
    return build_cache(
        credentials=auth.credentials,
        profile=auth.profile,
        session=auth.session,
        role=role,
        sts_region=sts_region,
        clock=clock,
        **tuning,
    )


def auth_from(iam: object) -> IAMAuth | None:
    """Return the IAMAuth an ``iam=`` argument means (None: no IAM); raise ConfigurationError."""
    if iam is True:
        return IAMAuth()
    if iam is False:
        return None
    if isinstance(iam, IAMAuth):
        return iam
    raise ConfigurationError(
        f"iam must be True (the default AWS credential chain), False (no IAM) or an "
        f"asyncpg_iam.IAMAuth, not {type(iam).__name__}"
    )


class SigningTarget(Record):
    """What a token is signed for: the endpoint RDS knows, the user and the region.

    `service` is ``"dsql"`` for Aurora DSQL (whose tokens name no port), with `admin` choosing
    ``DbConnectAdmin`` over ``DbConnect``; ``"rds"`` otherwise.
    """

    _fields = (
        "host",
        "port",
        "signing_host",
        "signing_port",
        "user",
        "region",
        "region_source",
        "endpoint_region",
        "service",
        "admin",
    )
    __slots__ = _fields

    host: str
    port: int
    signing_host: str
    signing_port: int
    user: str
    region: str
    region_source: str
    endpoint_region: str | None
    service: str
    admin: bool

    def __init__(
        self,
        host: str,
        port: int,
        signing_host: str,
        signing_port: int,
        user: str,
        region: str,
        region_source: str,
        endpoint_region: str | None,
        service: str = "rds",
        admin: bool = False,
    ) -> None:
        self._assign(
            host,
            port,
            signing_host,
            signing_port,
            user,
            region,
            region_source,
            endpoint_region,
            service,
            admin,
        )


class TokenRecord:
    """What the provider did for one connect attempt (for diagnosing a refused login).

    A plain slotted class (as `_tls.TLSSetting` says why).
    """

    __slots__ = ("credentials_expiry", "reused", "signed_at")

    def __init__(self) -> None:
        self.signed_at: dt.datetime | None = None
        self.credentials_expiry: dt.datetime | None = None
        self.reused = False


def _warn_if_ip(signing_host: str, *, dsql: bool) -> None:
    """Warn that a token signed for an IP address will be refused (RDS checks the name)."""
    try:
        ipaddress.ip_address(signing_host.strip("[]"))
    except ValueError:
        return
    logger.warning(
        "signing IAM tokens for %s, an IP address: %s checks the token against its endpoint "
        "name, so the login will be refused. Pass IAMAuth(signing_host='%s') "
        "(--signing-host on the command line)",
        signing_host,
        "DSQL" if dsql else "RDS",
        "<cluster-id>.dsql.<region>.on.aws" if dsql else "<name>.<id>.<region>.rds.amazonaws.com",
    )


class TokenProvider:
    """Sign a token per connect from cached credentials; no I/O in the steady state."""

    def __init__(
        self,
        auth: IAMAuth,
        *,
        clock: Clock = SYSTEM_CLOCK,
        credentials: CredentialCache | None = None,
    ) -> None:
        self.auth = auth
        self._clock = clock
        self.credentials = credentials or credential_cache_for(auth, clock=clock)
        self.tokens_signed = 0
        self._configured_region: tuple[FoundRegion | None] | None = None  # None: not read yet
        self._closed = False
        self.token_reuses = 0
        self._reusable: OrderedDict[tuple[Any, ...], tuple[str, dt.datetime, dt.datetime | None]]
        self._reusable = OrderedDict()
        # The last token signed: (target, credentials, the whole second it was signed in as
        # [start, end), token).
        self._last_signed: tuple[
            SigningTarget | None, Credentials | None, dt.datetime, dt.datetime, str
        ] = (None, None, _NEVER, _NEVER, "")

    def target(self, host: str, port: int, user: str) -> SigningTarget:
        """Resolve what to sign for when dialling `host`:`port` as `user`.

        Raises ConfigurationError when no region can be found.
        """
        signing_host = self.auth.signing_host or host
        signing_port = self.auth.signing_port or port
        endpoint_region = region_from_host(signing_host)
        dsql = _is_dsql(self.auth, signing_host)
        if self.auth.region is None and endpoint_region is None:
            # The environment's and the config files' region: read once per provider.
            if self._configured_region is None:
                self._configured_region = (find_region(self.auth),)
            (found,) = self._configured_region
        else:
            found = find_region(self.auth, signing_host)
        if found is None:
            raise ConfigurationError(
                f"no AWS region for {signing_host!r}: it is not an RDS endpoint name and no "
                "region is configured. Pass IAMAuth(region='us-east-1') or set AWS_REGION; "
                "if you connect through a CNAME, tunnel or IP, also pass "
                "IAMAuth(signing_host='<the RDS endpoint name>')"
            )
        region, source = found.name, found.source
        if self.auth.region is None and endpoint_region is None:
            _check_region(region, f"the AWS region from {source}")
        self.credentials.offer_region(region, source)
        _warn_if_ip(signing_host, dsql=dsql)
        return SigningTarget(
            host=host,
            port=port,
            signing_host=signing_host,
            signing_port=signing_port,
            user=user,
            region=region,
            region_source=source,
            endpoint_region=endpoint_region,
            service="dsql" if dsql else "rds",
            admin=dsql
            and (self.auth.dsql_admin if self.auth.dsql_admin is not None else user == "admin"),
        )

    async def token(self, target: SigningTarget, record: TokenRecord | None = None) -> str:
        """Return a token for `target`, signed now or (with token_reuse) recently."""
        token = self.token_now(target, record)
        if token is not None:
            return token
        credentials = await self.credentials.get()
        return self._token(target, credentials, self._clock.now(), record)

    def token_now(self, target: SigningTarget, record: TokenRecord | None = None) -> str | None:
        """`token` without waiting: the token, or None when the credentials must be fetched
        first (then await `token`)."""
        now = self._clock.now()
        credentials = self.credentials.fresh(now)
        if credentials is None:
            return None
        return self._token(target, credentials, now, record)

    def _token(
        self,
        target: SigningTarget,
        credentials: Credentials,
        now: dt.datetime,
        record: TokenRecord | None,
    ) -> str:
        if record is not None:
            record.credentials_expiry = credentials.expiry
        if self.auth.token_reuse > 0:
            return self._reused_or_signed(target, credentials, now, record)
        # A token is a function of the target, the credentials and the whole second it is
        # signed in: a second connect in the same second (a pool filling up, a reconnect wave)
        # gets the same bytes without computing them again. It counts as signed: it is the
        # token signing now would produce. Two comparisons of `now`, not a conversion of it,
        # on every connect.
        last = self._last_signed
        if last[0] is target and last[1] is credentials and last[2] <= now < last[3]:
            self.tokens_signed += 1
            token = last[4]
        else:
            token = self._sign(target, credentials, now)
        if record is not None:
            record.signed_at, record.reused = now, False
        return token

    def _sign(self, target: SigningTarget, credentials: Credentials, now: dt.datetime) -> str:
        """Sign the token for `target` with `credentials` at `now`, and keep it as the token
        of `now`'s whole second (see `_token`)."""
        if target.service == "dsql":
            token = build_dsql_token(
                host=target.signing_host,
                region=target.region,
                credentials=credentials,
                admin=target.admin,
                now=now,
            )
        else:
            token = build_auth_token(
                host=target.signing_host,
                port=target.signing_port,
                user=target.user,
                region=target.region,
                credentials=credentials,
                now=now,
            )
        second = now.replace(microsecond=0)
        self._last_signed = (target, credentials, second, second + _ONE_SECOND, token)
        self.tokens_signed += 1
        return token

    def _reused_or_signed(
        self,
        target: SigningTarget,
        credentials: Credentials,
        now: dt.datetime,
        record: TokenRecord | None,
    ) -> str:
        """With ``token_reuse``: present a token signed recently for the same target and key."""
        key = (
            target.signing_host.lower(),
            target.signing_port,
            target.user,
            target.region,
            credentials.access_key,
        )
        cached = self._reusable.get(key)
        if cached is not None:
            token, signed_at, expiry = cached
            age = (now - signed_at).total_seconds()
            if 0 <= age < self.auth.token_reuse and (
                expiry is None or now + _REUSE_EXPIRY_MARGIN < expiry
            ):
                self.token_reuses += 1
                if record is not None:
                    record.signed_at, record.reused = signed_at, True
                    record.credentials_expiry = expiry
                return token
        token = self._sign(target, credentials, now)
        if record is not None:
            record.signed_at, record.reused = now, False
        self._reusable[key] = (token, now, credentials.expiry)
        self._reusable.move_to_end(key)
        while len(self._reusable) > _REUSE_CACHE_SIZE:
            self._reusable.popitem(last=False)
        return token

    async def aclose(self) -> None:
        """Release the credential cache's resources (background refresh, STS clients) once."""
        self._reusable.clear()
        if not self._closed:
            self._closed = True
            await self.credentials.aclose()


def failure_context(
    exc: BaseException,
    target: SigningTarget,
    record: TokenRecord,
    *,
    credentials: CredentialCache,
    database: str | None,
    now: dt.datetime,
    clock_skew: float | None = None,
) -> AuthFailureContext:
    """Gather what is known about a refused login for `diagnose_auth_failure` (no secrets).

    `clock_skew` defaults to what the credential cache measured, if anything.
    """
    from ._refusal import AuthFailureContext  # only a refused login needs it

    cached = credentials.peek()
    return AuthFailureContext(
        host=target.host,
        port=target.port,
        user=target.user,
        database=database,
        signing_host=target.signing_host,
        signing_port=target.signing_port,
        region=target.region,
        region_source=target.region_source,
        endpoint_region=target.endpoint_region,
        credential_source=credentials.source,
        credentials_expiry=record.credentials_expiry
        or (cached.expiry if cached is not None else None),
        signed_at=record.signed_at,
        token_reused=record.reused,
        now=now,
        server_message=str(getattr(exc, "message", None) or exc),
        clock_skew=credentials.clock_skew if clock_skew is None else clock_skew,
        service=target.service,
    )
