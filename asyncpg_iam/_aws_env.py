"""Facts about the AWS environment, in one place: proxies, NO_PROXY, the metadata addresses,
the region the environment names, the clock skew that matters and how AWS's answers tell the
time.

The credential cache's error messages and the doctor's proxy check both ask `proxy_problem`,
so they can never disagree about whether a proxy captures a credential request.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import urllib.parse
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "CONTAINER_ADDRESS",
    "IMDS_ADDRESS",
    "MAX_CLOCK_SKEW",
    "REGION_VARIABLES",
    "FoundRegion",
    "ProxyProblem",
    "bypasses_proxy",
    "env",
    "proxy_problem",
    "region_from_environment",
    "response_date",
]

#: A clock further off AWS's than this (seconds) shortens or voids the 15 minutes a token is
#: valid: the doctor fails its clock check, and a refused login names clock skew first.
MAX_CLOCK_SKEW = 60.0
#: The instance metadata service (EC2 roles, IMDS credentials).
IMDS_ADDRESS = "169.254.169.254"
#: The ECS/EKS container credentials endpoint.
CONTAINER_ADDRESS = "169.254.170.2"
_PROXY_VARIABLES = ("HTTPS_PROXY", "HTTP_PROXY")
#: The variables that name a region, in the order the AWS CLI reads them (then the profile).
REGION_VARIABLES = ("AWS_REGION", "AWS_DEFAULT_REGION")


class FoundRegion:
    """An AWS region and where it was found, in the words a message names it with.

    A plain slotted class (as `_tls.TLSSetting` says why), never changed once made.
    """

    __slots__ = ("name", "source")

    def __init__(self, name: str, source: str) -> None:
        self.name = name
        self.source = source


def region_from_environment() -> FoundRegion | None:
    """Return the region the first set of `REGION_VARIABLES` names, or None when none is set."""
    for variable in REGION_VARIABLES:
        value = os.environ.get(variable)
        if value:
            return FoundRegion(value, variable)
    return None


def response_date(response: Mapping[str, Any]) -> dt.datetime | None:
    """Return the Date header of an aiobotocore response (aware, UTC if unzoned), if valid.

    AWS's clock as it answered: the evidence of clock skew for the doctor and the diagnosis.
    """
    raw = response.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
    if not raw:
        return None
    try:
        import email.utils  # when asked, not at import: ~9 ms of a cold start

        date = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return None
    return date if date.tzinfo is not None else date.replace(tzinfo=dt.timezone.utc)


def env(name: str) -> str:
    """Return an environment variable, also in lower case as proxies are often set ("" if unset)."""
    return os.environ.get(name) or os.environ.get(name.lower()) or ""


def _no_proxy() -> list[str]:
    return [entry.strip() for entry in env("NO_PROXY").split(",") if entry.strip()]


def bypasses_proxy(host: str, no_proxy: Sequence[str]) -> bool:
    """Tell whether NO_PROXY entries (names, .suffixes, IPs, CIDRs, ``*``) cover `host`."""
    host = host.lower().strip("[]")
    for entry in no_proxy:
        entry = entry.lower()
        if entry == "*":
            return True
        if "/" in entry:
            try:
                if ipaddress.ip_address(host) in ipaddress.ip_network(entry, strict=False):
                    return True
            except ValueError:
                pass
            continue
        entry = entry.split(":")[0] if entry.count(":") == 1 else entry
        bare = entry.lstrip(".").lstrip("*.")
        if host == bare or host.endswith("." + bare):
            return True
    return False


def credential_endpoints() -> list[tuple[str, str]]:
    """Return the credential endpoints this environment may call, with what each serves."""
    endpoints: list[tuple[str, str]] = []
    if env("AWS_EC2_METADATA_DISABLED").lower() != "true":
        endpoints.append((IMDS_ADDRESS, "instance metadata"))
    if env("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI"):
        endpoints.append((CONTAINER_ADDRESS, "container credentials"))
    full_uri = env("AWS_CONTAINER_CREDENTIALS_FULL_URI")
    if full_uri:
        endpoints.append(
            (urllib.parse.urlsplit(full_uri).hostname or full_uri, "container credentials")
        )
    return endpoints


class ProxyProblem:
    """An HTTP(S) proxy that requests to some AWS endpoints would go through.

    `missing` holds (host, what it serves) of each endpoint NO_PROXY does not cover, `fix` the
    NO_PROXY to export, keeping the entries already there. A plain slotted class (as
    `_tls.TLSSetting` says why), never changed once made.
    """

    __slots__ = ("fix", "missing", "proxies")

    def __init__(
        self, proxies: tuple[str, ...], missing: tuple[tuple[str, str], ...], fix: str
    ) -> None:
        self.proxies = proxies
        self.missing = missing
        self.fix = fix

    def describe(self) -> str:
        """Say what goes wrong, in one sentence."""
        listed = ", ".join(f"{host} ({what})" for host, what in self.missing)
        return (
            f"{' and '.join(self.proxies)} set but NO_PROXY does not include {listed}: those "
            "requests go to the proxy, which cannot reach link-local metadata addresses, and "
            "credential look-ups fail with 'credentials not found' or time out"
        )


def proxy_problem(endpoints: Sequence[tuple[str, str]]) -> ProxyProblem | None:
    """Return the proxy problem for `endpoints` ((host, what) pairs), or None when there is none."""
    proxies = tuple(name for name in _PROXY_VARIABLES if env(name))
    if not proxies:
        return None
    no_proxy = _no_proxy()
    missing = tuple((host, what) for host, what in endpoints if not bypasses_proxy(host, no_proxy))
    if not missing:
        return None
    candidates = (IMDS_ADDRESS, CONTAINER_ADDRESS, *(host for host, _ in missing))
    wanted = [*no_proxy, *(host for host in candidates if host not in no_proxy)]
    return ProxyProblem(proxies, missing, f"export NO_PROXY={','.join(dict.fromkeys(wanted))}")


def proxy_hint(endpoints: Sequence[tuple[str, str]] | None = None) -> str:
    """Return ". <problem>; <fix>" for a failed credential request, or "" when no proxy is in
    the way. `endpoints` default to the credential endpoints this environment may call."""
    problem = proxy_problem(credential_endpoints() if endpoints is None else endpoints)
    if problem is None:
        return ""
    return f". {problem.describe()}; fix: {problem.fix}"
