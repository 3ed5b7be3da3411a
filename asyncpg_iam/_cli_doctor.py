"""``asyncpg-iam doctor``: check every step of an IAM login, in order, and say how to fix it.

Each check is one line: a mark, the check's name, what was found and, when it fails, the fix.
The checks reuse the pool's own pieces (the credential cache, the token provider, the TLS
defaults and the diagnosis of refused logins), so what the doctor finds is what the pool does.
Nothing secret is printed: access keys are masked and the token is never shown.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import email.utils
import json
import socket
import ssl
import struct
import sys
import time
import urllib.parse
from typing import Any

from ._auth import IAMAuth, SigningTarget, TokenProvider, credential_cache_for
from ._aws_env import IMDS_ADDRESS, MAX_CLOCK_SKEW, credential_endpoints, env, proxy_problem
from ._clock import OffsetClock
from ._connect import Connector, ConnectPlan
from ._credentials import CredentialCache, configured_region
from ._errors import (
    ConfigurationError,
    IAMAuthenticationError,
    IAMError,
    diagnose_auth_failure,
    in_cli_words,
)
from ._signing import Credentials, mask_access_key, region_from_host

__all__ = ["Check", "Doctor", "dns_verdict", "run_doctor"]

PASS, FAIL, SKIP = "pass", "fail", "skip"
_MARKS = {PASS: "[ OK ]", FAIL: "[FAIL]", SKIP: "[SKIP]"}
_SSL_REQUEST = struct.pack("!ii", 8, 80877103)


@dataclasses.dataclass(slots=True)
class Check:
    """The outcome of one check: `status` is ``pass``, ``fail`` or ``skip``."""

    name: str
    status: str
    detail: str
    fix: str | None = None

    def line(self) -> str:
        """Return the check as one line of text."""
        text = f"{_MARKS[self.status]} {self.name:<11} {self.detail}"
        if self.fix:
            text += f" -> fix: {self.fix}"
        return text


def _sts_host(region: str) -> str:
    url = env("AWS_ENDPOINT_URL_STS") or env("AWS_ENDPOINT_URL")
    if url:
        return urllib.parse.urlsplit(url).hostname or url
    suffix = "amazonaws.com.cn" if region.startswith("cn-") else "amazonaws.com"
    return f"sts.{region}.{suffix}"


def _first_sentence(text: str) -> str:
    return " ".join(text.split())


class Doctor:
    """Run the checks for one database endpoint and user."""

    def __init__(self, args: argparse.Namespace, auth: IAMAuth, plan: ConnectPlan | str) -> None:
        self.args = args
        self.auth = auth
        # The pool's own connect plan (TLS decided as a pool would), or why it was refused.
        self.plan = plan
        self.connector: Connector | None = None
        self.timeout: float = args.timeout
        self.clock = OffsetClock(args.clock_offset)
        self.checks: list[Check] = []
        self.cache: CredentialCache | None = None
        self.provider: TokenProvider | None = None
        self.target: SigningTarget | None = None
        self.region_error: str | None = None
        self.credentials: Credentials | None = None
        self.aws_date: dt.datetime | None = None
        self.aws_local: dt.datetime | None = None
        self.dns_ok = False
        self.tcp_ok = False
        self.tls_ok = False
        self.token_ok = False
        self.connection: Any = None

    # -- running ---------------------------------------------------------------------------

    async def run(self) -> list[Check]:
        """Run every check in order; return them."""
        self._setup()
        steps = (
            ("proxy", self.check_proxy),
            ("credentials", self.check_credentials),
            ("identity", self.check_identity),
            ("region", self.check_region),
            ("dns", self.check_dns),
            ("tcp", self.check_tcp),
            ("tls", self.check_tls),
            ("clock", self.check_clock),
            ("token", self.check_token),
            ("login", self.check_login),
            ("select", self.check_select),
        )
        try:
            for name, step in steps:
                try:
                    check = await step()
                except Exception as exc:  # a check must report, never crash the doctor
                    check = Check(name, FAIL, f"unexpected {type(exc).__name__}: {exc}")
                self.checks.append(check)
        finally:
            if self.connection is not None:
                await self.connection.close(timeout=self.timeout)
            if self.provider is not None:
                await self.provider.aclose()
            elif self.cache is not None:
                await self.cache.aclose()
        return self.checks

    def _setup(self) -> None:
        auth = self.auth
        try:
            self.cache = credential_cache_for(auth, clock=self.clock, fetch_timeout=self.timeout)
        except ConfigurationError as exc:
            self.setup_error = str(exc)
            return
        self.provider = TokenProvider(auth, clock=self.clock, credentials=self.cache)
        try:
            self.target = self.provider.target(self.args.host, self.args.port, self.args.user)
        except ConfigurationError as exc:
            self.region_error = str(exc)
            return
        if isinstance(self.plan, ConnectPlan):
            self.connector = Connector(
                self.plan, provider=self.provider, kind="doctor", clock=self.clock
            )

    @property
    def _region(self) -> str:
        if self.target is not None:
            return self.target.region
        try:
            return configured_region(profile=self.auth.profile) or "us-east-1"
        except ConfigurationError:
            return "us-east-1"

    # -- the checks ------------------------------------------------------------------------

    async def check_proxy(self) -> Check:
        """HTTP(S)_PROXY set while NO_PROXY lets metadata or STS requests go to the proxy."""
        # Instance metadata is always listed: a role attached later, or another tool on this
        # host, would go through the proxy too.
        needed = [(IMDS_ADDRESS, "instance metadata")]
        needed += [e for e in credential_endpoints() if e[0] != IMDS_ADDRESS]
        needed.append((_sts_host(self._region), "STS"))
        problem = proxy_problem(needed)
        if problem is not None:
            return Check("proxy", FAIL, problem.describe(), problem.fix)
        proxies = [name for name in ("HTTPS_PROXY", "HTTP_PROXY") if env(name)]
        if not proxies:
            return Check("proxy", PASS, "no HTTP(S)_PROXY set: AWS endpoints are reached directly")
        covered = ", ".join(host for host, _ in needed)
        return Check("proxy", PASS, f"{' and '.join(proxies)} set; NO_PROXY covers {covered}")

    async def check_credentials(self) -> Check:
        """Which credential source answered, and when its credentials expire."""
        if self.cache is None:
            return Check(
                "credentials",
                FAIL,
                getattr(self, "setup_error", "no credential source"),
                "fix the AWS options (--profile, --role-arn, ...)",
            )
        try:
            credentials = await self.cache.get()
        except IAMError as exc:
            message = _first_sentence(str(exc))
            lowered = message.lower()
            if "expired" in lowered:
                fix = (
                    "renew the credentials (`aws sso login`, new keys, a longer role session) "
                    "and check that the source refreshes them and this host's clock is right"
                )
            elif "no aws credentials" in lowered:
                fix = (
                    "set AWS_PROFILE or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, run `aws sso "
                    "login`, or attach an IAM role; behind a proxy add 169.254.169.254 to NO_PROXY"
                )
            elif "assumerole" in lowered:
                fix = "allow sts:AssumeRole on the role and trust the caller in its trust policy"
            else:
                fix = "check the credential source named above (network, NO_PROXY, its config)"
            return Check("credentials", FAIL, message, fix)
        self.credentials = credentials
        key = mask_access_key(credentials.access_key)
        if credentials.expiry is None:
            when = "long-term keys (no expiry)"
        else:
            left = credentials.expiry - self.clock.now()
            when = (
                f"expire {credentials.expiry.isoformat(timespec='seconds')} "
                f"(in {left.total_seconds() / 60:.0f} min)"
            )
        return Check("credentials", PASS, f"from {self.cache.source}: access key {key}, {when}")

    async def check_identity(self) -> Check:
        """Ask STS who the credentials belong to; note the Date of the response for the clock."""
        if self.credentials is None:
            return Check("identity", SKIP, "needs credentials")
        from aiobotocore.config import AioConfig
        from aiobotocore.session import AioSession
        from botocore.exceptions import BotoCoreError, ClientError

        config = AioConfig(
            connect_timeout=self.timeout,
            read_timeout=self.timeout,
            retries={"total_max_attempts": 1},
        )
        creds = self.credentials
        session = AioSession(profile=self.auth.profile)
        try:
            async with session.create_client(
                "sts",
                region_name=self._region,
                aws_access_key_id=creds.access_key,
                aws_secret_access_key=creds.secret_key,
                aws_session_token=creds.token,
                config=config,
            ) as client:
                before = self.clock.now()
                response = await client.get_caller_identity()
                after = self.clock.now()
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
                f"could not reach STS at {_sts_host(self._region)}: {exc}",
                "allow HTTPS to the STS endpoint (firewall, VPC endpoint) and add it to "
                "NO_PROXY when a proxy is set",
            )
        date = response.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
        if date:
            self.aws_date = email.utils.parsedate_to_datetime(date)
            self.aws_local = before + (after - before) / 2
        arn = str(response.get("Arn", "?"))
        return Check("identity", PASS, f"{arn}: {_describe_identity(arn)}")

    async def check_region(self) -> Check:
        """The region to sign for: given or inferred, and whether the host agrees."""
        if self.target is None:
            return Check(
                "region",
                FAIL,
                _first_sentence(self.region_error or "no region"),
                "pass --region (and --signing-host with the RDS endpoint name)",
            )
        target = self.target
        source = "--region" if target.region_source.startswith("IAMAuth") else target.region_source
        if target.endpoint_region is not None and target.endpoint_region != target.region:
            return Check(
                "region",
                FAIL,
                f"tokens would be signed for {target.region} (from {source}) but the endpoint "
                f"{target.signing_host} is in {target.endpoint_region}: RDS refuses them",
                f"drop --region or pass --region {target.endpoint_region}",
            )
        if target.endpoint_region is None:
            return Check(
                "region",
                PASS,
                f"{target.region} (from {source}); {target.signing_host} is not an RDS name, "
                "so the region cannot be checked against it",
            )
        return Check("region", PASS, f"{target.region} (from {source}), matches the endpoint")

    async def check_dns(self) -> Check:
        """Resolve the host; behind a CNAME, name the RDS endpoint to sign for."""
        host, port = self.args.host, self.args.port
        loop = asyncio.get_running_loop()
        try:
            infos = await asyncio.wait_for(
                loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_CANONNAME),
                self.timeout,
            )
        except (OSError, asyncio.TimeoutError) as exc:
            return Check(
                "dns",
                FAIL,
                f"cannot resolve {host}: {exc}",
                "check the endpoint name (aws rds describe-db-instances / describe-db-clusters) "
                "and this host's DNS (inside the VPC, or a public endpoint)",
            )
        addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
        canonical = next((info[3] for info in infos if info[3]), "")
        self.dns_ok = True
        return dns_verdict(host, addresses, canonical, self.auth.signing_host)

    async def check_tcp(self) -> Check:
        """Open a TCP connection to host:port."""
        if not self.dns_ok:
            return Check("tcp", SKIP, "needs an address (the dns check)")
        host, port = self.args.host, self.args.port
        started = time.monotonic()
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), self.timeout)
        except (OSError, asyncio.TimeoutError) as exc:
            what = (
                f"no answer within {self.timeout:g} s (--timeout)"
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
        self.tcp_ok = True
        elapsed = (time.monotonic() - started) * 1000
        address = peer[0] if isinstance(peer, tuple) else host
        return Check("tcp", PASS, f"connected to {address}:{port} in {elapsed:.0f} ms")

    async def check_tls(self) -> Check:
        """Ask for TLS as libpq does, then verify the certificate and the host name."""
        if not self.tcp_ok:
            return Check("tls", SKIP, "needs a TCP connection")
        host, port = self.args.host, self.args.port
        fix_ca = (
            "run `asyncpg-iam ca-bundle` to download the RDS CA bundle, or pass --ca with the "
            "bundle that signed the server's certificate; connect by the name on the "
            "certificate (the RDS endpoint), not a CNAME or an IP"
        )
        if not isinstance(self.plan, ConnectPlan):
            return Check("tls", FAIL, f"the pool would refuse these settings: {self.plan}")
        tls = self.plan.tls
        assert tls.context is not None  # an IAM plan always has one
        context, source = tls.context, tls.ca_source
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(host, port), self.timeout
            )
        except (OSError, asyncio.TimeoutError) as exc:
            return Check("tls", FAIL, f"cannot connect to {host}:{port}: {exc}")
        try:
            writer.write(_SSL_REQUEST)
            await writer.drain()
            answer = await asyncio.wait_for(reader.read(1), self.timeout)
            if answer != b"S":
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
            loop = asyncio.get_running_loop()
            transport = await asyncio.wait_for(
                loop.start_tls(
                    writer.transport,
                    writer.transport.get_protocol(),
                    context,
                    server_hostname=host,
                ),
                self.timeout,
            )
        except ssl.SSLCertVerificationError as exc:
            return Check(
                "tls",
                FAIL,
                f"certificate verification failed against {source}: {exc.verify_message}",
                fix_ca,
            )
        except asyncio.TimeoutError:
            return Check(
                "tls",
                FAIL,
                f"{host}:{port} accepted TCP but gave no answer to the TLS request within "
                f"{self.timeout:g} s (--timeout)",
                "something that is not PostgreSQL listens there, or a proxy holds the "
                "connection: check --host and --port",
            )
        except (OSError, ssl.SSLError, EOFError) as exc:
            return Check("tls", FAIL, f"TLS handshake with {host}:{port} failed: {exc!r}")
        finally:
            writer.transport.abort()
        assert transport is not None
        ssl_object = transport.get_extra_info("ssl_object")
        version = ssl_object.version() if ssl_object is not None else "TLS"
        transport.abort()
        if not tls.verified:
            return Check(
                "tls",
                FAIL,
                f"{version}, but the certificate was NOT verified (sslmode {tls.mode} from "
                f"{tls.mode_source}): anyone in the path could receive the token",
                "use sslmode verify-full (the default) or verify-ca",
            )
        self.tls_ok = True
        verified = "certificate verified" + (f" for {host}" if tls.mode == "verify-full" else "")
        return Check("tls", PASS, f"{version}, {verified} against {source} ({tls.mode})")

    def _measured_skew(self) -> float | None:
        """Return seconds this clock is ahead of AWS's, by the Date of the STS response."""
        if self.aws_date is None or self.aws_local is None:
            return None
        # The Date header is truncated to whole seconds: compare with the middle of its second,
        # and do not count what is left of the truncation as skew.
        skew = (self.aws_local - self.aws_date).total_seconds() - 0.5
        return 0.0 if abs(skew) < 1.0 else skew

    async def check_clock(self) -> Check:
        """Compare this host's clock with the Date of an AWS (STS) response."""
        if self.aws_date is None or self.aws_local is None:
            return Check("clock", SKIP, "needs an STS response (the identity check)")
        skew = self._measured_skew()
        assert skew is not None
        local = self.aws_local.isoformat(timespec="seconds")
        if abs(skew) > MAX_CLOCK_SKEW:
            direction = "ahead of" if skew > 0 else "behind"
            return Check(
                "clock",
                FAIL,
                f"this host's clock ({local}) is {abs(skew):.0f} s {direction} AWS's "
                f"({self.aws_date.isoformat(timespec='seconds')}): tokens are valid 15 min from "
                "signing by this clock, so RDS sees them as expired or not yet valid",
                "sync the clock with NTP (timedatectl set-ntp true, chrony, or the Amazon Time "
                "Sync Service 169.254.169.123)",
            )
        return Check("clock", PASS, f"{skew:+.0f} s from AWS's Date header (within ±60 s)")

    async def check_token(self) -> Check:
        """Sign a token (never shown)."""
        if self.provider is None or self.target is None or self.credentials is None:
            need = "credentials" if self.credentials is None else "a region"
            return Check("token", SKIP, f"needs {need}")
        target = self.target
        token = await self.provider.token(target)
        self.token_ok = True
        if target.service == "dsql":
            action = "DbConnectAdmin" if target.admin else "DbConnect"
            return Check(
                "token",
                PASS,
                f"signed an Aurora DSQL {action} token for {target.user}@{target.signing_host} "
                f"in {target.region} with {mask_access_key(self.credentials.access_key)} "
                f"({len(token)} characters, valid 15 min; not shown)",
            )
        return Check(
            "token",
            PASS,
            f"signed for {target.user}@{target.signing_host}:{target.signing_port} in "
            f"{target.region} with {mask_access_key(self.credentials.access_key)} "
            f"({len(token)} characters, valid 15 min; not shown)",
        )

    async def check_login(self) -> Check:
        """Log in with a token over verified TLS, as the pool does; explain a refusal."""
        if not self.token_ok or not self.tls_ok or self.connector is None:
            need = (
                "a token" if not self.token_ok else "verified TLS (a token is never sent without)"
            )
            return Check("login", SKIP, f"needs {need}")
        import asyncpg

        target, database = self.connector.targets[0], self.connector.plan.database
        try:
            self.connection, _started = await self.connector.open(timeout=self.timeout)
        except IAMAuthenticationError as exc:
            hints = self._diagnose(exc)
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
        return Check(
            "login",
            PASS,
            f"logged in as {target.user} to database {database} with an IAM token over TLS",
        )

    def _diagnose(self, exc: IAMAuthenticationError) -> list[str]:
        """Rank the causes as the pool does, with the skew measured against STS's Date."""
        skew = self._measured_skew()
        context = exc.context
        if skew is not None:
            context = dataclasses.replace(context, clock_skew=skew)
        return [in_cli_words(hint) for hint in diagnose_auth_failure(context)]

    async def check_select(self) -> Check:
        """Run SELECT 1 on the connection."""
        if self.connection is None:
            return Check("select", SKIP, "needs a login")
        value = await asyncio.wait_for(self.connection.fetchval("SELECT 1"), self.timeout)
        if value != 1:
            return Check("select", FAIL, f"SELECT 1 returned {value!r}")
        # As the server reports it ("15.18 (Debian ...)"): asyncpg's ServerVersion reads
        # 15.18 as 15.0.18.
        reported = str(self.connection.get_settings().server_version).split()[0]
        return Check("select", PASS, f"SELECT 1 returned 1 (PostgreSQL {reported})")


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


def run_doctor(args: argparse.Namespace) -> int:
    """Run ``asyncpg-iam doctor``; exit status 0 only when every check passes."""
    from .cli import iam_auth_from, plan_from

    auth = iam_auth_from(args)
    plan: ConnectPlan | str
    try:
        plan = plan_from(args, auth)
    except ConfigurationError as exc:
        plan = str(exc)  # reported by the TLS check; the checks before it still run
    checks = asyncio.run(Doctor(args, auth, plan).run())
    ok = all(check.status == PASS for check in checks)
    if args.json:
        document = {"ok": ok, "checks": [dataclasses.asdict(check) for check in checks]}
        sys.stdout.write(json.dumps(document, indent=2) + "\n")
    else:
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
            "all checks passed"
            if ok
            else f"{failed} failed, {skipped} skipped of {len(checks)} checks"
        )
        sys.stdout.write(f"doctor: {summary}\n")
    return 0 if ok else 1
