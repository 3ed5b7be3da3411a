"""``asyncpg-iam doctor``: check every step of an IAM login, in order, and say how to fix it.

Each check is one line: a mark, the check's name, what was found and, when it fails, the fix.
The checks reuse the pool's own pieces (the credential cache, the token provider, the TLS
defaults and the diagnosis of refused logins), so what the doctor finds is what the pool does.
Nothing secret is printed: access keys are masked and the token is never shown.

Every check is a function of one immutable `Context` (the arguments, the pool's pieces and the
facts found before any check runs, the region among them) and of the checks before it, which it
reads by name: a check that needs what an earlier one found (credentials, an address, a
connection) says so and is skipped when that is missing.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import ipaddress
import json
import socket
import ssl
import sys
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping
from types import MappingProxyType
from typing import Any, TypeVar

import asyncpg

from .._auth import IAMAuth, SigningTarget, TokenProvider, credential_cache_for
from .._auth import find_region as find_signing_region
from .._aws_env import (
    IMDS_ADDRESS,
    MAX_CLOCK_SKEW,
    FoundRegion,
    credential_endpoints,
    env,
    proxy_problem,
    response_date,
)
from .._clock import OffsetClock
from .._connect import Connector, ConnectPlan
from .._credentials import CredentialCache
from .._errors import (
    ConfigurationError,
    IAMAuthenticationError,
    IAMError,
    diagnose_auth_failure,
    in_cli_words,
)
from .._signing import Credentials, mask_access_key, region_from_host
from .._tls import SSL_REQUEST
from ._options import (
    EXIT_FAILED,
    EXIT_OK,
    Commands,
    add_aws,
    add_target,
    iam_auth_from,
    plan_from,
    positive,
)

__all__ = [
    "CHECKS",
    "Check",
    "Context",
    "dns_verdict",
    "register",
    "run",
    "run_checks",
]

PASS, FAIL, SKIP = "pass", "fail", "skip"
_MARKS = {PASS: "[ OK ]", FAIL: "[FAIL]", SKIP: "[SKIP]"}
_T = TypeVar("_T")


def register(commands: Commands) -> None:
    """Add the ``doctor`` command."""
    parser = commands.add_parser(
        "doctor",
        help="check every step of an IAM login and say how to fix what fails",
        description="Check, in order: proxy settings, credentials, caller identity, region, "
        "DNS, TCP, TLS, clock skew, token, login and SELECT 1. One line per check; exit "
        "status 0 only when all pass.",
    )
    add_target(parser, database=True)
    add_aws(parser)
    parser.add_argument(
        "--ca",
        help="CA bundle to verify the server with (default: $ASYNCPG_IAM_CA_BUNDLE, the "
        "cached RDS bundle, else the system store)",
    )
    parser.add_argument("--json", action="store_true", help="print the checks as JSON")
    parser.add_argument(
        "--timeout",
        type=positive,
        default=10.0,
        help="seconds each network check may take (default 10)",
    )
    # For tests: pretend the local clock is off by this many seconds.
    parser.add_argument("--clock-offset", type=float, default=0.0, help=argparse.SUPPRESS)
    parser.set_defaults(run=run)


@dataclasses.dataclass(frozen=True, slots=True)
class Check:
    """The outcome of one check: `status` is ``pass``, ``fail`` or ``skip``."""

    name: str
    status: str
    detail: str
    fix: str | None = None
    found: object = dataclasses.field(default=None, repr=False, compare=False)
    """What the check found that later checks build on (never printed): the credentials, the
    addresses, the time AWS answered, the connection."""

    def line(self) -> str:
        """Return the check as one line of text."""
        text = f"{_MARKS[self.status]} {self.name:<11} {self.detail}"
        if self.fix:
            text += f" -> fix: {self.fix}"
        return text

    def as_dict(self) -> dict[str, str | None]:
        """Return the check as its JSON object (what it found is not part of it)."""
        return {"name": self.name, "status": self.status, "detail": self.detail, "fix": self.fix}


@dataclasses.dataclass(frozen=True, slots=True)
class AWSTime:
    """When STS answered by its Date header, and by this host's clock."""

    aws: dt.datetime
    local: dt.datetime

    def skew(self) -> float:
        """Return seconds this clock is ahead of AWS's (0 within the header's resolution)."""
        # The Date header is truncated to whole seconds: compare with the middle of its second,
        # and do not count what is left of the truncation as skew.
        skew = (self.local - self.aws).total_seconds() - 0.5
        return 0.0 if abs(skew) < 1.0 else skew


@dataclasses.dataclass(frozen=True, slots=True)
class Context:
    """What every check reads, decided once before the first check runs.

    Each piece the pool would build is here, or why it could not be built: the connect plan
    (TLS decided as a pool decides it), the credential cache, what to sign for, the connector.
    """

    host: str
    port: int
    user: str
    timeout: float
    clock: OffsetClock
    auth: IAMAuth
    signing_host: str
    region: FoundRegion | None
    no_region: str
    """Why no region was found (when `region` is None)."""
    sts_host: str | None
    plan: ConnectPlan | None
    plan_error: str | None
    cache: CredentialCache | None
    cache_error: str | None
    provider: TokenProvider | None
    target: SigningTarget | None
    target_error: str | None
    connector: Connector | None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Context:
        """Build the context of the doctor's options; raises ConfigurationError as `token` does."""
        auth = iam_auth_from(args)
        plan: ConnectPlan | None = None
        plan_error: str | None = None
        try:
            plan = plan_from(args, auth)
        except ConfigurationError as exc:
            plan_error = str(exc)  # reported by the TLS check; the checks before it still run
        clock = OffsetClock(args.clock_offset)
        signing_host = auth.signing_host or args.host
        region, no_region = find_region(auth, signing_host)
        cache, cache_error = _credential_cache(auth, clock, args.timeout)
        provider = target = connector = None
        target_error: str | None = None
        if cache is not None:
            provider = TokenProvider(auth, clock=clock, credentials=cache)
            try:
                target = provider.target(args.host, args.port, args.user)
            except ConfigurationError as exc:
                target_error = str(exc)
        if plan is not None and provider is not None and target is not None:
            connector = Connector(plan, provider=provider, kind="doctor", clock=clock)
        return cls(
            host=args.host,
            port=args.port,
            user=args.user,
            timeout=args.timeout,
            clock=clock,
            auth=auth,
            signing_host=signing_host,
            region=region,
            no_region=no_region,
            sts_host=_sts_host(region),
            plan=plan,
            plan_error=plan_error,
            cache=cache,
            cache_error=cache_error,
            provider=provider,
            target=target,
            target_error=target_error,
            connector=connector,
        )

    async def aclose(self, checks: Mapping[str, Check]) -> None:
        """Close the login's connection, and the provider and credential cache."""
        connection = found(checks, "login", asyncpg.Connection)
        if connection is not None:
            await connection.close(timeout=self.timeout)
        if self.provider is not None:
            await self.provider.aclose()
        elif self.cache is not None:
            await self.cache.aclose()


def _credential_cache(
    auth: IAMAuth, clock: OffsetClock, timeout: float
) -> tuple[CredentialCache | None, str | None]:
    try:
        cache = credential_cache_for(auth, clock=clock, fetch_timeout=timeout)
    except ConfigurationError as exc:
        return None, str(exc)
    return cache, None


def find_region(auth: IAMAuth, signing_host: str) -> tuple[FoundRegion | None, str]:
    """Return the region to sign for and where it came from, or None and why there is none.

    The pool's own search (`asyncpg_iam._auth.find_region`), with --region for IAMAuth's
    region. Never a default: a region nobody chose is not checked against anything.
    """
    profile = f"the profile {auth.profile!r}" if auth.profile else "the default profile"
    try:
        found = find_signing_region(auth, signing_host, given_as="--region")
        missing = f"{profile} sets none in the AWS config file"
    except ConfigurationError as exc:
        found, missing = None, _one_line(str(exc))
    if found is not None:
        return found, ""
    return None, (
        f"no AWS region found: no --region, {signing_host} is not an RDS endpoint name, "
        f"AWS_REGION and AWS_DEFAULT_REGION are not set, and {missing}"
    )


def _sts_host(region: FoundRegion | None) -> str | None:
    url = env("AWS_ENDPOINT_URL_STS") or env("AWS_ENDPOINT_URL")
    if url:
        return urllib.parse.urlsplit(url).hostname or url
    if region is None:
        return None
    suffix = "amazonaws.com.cn" if region.name.startswith("cn-") else "amazonaws.com"
    return f"sts.{region.name}.{suffix}"


def _one_line(text: str) -> str:
    return " ".join(text.split())


def found(checks: Mapping[str, Check], name: str, kind: type[_T]) -> _T | None:
    """Return what the earlier check `name` found, when it found a `kind`; else None."""
    check = checks.get(name)
    value = None if check is None else check.found
    return value if isinstance(value, kind) else None


def passed(checks: Mapping[str, Check], name: str) -> bool:
    """Tell whether the earlier check `name` passed."""
    check = checks.get(name)
    return check is not None and check.status == PASS


# -- the checks, in order -----------------------------------------------------------------------


async def check_proxy(ctx: Context, checks: Mapping[str, Check]) -> Check:
    """HTTP(S)_PROXY set while NO_PROXY lets metadata or STS requests go to the proxy."""
    # Instance metadata is always listed: a role attached later, or another tool on this
    # host, would go through the proxy too.
    needed = [(IMDS_ADDRESS, "instance metadata")]
    needed += [e for e in credential_endpoints() if e[0] != IMDS_ADDRESS]
    if ctx.sts_host is not None:  # without a region the STS endpoint is unknown (region check)
        needed.append((ctx.sts_host, "STS"))
    problem = proxy_problem(needed)
    if problem is not None:
        return Check("proxy", FAIL, problem.describe(), problem.fix)
    proxies = [name for name in ("HTTPS_PROXY", "HTTP_PROXY") if env(name)]
    if not proxies:
        return Check("proxy", PASS, "no HTTP(S)_PROXY set: AWS endpoints are reached directly")
    covered = ", ".join(host for host, _ in needed)
    return Check("proxy", PASS, f"{' and '.join(proxies)} set; NO_PROXY covers {covered}")


def _credentials_fix(message: str) -> str:
    lowered = message.lower()
    if "expired" in lowered:
        return (
            "renew the credentials (`aws sso login`, new keys, a longer role session) "
            "and check that the source refreshes them and this host's clock is right"
        )
    if "no aws credentials" in lowered:
        return (
            "set AWS_PROFILE or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, run `aws sso "
            "login`, or attach an IAM role; behind a proxy add 169.254.169.254 to NO_PROXY"
        )
    if "assumerole" in lowered:
        return "allow sts:AssumeRole on the role and trust the caller in its trust policy"
    return "check the credential source named above (network, NO_PROXY, its config)"


async def check_credentials(ctx: Context, checks: Mapping[str, Check]) -> Check:
    """Which credential source answered, and when its credentials expire."""
    if ctx.cache is None:
        return Check(
            "credentials",
            FAIL,
            ctx.cache_error or "no credential source",
            "fix the AWS options (--profile, --role-arn, ...)",
        )
    try:
        credentials = await ctx.cache.get()
    except IAMError as exc:
        message = _one_line(str(exc))
        return Check("credentials", FAIL, message, _credentials_fix(message))
    key = mask_access_key(credentials.access_key)
    if credentials.expiry is None:
        when = "long-term keys (no expiry)"
    else:
        left = credentials.expiry - ctx.clock.now()
        when = (
            f"expire {credentials.expiry.isoformat(timespec='seconds')} "
            f"(in {left.total_seconds() / 60:.0f} min)"
        )
    detail = f"from {ctx.cache.source}: access key {key}, {when}"
    return Check("credentials", PASS, detail, found=credentials)


async def check_identity(ctx: Context, checks: Mapping[str, Check]) -> Check:
    """Ask STS who the credentials belong to; note the Date of the response for the clock."""
    credentials = found(checks, "credentials", Credentials)
    if credentials is None:
        return Check("identity", SKIP, "needs credentials")
    if ctx.region is None:
        return Check("identity", SKIP, "needs a region to choose the STS endpoint (region check)")
    local = _local_credential_endpoint()
    if local is not None and not (env("AWS_ENDPOINT_URL_STS") or env("AWS_ENDPOINT_URL")):
        return Check(
            "identity",
            SKIP,
            f"the credentials come from a credential endpoint on this machine ({local}, as "
            "`asyncpg-iam emulate` sets up) and no STS endpoint is set (AWS_ENDPOINT_URL_STS): "
            "there is no STS to ask who they belong to",
        )
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        response, before, after = await _caller_identity(ctx, credentials, ctx.region.name)
    except ClientError as exc:
        error = exc.response.get("Error", {})
        return Check(
            "identity",
            FAIL,
            f"STS refused the credentials: {error.get('Code')}: {error.get('Message')}",
            "the keys are invalid, revoked or expired: renew them (and check the clock)",
        )
    except (BotoCoreError, OSError, asyncio.TimeoutError) as exc:
        return Check(
            "identity",
            FAIL,
            f"could not reach STS at {ctx.sts_host}: {exc}",
            "allow HTTPS to the STS endpoint (firewall, VPC endpoint) and add it to "
            "NO_PROXY when a proxy is set",
        )
    date = response_date(response)  # AWS's clock, for the clock check and the login's hints
    answered = None if date is None else AWSTime(date, before + (after - before) / 2)
    arn = str(response.get("Arn", "?"))
    return Check("identity", PASS, f"{arn}: {_describe_identity(arn)}", found=answered)


def _local_credential_endpoint() -> str | None:
    """Return the container-credentials URL when it is on loopback (a local stand-in)."""
    url = env("AWS_CONTAINER_CREDENTIALS_FULL_URI")
    if not url or env("AWS_ACCESS_KEY_ID"):  # keys in the environment come first in the chain
        return None
    host = urllib.parse.urlsplit(url).hostname or ""
    try:
        return url if ipaddress.ip_address(host).is_loopback else None
    except ValueError:
        return url if host == "localhost" else None


async def _caller_identity(
    ctx: Context, credentials: Credentials, region: str
) -> tuple[dict[str, Any], dt.datetime, dt.datetime]:
    """Call GetCallerIdentity once; return the response and this clock before and after."""
    from aiobotocore.config import AioConfig
    from aiobotocore.session import AioSession

    config = AioConfig(
        connect_timeout=ctx.timeout,
        read_timeout=ctx.timeout,
        retries={"total_max_attempts": 1},
    )
    session = AioSession(profile=ctx.auth.profile)
    async with session.create_client(
        "sts",
        region_name=region,
        aws_access_key_id=credentials.access_key,
        aws_secret_access_key=credentials.secret_key,
        aws_session_token=credentials.token,
        config=config,
    ) as client:
        before = ctx.clock.now()
        response: dict[str, Any] = await client.get_caller_identity()
        return response, before, ctx.clock.now()


async def check_region(ctx: Context, checks: Mapping[str, Check]) -> Check:
    """The region to sign for: where it was found, and whether the host agrees."""
    fix = "pass --region (and --signing-host with the RDS endpoint name), or set AWS_REGION"
    region = ctx.region
    if region is None:
        return Check("region", FAIL, ctx.no_region, fix)
    if ctx.target_error is not None:
        return Check("region", FAIL, _one_line(ctx.target_error), fix)
    endpoint_region = region_from_host(ctx.signing_host)
    if endpoint_region is not None and endpoint_region != region.name:
        return Check(
            "region",
            FAIL,
            f"tokens would be signed for {region.name} (from {region.source}) but the endpoint "
            f"{ctx.signing_host} is in {endpoint_region}: RDS refuses them",
            f"drop --region or pass --region {endpoint_region}",
        )
    if endpoint_region is None:
        return Check(
            "region",
            PASS,
            f"{region.name} (from {region.source}); {ctx.signing_host} is not an RDS name, "
            "so the region cannot be checked against it",
        )
    return Check("region", PASS, f"{region.name} (from {region.source}), matches the endpoint")


async def check_dns(ctx: Context, checks: Mapping[str, Check]) -> Check:
    """Resolve the host; behind a CNAME, name the RDS endpoint to sign for."""
    loop = asyncio.get_running_loop()
    try:
        infos = await asyncio.wait_for(
            loop.getaddrinfo(
                ctx.host, ctx.port, type=socket.SOCK_STREAM, flags=socket.AI_CANONNAME
            ),
            ctx.timeout,
        )
    except (OSError, asyncio.TimeoutError) as exc:
        return Check(
            "dns",
            FAIL,
            f"cannot resolve {ctx.host}: {exc}",
            "check the endpoint name (aws rds describe-db-instances / describe-db-clusters) "
            "and this host's DNS (inside the VPC, or a public endpoint)",
        )
    addresses = tuple(dict.fromkeys(str(info[4][0]) for info in infos))
    canonical = next((info[3] for info in infos if info[3]), "")
    verdict = dns_verdict(ctx.host, list(addresses), canonical, ctx.auth.signing_host)
    # The addresses, even when the verdict fails: the checks that need an address still run.
    return dataclasses.replace(verdict, found=addresses)


async def check_tcp(ctx: Context, checks: Mapping[str, Check]) -> Check:
    """Open a TCP connection to host:port."""
    if found(checks, "dns", tuple) is None:
        return Check("tcp", SKIP, "needs an address (the dns check)")
    host, port = ctx.host, ctx.port
    started = time.monotonic()
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), ctx.timeout)
    except (OSError, asyncio.TimeoutError) as exc:
        what = (
            f"no answer within {ctx.timeout:g} s (--timeout)"
            if isinstance(exc, asyncio.TimeoutError)
            else str(exc)
        )
        return Check(
            "tcp",
            FAIL,
            f"cannot connect to {host}:{port}: {what}",
            f"allow TCP {port} from this host in the security group / network ACL, check "
            "--port, and that the instance is available (and publicly accessible if you "
            "are outside its VPC)",
        )
    peer = writer.get_extra_info("peername")
    writer.close()
    elapsed = (time.monotonic() - started) * 1000
    address = peer[0] if isinstance(peer, tuple) else host
    return Check("tcp", PASS, f"connected to {address}:{port} in {elapsed:.0f} ms")


class _Refused(Exception):
    """The TLS check's verdict, raised from the handshake."""

    def __init__(self, check: Check) -> None:
        super().__init__(check.detail)
        self.check = check


async def check_tls(ctx: Context, checks: Mapping[str, Check]) -> Check:
    """Ask for TLS as libpq does, then verify the certificate and the host name."""
    if not passed(checks, "tcp"):
        return Check("tls", SKIP, "needs a TCP connection")
    if ctx.plan is None:
        return Check("tls", FAIL, f"the pool would refuse these settings: {ctx.plan_error}")
    tls = ctx.plan.tls
    try:
        version = await _tls_handshake(ctx, ctx.plan)
    except _Refused as refused:
        return refused.check
    if not tls.verified:
        return Check(
            "tls",
            FAIL,
            f"{version}, but the certificate was NOT verified (sslmode {tls.mode} from "
            f"{tls.mode_source}): anyone in the path could receive the token",
            "use sslmode verify-full (the default), or verify-ca with the RDS CA bundle (--ca)",
        )
    host = ctx.host
    verified = "certificate verified" + (f" for {host}" if tls.mode == "verify-full" else "")
    return Check("tls", PASS, f"{version}, {verified} against {tls.ca_source} ({tls.mode})")


async def _tls_handshake(ctx: Context, plan: ConnectPlan) -> str:
    """Send PostgreSQL's SSL request and do the handshake; return the TLS version.

    Raises _Refused with the failed check.
    """
    host, port, timeout = ctx.host, ctx.port, ctx.timeout
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except (OSError, asyncio.TimeoutError) as exc:
        raise _Refused(Check("tls", FAIL, f"cannot connect to {host}:{port}: {exc}")) from None
    try:
        writer.write(SSL_REQUEST)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(1), timeout)
        if answer != b"S":
            raise _Refused(_refuses_tls(host, port, answer))
        context = plan.tls.context
        assert context is not None  # an IAM plan always has one
        transport = await asyncio.wait_for(
            asyncio.get_running_loop().start_tls(
                writer.transport, writer.transport.get_protocol(), context, server_hostname=host
            ),
            timeout,
        )
    except ssl.SSLCertVerificationError as exc:
        raise _Refused(_unverified(plan, exc)) from None
    except asyncio.TimeoutError:
        raise _Refused(_silent(host, port, timeout)) from None
    except (OSError, ssl.SSLError, EOFError) as exc:
        detail = f"TLS handshake with {host}:{port} failed: {exc!r}"
        raise _Refused(Check("tls", FAIL, detail)) from None
    finally:
        writer.transport.abort()
    assert transport is not None
    ssl_object = transport.get_extra_info("ssl_object")
    transport.abort()
    return str(ssl_object.version()) if ssl_object is not None else "TLS"


def _refuses_tls(host: str, port: int, answer: bytes) -> Check:
    what = "answered N" if answer == b"N" else f"answered {answer!r}"
    return Check(
        "tls",
        FAIL,
        f"the server at {host}:{port} refuses TLS ({what} to the SSL request): an "
        "IAM token would travel in clear; RDS always offers TLS",
        "connect to the RDS endpoint itself (or a TLS-passthrough tunnel), never "
        "through something that terminates TLS; never use sslmode "
        "disable/allow/prefer with IAM",
    )


def _unverified(plan: ConnectPlan, exc: ssl.SSLCertVerificationError) -> Check:
    return Check(
        "tls",
        FAIL,
        f"certificate verification failed against {plan.tls.ca_source}: {exc.verify_message}",
        "run `asyncpg-iam ca-bundle` to download the RDS CA bundle, or pass --ca with the "
        "bundle that signed the server's certificate; connect by the name on the "
        "certificate (the RDS endpoint), not a CNAME or an IP",
    )


def _silent(host: str, port: int, timeout: float) -> Check:
    return Check(
        "tls",
        FAIL,
        f"{host}:{port} accepted TCP but gave no answer to the TLS request within "
        f"{timeout:g} s (--timeout)",
        "something that is not PostgreSQL listens there, or a proxy holds the "
        "connection: check --host and --port",
    )


async def check_clock(ctx: Context, checks: Mapping[str, Check]) -> Check:
    """Compare this host's clock with the Date of an AWS (STS) response."""
    answered = found(checks, "identity", AWSTime)
    if answered is None:
        return Check("clock", SKIP, "needs an STS response (the identity check)")
    skew = answered.skew()
    local = answered.local.isoformat(timespec="seconds")
    if abs(skew) > MAX_CLOCK_SKEW:
        direction = "ahead of" if skew > 0 else "behind"
        return Check(
            "clock",
            FAIL,
            f"this host's clock ({local}) is {abs(skew):.0f} s {direction} AWS's "
            f"({answered.aws.isoformat(timespec='seconds')}): tokens are valid 15 min from "
            "signing by this clock, so RDS sees them as expired or not yet valid",
            "sync the clock with NTP (timedatectl set-ntp true, chrony, or the Amazon Time "
            "Sync Service 169.254.169.123)",
        )
    return Check("clock", PASS, f"{skew:+.0f} s from AWS's Date header (within ±60 s)")


async def check_token(ctx: Context, checks: Mapping[str, Check]) -> Check:
    """Sign a token (never shown)."""
    credentials = found(checks, "credentials", Credentials)
    if ctx.provider is None or ctx.target is None or credentials is None:
        need = "credentials" if credentials is None else "a region"
        return Check("token", SKIP, f"needs {need}")
    target = ctx.target
    token = await ctx.provider.token(target)
    key = mask_access_key(credentials.access_key)
    signed = f"({len(token)} characters, valid 15 min; not shown)"
    if target.service == "dsql":
        action = "DbConnectAdmin" if target.admin else "DbConnect"
        return Check(
            "token",
            PASS,
            f"signed an Aurora DSQL {action} token for {target.user}@{target.signing_host} "
            f"in {target.region} with {key} {signed}",
        )
    return Check(
        "token",
        PASS,
        f"signed for {target.user}@{target.signing_host}:{target.signing_port} in "
        f"{target.region} with {key} {signed}",
    )


async def check_login(ctx: Context, checks: Mapping[str, Check]) -> Check:
    """Log in with a token over verified TLS, as the pool does; explain a refusal."""
    token_ok, tls_ok = passed(checks, "token"), passed(checks, "tls")
    if not token_ok or not tls_ok or ctx.connector is None:
        need = "a token" if not token_ok else "verified TLS (a token is never sent without)"
        return Check("login", SKIP, f"needs {need}")
    target, database = ctx.connector.targets[0], ctx.connector.plan.database
    try:
        connection, _started = await ctx.connector.open(timeout=ctx.timeout)
    except IAMAuthenticationError as exc:
        hints = _diagnose(exc, found(checks, "identity", AWSTime))
        return Check(
            "login",
            FAIL,
            f"{exc.__class__.__name__}: {exc.context.server_message}",
            " | ".join(f"({i}) {hint}" for i, hint in enumerate(hints, 1)),
        )
    except asyncpg.InvalidCatalogNameError as exc:
        return Check(
            "login",
            FAIL,
            f"the login was accepted but {exc}",
            "pass --dbname with an existing database",
        )
    except (OSError, asyncio.TimeoutError, asyncpg.PostgresError, ssl.SSLError) as exc:
        return Check("login", FAIL, f"{type(exc).__name__}: {exc}")
    detail = f"logged in as {target.user} to database {database} with an IAM token over TLS"
    return Check("login", PASS, detail, found=connection)


def _diagnose(exc: IAMAuthenticationError, answered: AWSTime | None) -> list[str]:
    """Rank the causes as the pool does, with the skew measured against STS's Date."""
    context = exc.context
    if answered is not None:
        context = dataclasses.replace(context, clock_skew=answered.skew())
    return [in_cli_words(hint) for hint in diagnose_auth_failure(context)]


async def check_select(ctx: Context, checks: Mapping[str, Check]) -> Check:
    """Run SELECT 1 on the connection."""
    connection = found(checks, "login", asyncpg.Connection)
    if connection is None:
        return Check("select", SKIP, "needs a login")
    value = await asyncio.wait_for(connection.fetchval("SELECT 1"), ctx.timeout)
    if value != 1:
        return Check("select", FAIL, f"SELECT 1 returned {value!r}")
    # As the server reports it ("15.18 (Debian ...)"): asyncpg's ServerVersion reads
    # 15.18 as 15.0.18.
    reported = str(connection.get_settings().server_version).split()[0]
    return Check("select", PASS, f"SELECT 1 returned 1 (PostgreSQL {reported})")


#: A check: reads the context and the checks before it (by name), returns its outcome.
CheckFunction = Callable[[Context, Mapping[str, Check]], Awaitable[Check]]

#: The checks in the order they run and print.
CHECKS: tuple[tuple[str, CheckFunction], ...] = (
    ("proxy", check_proxy),
    ("credentials", check_credentials),
    ("identity", check_identity),
    ("region", check_region),
    ("dns", check_dns),
    ("tcp", check_tcp),
    ("tls", check_tls),
    ("clock", check_clock),
    ("token", check_token),
    ("login", check_login),
    ("select", check_select),
)


async def run_checks(ctx: Context) -> list[Check]:
    """Run every check in order, each seeing the ones before it; return them."""
    done: dict[str, Check] = {}
    try:
        for name, check in CHECKS:
            try:
                outcome = await check(ctx, MappingProxyType(done))
            except Exception as exc:  # a check must report, never crash the doctor
                outcome = Check(name, FAIL, f"unexpected {type(exc).__name__}: {exc}")
            done[name] = outcome
    finally:
        await ctx.aclose(done)
    return list(done.values())


def dns_verdict(host: str, addresses: list[str], canonical: str, signing_host: str | None) -> Check:
    """Judge a resolved host: behind a CNAME, tokens must be signed for the RDS name."""
    canonical = canonical.rstrip(".")
    cname = canonical if canonical and canonical.lower() != host.lower().rstrip(".") else ""
    resolved = f"{host} -> {', '.join(addresses)}" + (f" (CNAME for {cname})" if cname else "")
    signing = signing_host or host
    cname_region = region_from_host(cname) if cname else None
    if region_from_host(signing) is not None:
        if cname_region is not None and cname.lower() != signing.lower():
            return Check(
                "dns",
                FAIL,
                f"{resolved}, but tokens are signed for {signing}",
                f"sign for the real RDS name: --signing-host {cname}",
            )
        return Check("dns", PASS, f"{resolved}; tokens are signed for {signing}")
    if cname_region is not None:
        return Check(
            "dns",
            FAIL,
            f"{resolved}: {host} is an alias, and RDS refuses tokens signed for it",
            f"sign for the real RDS name: --signing-host {cname} (IAMAuth(signing_host={cname!r}))",
        )
    given = "--signing-host" if signing_host else "the host (no --signing-host)"
    return Check(
        "dns",
        FAIL,
        f"{resolved}; tokens would be signed for {signing!r} ({given}), which is not an RDS "
        "endpoint name: RDS checks the token against its own name and refuses it",
        "pass --signing-host <name>.<id>.<region>.rds.amazonaws.com (and --signing-port), "
        "the RDS endpoint behind this CNAME, tunnel or address",
    )


def _describe_identity(arn: str) -> str:
    resource = arn.split(":", 5)[-1]
    kind, _, rest = resource.partition("/")
    if kind == "assumed-role":
        role = rest.split("/")[0]
        return (
            f"an assumed role ({role}): allow rds-db:connect in a policy of the role {role}, "
            "not of whoever assumed it"
        )
    if kind == "user":
        return (
            f"an IAM user ({rest}): allow rds-db:connect in a policy attached to the user or "
            "its group (a role you assume later has its own policies)"
        )
    if kind == "federated-user":
        return "a federated user: rds-db:connect must be allowed by the federation policy"
    if resource == "root":
        return "the account root user: works, but use an IAM role or user for databases"
    return "allow rds-db:connect for this identity"


def _print_text(checks: list[Check], ok: bool) -> None:
    shown: set[str] = set()
    for check in checks:
        if check.fix in shown:  # the same fix once: later checks refer to it
            check = dataclasses.replace(check, fix="the same as above")
        elif check.fix:
            shown.add(check.fix)
        sys.stdout.write(check.line() + "\n")
    failed = sum(check.status == FAIL for check in checks)
    skipped = sum(check.status == SKIP for check in checks)
    summary = (
        "all checks passed" if ok else f"{failed} failed, {skipped} skipped of {len(checks)} checks"
    )
    sys.stdout.write(f"doctor: {summary}\n")


def run(args: argparse.Namespace) -> int:
    """Run ``asyncpg-iam doctor``; exit status 0 only when every check passes."""
    checks = asyncio.run(run_checks(Context.from_args(args)))
    ok = all(check.status == PASS for check in checks)
    if args.json:
        document = {"ok": ok, "checks": [check.as_dict() for check in checks]}
        sys.stdout.write(json.dumps(document, indent=2) + "\n")
    else:
        _print_text(checks, ok)
    return EXIT_OK if ok else EXIT_FAILED
