"""The exceptions of asyncpg-iam.

    IAMError                                  base: catch this for anything the library raises
    ├── ConfigurationError (also ValueError)  bad arguments; raised at creation, before any I/O
    ├── CredentialsError                      no valid AWS credentials could be obtained
    ├── CABundleError                         the RDS CA bundle could not be downloaded
    ├── IAMAuthenticationError                the database refused an IAM login; also an
    │                                         asyncpg InvalidAuthorizationSpecificationError
    ├── ConnectError (also OSError)           the server could not be reached or did not answer:
    │   │                                     host, port, the phase reached and a hint
    │   ├── ConnectTimeoutError               ... within the connect timeout (also TimeoutError)
    │   ├── NoWriterError                     after a failover, no instance accepts writes
    │   └── TLSVerificationError              the server's certificate did not verify (also
    │                                         ssl.SSLCertVerificationError)
    ├── CommitOutcomeUnknownError             the connection broke during COMMIT: the
    │                                         transaction may or may not have committed
    └── SwitchoverTimeoutError                a blue/green switchover held a connect or
                                              acquire for the hold's bound (also TimeoutError)

Messages say what went wrong and what to do, and never carry a token, a secret key or a
session token.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import re
import ssl
from collections.abc import Callable
from typing import TYPE_CHECKING

from asyncpg.exceptions import InvalidAuthorizationSpecificationError

from ._aws_env import MAX_CLOCK_SKEW

if TYPE_CHECKING:
    from ._refusal import AuthFailureContext

__all__ = [
    "AUTH_CAUSES",
    "CABundleError",
    "CommitOutcomeUnknownError",
    "ConfigurationError",
    "ConnectError",
    "ConnectTimeoutError",
    "CredentialsError",
    "IAMAuthenticationError",
    "IAMError",
    "NoWriterError",
    "SwitchoverTimeoutError",
    "TLSVerificationError",
    "in_cli_words",
    "is_iam_refusal",
    "rank_auth_failure",
    "without_traceback",
]


class IAMError(Exception):
    """Base class of every error asyncpg-iam raises."""


class ConfigurationError(IAMError, ValueError):
    """An argument is invalid; the message names it and says what is allowed."""


class CommitOutcomeUnknownError(IAMError):
    """The connection broke while ``COMMIT`` was in flight; the cause is chained.

    The transaction may have committed or not: `run_transaction` never runs it again.
    """


class SwitchoverTimeoutError(IAMError, asyncio.TimeoutError):
    """A blue/green switchover held a new connect or an acquire for the hold's bound (30 s
    by default) without completing; traffic is no longer held after it."""


class CABundleError(IAMError):
    """The RDS CA bundle could not be downloaded, or what came is not PEM certificates."""


class CredentialsError(IAMError):
    """AWS credentials could not be obtained or have expired.

    `source` names the credential source that failed (for example ``"default chain"`` or
    ``"assume-role arn:aws:iam::123456789012:role/app"``).
    """

    def __init__(self, message: str, *, source: str | None = None) -> None:
        super().__init__(message)
        self.source = source


# A token signed with credentials that expire within this window may be refused by the time
# RDS checks it; the hint fires for expiries this close.
_EXPIRY_WARNING = dt.timedelta(seconds=60)


def _is_ip(host: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def _resource_arn(ctx: AuthFailureContext) -> str:
    host = ctx.signing_host.lower()
    if ".proxy-" in host:
        resource = "prx-<proxy resource id>"
    elif ".cluster-" in host:
        resource = "cluster-<cluster resource id>"
    else:
        resource = "<DbiResourceId, like db-ABCDEFGHIJKL01234>"
    partition = (
        "aws-cn"
        if ctx.region.startswith("cn-")
        else ("aws-us-gov" if ctx.region.startswith("us-gov-") else "aws")
    )
    return f"arn:{partition}:rds-db:{ctx.region}:<account-id>:dbuser:{resource}/{ctx.user}"


def _dsql_hints(ctx: AuthFailureContext) -> list[str]:
    cluster = ctx.signing_host.split(".", 1)[0] if ctx.endpoint_region else "<cluster-id>"
    arn = f"arn:aws:dsql:{ctx.region}:<account-id>:cluster/{cluster}"
    if ctx.user == "admin":
        return [
            f"The AWS identity (from {ctx.credential_source}) may lack permission: allow "
            f"dsql:DbConnectAdmin on {arn}. An assumed role needs the permission on the role."
        ]
    return [
        f"The role {ctx.user!r} may not be linked to this AWS identity: as admin, run "
        f"AWS IAM GRANT \"{ctx.user}\" TO '<the IAM role ARN>'; (and CREATE ROLE "
        f'"{ctx.user}" WITH LOGIN first).',
        f"The AWS identity (from {ctx.credential_source}) may lack permission: allow "
        f"dsql:DbConnect on {arn}.",
    ]


#: The causes `rank_auth_failure` names (an `IAMAuthenticationError`'s `cause` is the first).
AUTH_CAUSES = (
    "clock_skew",
    "credentials_expired",
    "missing_grant",
    "no_tls",
    "permission",
    "region_mismatch",
    "signing_host",
    "token_reuse",
)


def diagnose_auth_failure(ctx: AuthFailureContext) -> list[str]:
    """Rank the likely causes of a refused IAM login, most likely first, each with its fix."""
    return [hint for _cause, hint in rank_auth_failure(ctx)]


Cause = tuple[str, str]
"""A diagnosed cause of a refused login and its hint: ``(one of AUTH_CAUSES, text)``."""


def rank_auth_failure(ctx: AuthFailureContext) -> list[Cause]:
    """Return ``(cause, hint)`` pairs, most likely first; each cause is one of `AUTH_CAUSES`.

    Each rule below adds what the evidence in `ctx` supports, in order; a measured clock skew
    outranks every guess and goes first, an unmeasured one is named last.
    """
    ranked = [cause for rule in _AUTH_RULES for cause in rule(ctx)]
    skew, measured = _clock_skew(ctx)
    return [skew, *ranked] if measured else [*ranked, skew]


def _no_tls(ctx: AuthFailureContext) -> list[Cause]:
    message = ctx.server_message.lower()
    if "ssl off" not in message and "no encryption" not in message:
        return []
    return [
        (
            "no_tls",
            "The connection was not encrypted: RDS accepts IAM logins only over TLS. Connect "
            "with ssl='verify-full' (the default), or 'verify-ca' with the RDS CA bundle.",
        )
    ]


def _region_mismatch(ctx: AuthFailureContext) -> list[Cause]:
    if ctx.endpoint_region is None or ctx.endpoint_region == ctx.region:
        return []
    return [
        (
            "region_mismatch",
            f"Region mismatch: the token was signed for region {ctx.region!r} "
            f"(from {ctx.region_source}) but the endpoint {ctx.signing_host!r} is in "
            f"{ctx.endpoint_region!r}. Drop IAMAuth(region=...) or set it to "
            f"{ctx.endpoint_region!r}.",
        )
    ]


def _signing_host(ctx: AuthFailureContext) -> list[Cause]:
    if ctx.endpoint_region is not None:
        return []
    dsql = ctx.service == "dsql"
    kind = "a DSQL" if dsql else "an RDS"
    what = "an IP address" if _is_ip(ctx.signing_host) else f"not {kind} endpoint name"
    example = (
        "<cluster-id>.dsql.<region>.on.aws'"
        if dsql
        else "<name>.<id>.<region>.rds.amazonaws.com', signing_port=<its port>"
    )
    return [
        (
            "signing_host",
            f"The token was signed for {ctx.signing_host!r}, which is {what}: "
            f"{'DSQL' if dsql else 'RDS'} checks the token against its own endpoint name. If "
            "you connect through a CNAME, tunnel, proxy or IP, pass "
            f"IAMAuth(signing_host='{example}).",
        )
    ]


def _credentials_expired(ctx: AuthFailureContext) -> list[Cause]:
    if ctx.credentials_expiry is None:
        return []
    left = ctx.credentials_expiry - ctx.now
    if left > _EXPIRY_WARNING:
        return []
    state = "had expired" if left.total_seconds() <= 0 else "were about to expire"
    return [
        (
            "credentials_expired",
            f"The signing credentials (from {ctx.credential_source}) {state} at "
            f"{ctx.credentials_expiry.isoformat()}: a token dies with its credentials. "
            "Check that the credential source refreshes them.",
        )
    ]


def _token_reuse(ctx: AuthFailureContext) -> list[Cause]:
    if not ctx.token_reused or ctx.token_age is None:
        return []
    return [
        (
            "token_reuse",
            f"The token was reused, {ctx.token_age:.0f} s after it was signed: lower "
            "IAMAuth(token_reuse=...) if the credentials rotate or the clock drifts.",
        )
    ]


def _grants_and_permissions(ctx: AuthFailureContext) -> list[Cause]:
    if ctx.service == "dsql":
        dsql_hints = _dsql_hints(ctx)
        ranked: list[Cause] = []
        if ctx.user != "admin":  # a role not linked to the identity: DSQL's "GRANT"
            ranked.append(("missing_grant", dsql_hints.pop(0)))
        return ranked + [("permission", hint) for hint in dsql_hints]
    return [
        (
            "missing_grant",
            f"The database user {ctx.user!r} may lack the rds_iam role: run "
            f'GRANT rds_iam TO "{ctx.user}"; as an administrator.',
        ),
        (
            "permission",
            "The AWS identity (from "
            f"{ctx.credential_source}) may lack permission: allow rds-db:connect on "
            f"{_resource_arn(ctx)}. An assumed role needs the permission on the role, not on "
            "the user that assumes it.",
        ),
    ]


def _clock_skew(ctx: AuthFailureContext) -> tuple[Cause, bool]:
    """Return the clock-skew cause and whether a skew beyond MAX_CLOCK_SKEW was measured."""
    skew = ctx.clock_skew
    if skew is not None and abs(skew) > MAX_CLOCK_SKEW:
        direction = "ahead of" if skew > 0 else "behind"
        hint = (
            f"Clock skew: this host's clock is {abs(skew):.0f} s {direction} AWS's "
            "(measured against the Date of an AWS response). Tokens are valid for 15 "
            "minutes from signing by this clock, so RDS sees them as expired or not yet "
            "valid: sync the clock (NTP)."
        )
        return ("clock_skew", hint), True
    measured = f"; measured against AWS: {skew:+.0f} s" if skew is not None else ", not measured"
    hint = (
        f"Clock skew: tokens are valid for 15 minutes from signing by this host's clock "
        f"(it read {ctx.now.isoformat(timespec='seconds')}{measured}). If it is more than a "
        "few minutes off, RDS sees the token as expired or not yet valid: sync the clock "
        "(NTP)."
    )
    return ("clock_skew", hint), False


_AUTH_RULES: tuple[Callable[[AuthFailureContext], list[Cause]], ...] = (
    _no_tls,
    _region_mismatch,
    _signing_host,
    _credentials_expired,
    _token_reuse,
    _grants_and_permissions,
)


# How a hint's library settings are spelled on the command line (`asyncpg-iam doctor`).
_CLI_WORDS = (
    ("Drop IAMAuth(region=...) or set it to", "Drop --region or pass --region"),
    ("IAMAuth(region=...)", "--region"),
    ("pass IAMAuth(signing_host=", "pass --signing-host "),
    (", signing_port=<its port>)", " --signing-port <its port>"),
    ("IAMAuth(token_reuse=...)", "token_reuse"),
)


# SQLSTATE 28000 errors that are not a refused token: the login itself was fine, the server
# has no such role. They pass through as asyncpg raised them, without IAM hints.
_NOT_A_REFUSAL = r'role ".*" does not exist'  # compiled on the first refusal


def is_iam_refusal(exc: InvalidAuthorizationSpecificationError) -> bool:
    """Tell a refused IAM login (RDS's PAM failure, DSQL's refusal, no TLS) from other 28000s."""
    return not re.search(_NOT_A_REFUSAL, str(exc))


def without_traceback(exc: BaseException) -> BaseException:
    """Return `exc`, to chain as a cause, without its traceback and its own context.

    The library's error already says what the cause said, where and why; the cause's type and
    message stay (`__cause__`), the frames inside asyncpg and asyncio that raised it go, so a
    failed connect prints one clear error instead of two stack traces.
    """
    exc.__traceback__ = None
    exc.__suppress_context__ = True
    return exc


def in_cli_words(hint: str) -> str:
    """Return `hint` with the library's settings named as the command line's options."""
    for library, cli in _CLI_WORDS:
        hint = hint.replace(library, cli)
    return hint


class IAMAuthenticationError(IAMError, InvalidAuthorizationSpecificationError):  # type: ignore[misc]
    """The database refused an IAM login ("PAM authentication failed").

    Chained to asyncpg's error. `context` holds what the library could see about the attempt
    (host, port, user, region, signing host, credential source and expiry, token age) and
    `hints` the likely causes, most likely first, each with its fix. Never the token.
    """

    def __init__(
        self, context: AuthFailureContext, hints: list[str], cause: str | None = None
    ) -> None:
        self.context = context
        self.hints = tuple(hints)
        self.cause = cause
        """The most likely cause, one of `AUTH_CAUSES` (None when not diagnosed)."""
        expiry = (
            context.credentials_expiry.isoformat(timespec="seconds")
            if context.credentials_expiry is not None
            else "none"
        )
        age = context.token_age
        lines = [
            f"IAM authentication failed for user {context.user!r} at "
            f"{context.host}:{context.port}: {context.server_message}",
            f"  signed for {context.signing_host}:{context.signing_port} in region "
            f"{context.region} (from {context.region_source}); credentials from "
            f"{context.credential_source}, expiring {expiry}; token age "
            + (f"{age:.1f} s" if age is not None else "unknown")
            + (" (reused)" if context.token_reused else ""),
            "Likely causes, most likely first:",
        ]
        lines += [f"  {i}. {hint}" for i, hint in enumerate(self.hints, 1)]
        super().__init__("\n".join(lines))
        # asyncpg's PostgresMessage fields, so handlers that read them keep working.
        self.message = lines[0]
        self.sqlstate = "28000"
        self.severity = "FATAL"

    @property
    def host(self) -> str:
        """The host that was dialled."""
        return self.context.host

    @property
    def port(self) -> int:
        """The port that was dialled."""
        return self.context.port

    @property
    def user(self) -> str:
        """The database user."""
        return self.context.user

    @property
    def region(self) -> str:
        """The region the token was signed for."""
        return self.context.region


class ConnectError(IAMError, OSError):
    """The server could not be reached, or stopped answering, before a login was attempted.

    `phase` is how far the connection got: ``"dns"``, ``"tcp"``, ``"tls"``, ``"startup"``
    (TCP open, no answer to the TLS request), ``"login"``, or ``"silent"`` (not tried: the
    host went silent and answered no health-check probe since); `hint` says what to check.
    Chained to the underlying error.
    """

    def __init__(
        self,
        message: str,
        *,
        host: str,
        port: int,
        phase: str,
        hint: str,
        timeout: float | None = None,
    ) -> None:
        super().__init__(f"{message}. {hint}")
        self.host = host
        self.port = port
        self.phase = phase
        self.hint = hint
        self.timeout = timeout

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class NoWriterError(ConnectError):
    """After a failover, the cluster's topology found no instance that accepts writes.

    Raised at once to a pool that wants the writer (``phase`` is ``"topology"``) rather than
    retrying for the whole connect timeout; the pool tries again on the next connect.
    """


class ConnectTimeoutError(ConnectError, asyncio.TimeoutError):
    """Connecting did not finish within the connect timeout (`timeout`, seconds)."""


class TLSVerificationError(ConnectError, ssl.SSLCertVerificationError):
    """The server's certificate did not verify; no token was sent.

    `ca` names the CA file or store it was checked against.
    """

    def __init__(self, message: str, *, host: str, port: int, hint: str, ca: str) -> None:
        super().__init__(message, host=host, port=port, phase="tls", hint=hint)
        self.ca = ca
