"""The credential cache: frozen AWS credentials, refreshed ahead of expiry, one fetch at a time.

Sources are static `Credentials`, the aiobotocore default chain, a named profile, or an
explicitly assumed role (AssumeRole through aiobotocore's STS client, with source credentials
from the chain or a profile).

aiobotocore's own refreshable credentials are not used for the steady state: credentials issued
with less than ten minutes to live (an assumed role with a 900 s duration, short container
credentials) make them refetch on every call. The cache fetches frozen credentials itself and
applies its own policy, a pure function of its clock:

- a read is served from memory while the credentials have more than a margin left;
- a refresh starts in the background once less than min(`refresh_ahead`, 45 % of the issued
  lifetime) is left, never sooner than `min_refresh_interval` after the previous fetch; readers
  keep the old credentials meanwhile; only one fetch is ever in flight and concurrent readers
  with nothing valid share it;
- a failed refresh while the old credentials are valid logs a WARNING and is retried with
  exponential backoff; with nothing valid, `CredentialsError` says which source failed and what
  to do.
"""

from __future__ import annotations

import asyncio
import collections
import datetime as dt
import logging
import math
import os
import re
from collections.abc import Mapping
from typing import Any, Protocol

from ._aws_env import proxy_hint, region_from_environment, response_date
from ._clock import SYSTEM_CLOCK, Clock
from ._errors import ConfigurationError, CredentialsError
from ._options import positive_seconds, seconds
from ._signing import Credentials, mask_access_key

__all__ = ["AssumeRole", "CredentialCache", "build_cache", "configured_region"]

logger = logging.getLogger("asyncpg_iam.credentials")

#: Refresh once less than this fraction of the issued lifetime is left (or refresh_ahead).
_REFRESH_FRACTION = 0.45

#: botocore's provider METHOD names, as a person would say them.
_METHODS = {
    "env": "environment",
    "explicit": "explicit keys",
    "shared-credentials-file": "shared credentials file",
    "config-file": "config file",
    "custom-process": "credential_process",
    "assume-role": "assume-role profile",
    "assume-role-with-web-identity": "web identity",
    "sso": "SSO",
    "container-role": "container",
    "iam-role": "instance metadata",
    "boto-config": "boto config",
}


class _Source(Protocol):
    @property
    def description(self) -> str: ...

    async def fetch(self) -> Credentials: ...

    def offer_region(self, region: str, source: str) -> None: ...

    async def aclose(self) -> None: ...


class CredentialCache:
    """Serve frozen AWS credentials from memory and keep them fresh.

    Create one with `credential_cache_for`. `fetches` counts every fetch from the source,
    successful or not; `fetch_failures` those that failed.
    """

    def __init__(
        self,
        source: _Source,
        *,
        clock: Clock = SYSTEM_CLOCK,
        refresh_ahead: float = 900.0,
        expiry_margin: float = 60.0,
        min_refresh_interval: float = 5.0,
        retry_delay: float = 1.0,
        max_retry_delay: float = 60.0,
        fetch_timeout: float = 30.0,
    ) -> None:
        for name, value in (
            ("refresh_ahead", refresh_ahead),
            ("expiry_margin", expiry_margin),
            ("min_refresh_interval", min_refresh_interval),
            ("retry_delay", retry_delay),
            ("max_retry_delay", max_retry_delay),
        ):
            seconds(name, value)
        positive_seconds("fetch_timeout", fetch_timeout)
        self._source = source
        self._clock = clock
        self._refresh_ahead = refresh_ahead
        self._expiry_margin = expiry_margin
        self._min_refresh_interval = min_refresh_interval
        self._retry_delay = retry_delay
        self._max_retry_delay = max_retry_delay
        self._fetch_timeout = fetch_timeout
        self.fetches = 0
        self.fetch_failures = 0
        """Fetches that failed (the cache served older credentials, or raised)."""
        self.clock_skew: float | None = None
        """Seconds the clock is ahead of AWS's by the Date of the last AWS response (if any)."""
        self._current: Credentials | None = None
        self._margin = expiry_margin
        self._refresh_due = -math.inf  # monotonic time of the next background refresh
        self._retry_at = -math.inf  # after a failure: no fetch for waiting readers before this
        self._failures = 0
        self._last_error: CredentialsError | None = None
        self._lifetimes: collections.deque[float] = collections.deque(maxlen=3)
        self._task: asyncio.Task[Credentials] | None = None
        self._closed = False

    @property
    def source(self) -> str:
        """Where the credentials come from, for messages; never a secret."""
        return self._source.description

    @property
    def closed(self) -> bool:
        """Whether `aclose()` was called."""
        return self._closed

    def peek(self) -> Credentials | None:
        """Return the last credentials fetched successfully, without I/O (even if expired)."""
        return self._current

    async def get(self) -> Credentials:
        """Return credentials valid for at least a safety margin (a minute by default).

        Waits only when nothing valid is cached; raises `CredentialsError` when none can be had.
        """
        current = self.fresh(self._clock.now())
        if current is not None:
            return current
        return await self._get_slow()

    def fresh(self, now: dt.datetime) -> Credentials | None:
        """Return the cached credentials if they are valid for the safety margin at `now` (this
        clock's time), else None (then await `get()`). Starts a background refresh when due.

        The synchronous half of `get()`, for a caller that reads the clock anyway.
        """
        current = self._current
        if current is None:
            return None
        expiry = current.expiry
        if expiry is None:
            return current
        if (expiry - now).total_seconds() <= self._margin:
            return None
        if self._task is None and not self._closed and self._clock.monotonic() >= self._refresh_due:
            self._start_fetch()
        return current

    def offer_region(self, region: str, source: str) -> None:
        """Give a source that calls AWS (STS) a region to use if it has none of its own.

        `source` says where `region` came from, for messages. Sources without a region of their
        own to choose (static keys, the chain) ignore it.
        """
        self._source.offer_region(region, source)

    async def aclose(self) -> None:
        """Cancel a refresh in flight and close the source's clients."""
        self._closed = True
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await self._source.aclose()

    def __repr__(self) -> str:
        current = "None" if self._current is None else repr(self._current)
        return f"<CredentialCache source={self.source!r} current={current} fetches={self.fetches}>"

    # -- internals -------------------------------------------------------------------------

    async def _get_slow(self) -> Credentials:
        if self._closed:
            raise CredentialsError(
                f"the credential cache for {self.source} is closed", source=self.source
            )
        while True:
            current = self._current
            left = None if current is None else current.expires_in(self._clock.now())
            if current is not None and (left is None or left > self._margin):
                return current
            task = self._task
            if task is None:
                mono = self._clock.monotonic()
                if left is not None and left > 0 and mono < self._refresh_due:
                    # Within the margin but not expired, and a fetch was just made or just
                    # failed: serve these rather than fetch at the caller's pace.
                    return current  # type: ignore[return-value]
                if mono < self._retry_at and self._last_error is not None:
                    raise self._unavailable(self._last_error)
                task = self._start_fetch()
            try:
                return await asyncio.shield(task)
            except asyncio.CancelledError:
                if not (self.closed and task.cancelled()) or _cancelling():
                    raise
                # The fetch was cancelled by aclose(), not this caller: say so, do not make
                # it look as if the caller's own task had been cancelled.
                raise CredentialsError(
                    f"the credential cache for {self.source} was closed while waiting for "
                    "credentials (the pool or engine is closing)",
                    source=self.source,
                ) from None

    def _start_fetch(self) -> asyncio.Task[Credentials]:
        task = asyncio.get_running_loop().create_task(self._fetch())
        self.fetches += 1
        self._task = task
        task.add_done_callback(self._fetch_done)
        return task

    def _fetch_done(self, task: asyncio.Task[Credentials]) -> None:
        if self._task is task:
            self._task = None
        if not task.cancelled():
            task.exception()  # retrieved: a background refresh has no awaiter

    async def _fetch(self) -> Credentials:
        source = self.source
        error: CredentialsError
        try:
            credentials = await self._fetch_with_timeout()
        except CredentialsError as exc:
            error = exc
        except Exception as exc:
            error = CredentialsError(
                f"fetching AWS credentials from {source} failed: {type(exc).__name__}: {exc}",
                source=source,
            )
            error.__cause__ = exc
        else:
            now = self._clock.now()
            server_date = getattr(self._source, "server_date", None)
            if server_date is not None:
                # The Date header has whole seconds: compare with the middle of its second.
                self.clock_skew = (now - server_date).total_seconds() - 0.5
            left = credentials.expires_in(now)
            if left is None or left > 0:
                self._accept(credentials, left)
                return credentials
            error = CredentialsError(_expired_message(self.source, credentials, now), source=source)
        return self._fetch_failed(error)

    async def _fetch_with_timeout(self) -> Credentials:
        fetch = asyncio.ensure_future(self._source.fetch())
        timer = asyncio.ensure_future(self._clock.sleep(self._fetch_timeout))
        try:
            await asyncio.wait({fetch, timer}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            timer.cancel()
            if not fetch.done():
                fetch.cancel()
                await asyncio.gather(fetch, return_exceptions=True)
        if fetch.cancelled():
            raise CredentialsError(
                f"fetching AWS credentials from {self.source} timed out after "
                f"{self._fetch_timeout:g} s; check that the credential endpoint is reachable "
                "(proxies, firewalls, NO_PROXY)" + proxy_hint(),
                source=self.source,
            )
        return fetch.result()

    def _accept(self, credentials: Credentials, left: float | None) -> None:
        mono = self._clock.monotonic()
        previous = self._current
        self._current = credentials
        self._failures = 0
        self._last_error = None
        self._retry_at = -math.inf
        if left is None:
            self._refresh_due = math.inf
            self._margin = self._expiry_margin
        else:
            self._lifetimes.append(left)
            lifetime = max(self._lifetimes)
            # Sources make new credentials available when about half the lifetime is gone:
            # asking a little after that gets the new ones, not the old ones a second time.
            ahead = min(self._refresh_ahead, lifetime * _REFRESH_FRACTION)
            self._margin = min(self._expiry_margin, lifetime / 4)
            wait = left - ahead
            if previous is not None and previous.access_key == credentials.access_key:
                # The source has not rotated yet: ask again halfway to the margin.
                wait = max(wait, (left - self._margin) / 2)
            self._refresh_due = mono + max(wait, self._min_refresh_interval)
        if previous is None or previous.access_key != credentials.access_key:
            logger.debug(
                "fetched AWS credentials %s from %s (expires in %s s)",
                mask_access_key(credentials.access_key),
                self.source,
                "never" if left is None else f"{left:.0f}",
            )

    def _fetch_failed(self, error: CredentialsError) -> Credentials:
        self._failures += 1
        self.fetch_failures += 1
        delay = min(self._retry_delay * 2 ** (self._failures - 1), self._max_retry_delay)
        mono = self._clock.monotonic()
        self._refresh_due = mono + max(delay, self._min_refresh_interval)
        self._retry_at = mono + delay
        self._last_error = error
        current = self._current
        left = None if current is None else current.expires_in(self._clock.now())
        if current is not None and (left is None or left > 0):
            logger.warning(
                "refreshing AWS credentials from %s failed; still serving %s (%s s left), "
                "retrying in %.0f s: %s",
                self.source,
                mask_access_key(current.access_key),
                "unlimited" if left is None else f"{left:.0f}",
                delay,
                error,
            )
            return current
        raise self._unavailable(error)

    def _unavailable(self, error: CredentialsError) -> CredentialsError:
        current = self._current
        if current is None or current.expiry is None:
            fresh = CredentialsError(str(error), source=error.source)
        else:
            fresh = CredentialsError(
                f"{_expired_message(self.source, current, self._clock.now())} Refreshing them "
                f"failed: {error}",
                source=error.source,
            )
        fresh.__cause__ = error.__cause__ or error
        return fresh


def _cancelling() -> bool:
    """Tell whether the running task itself has been asked to cancel (Python 3.11+)."""
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)
    return bool(cancelling()) if cancelling is not None else False


def _expired_message(source: str, credentials: Credentials, now: dt.datetime) -> str:
    expiry = credentials.expiry
    assert expiry is not None
    ago = (now - expiry).total_seconds()
    return (
        f"the AWS credentials from {source} (access key {mask_access_key(credentials.access_key)})"
        f" expired at {expiry.isoformat()}, {ago:.0f} s ago. Renew them (`aws sso login` for "
        "SSO, new keys for static ones, check the role's session duration) and check that this "
        "host's clock is right."
    )


def _no_credentials_message(description: str, profile: str | None) -> str:
    if profile is not None:
        where = (
            f"no AWS credentials found for profile {profile!r}: give it aws_access_key_id and "
            "aws_secret_access_key, role_arn with a source_profile or credential_source, "
            "sso_session, or credential_process"
        )
    else:
        where = (
            "no AWS credentials found by the default chain (it looked at AWS_ACCESS_KEY_ID, "
            "AWS_PROFILE, the shared credentials and config files, SSO, web identity, the "
            "container credentials endpoint and instance metadata); set AWS_PROFILE or "
            "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, run `aws sso login`, or run with an IAM "
            "role attached"
        )
    return where + proxy_hint()


async def _freeze(loaded: Any) -> Credentials:
    """Take frozen credentials from an aiobotocore credentials object without refetching.

    Refreshable credentials would refresh inside aiobotocore's own windows (and, when issued
    with less than ten minutes left, on every call); zeroing the windows on this one object
    makes it fetch only when it has nothing (deferred sources: SSO, assume-role profiles, web
    identity) or when what it has is expired. tests/test_credentials.py pins these internals.
    """
    refreshable = hasattr(loaded, "_expiry_time")
    if refreshable:
        loaded._advisory_refresh_timeout = 0
        loaded._mandatory_refresh_timeout = 0
    # Credentials a provider fetched on load are used as they came, even if already expired
    # (aiobotocore would fetch again, then raise a RuntimeError).
    frozen = getattr(loaded, "_frozen_credentials", None) if refreshable else None
    if frozen is None:
        frozen = await loaded.get_frozen_credentials()
    expiry = getattr(loaded, "_expiry_time", None) if refreshable else None
    if isinstance(expiry, dt.datetime):
        expiry = (
            expiry.replace(tzinfo=dt.timezone.utc) if expiry.tzinfo is None else expiry
        ).astimezone(dt.timezone.utc)
    else:
        expiry = None
    return Credentials(frozen.access_key, frozen.secret_key, frozen.token or None, expiry)


class _StaticSource:
    description = "static"

    def __init__(self, credentials: Credentials) -> None:
        self._credentials = credentials

    async def fetch(self) -> Credentials:
        return self._credentials

    def offer_region(self, region: str, source: str) -> None:
        pass

    async def aclose(self) -> None:
        pass


def _environment_credentials(env: Mapping[str, str]) -> Credentials | None:
    """Return the keys the environment holds, as botocore's first provider reads them, or None.

    ``AWS_ACCESS_KEY_ID`` and ``AWS_SECRET_ACCESS_KEY`` (both, else None), ``AWS_SESSION_TOKEN``
    (or ``AWS_SECURITY_TOKEN``) and ``AWS_CREDENTIAL_EXPIRATION`` (ISO 8601).
    """
    access_key = env.get("AWS_ACCESS_KEY_ID")
    secret_key = env.get("AWS_SECRET_ACCESS_KEY")
    if not access_key or not secret_key:
        return None
    token = env.get("AWS_SESSION_TOKEN") or env.get("AWS_SECURITY_TOKEN") or None
    expiry = None
    stamp = env.get("AWS_CREDENTIAL_EXPIRATION")
    if stamp:
        try:
            expiry = dt.datetime.fromisoformat(stamp.strip().replace("Z", "+00:00"))
        except ValueError:
            return None  # botocore's chain reports it
        if expiry.tzinfo is None:
            expiry = expiry.replace(tzinfo=dt.timezone.utc)
    return Credentials(access_key, secret_key, token, expiry)


class _ChainSource:
    """The aiobotocore credential chain of a session (and so of its profile).

    Without a session (the default chain, no profile) the environment's keys are read first,
    as the chain's first provider would, and aiobotocore (half a second to import) is loaded
    only when the environment has none: a cold start with keys in the environment (AWS Lambda)
    never imports it.
    """

    def __init__(self, session: Any, profile: str | None) -> None:
        self._session = session
        self._profile = profile
        self._base = "default chain" if profile is None else f"profile {profile!r}"
        self._method: str | None = None
        self._resolver: Any = None

    @property
    def description(self) -> str:
        if self._method is None:
            return self._base
        return f"{self._base} ({_METHODS.get(self._method, self._method)})"

    async def fetch(self) -> Credentials:
        if self._session is None:
            found = _environment_credentials(os.environ)
            if found is not None:
                self._method = "env"
                return found
            self._session = _new_session(self._profile)
        import botocore.exceptions

        # Keys the caller set on the session (set_credentials) are its identity: botocore
        # keeps them there and would use them before any provider of the chain.
        chosen = getattr(self._session, "_credentials", None)
        if chosen is not None:
            self._method = getattr(chosen, "method", None) or "explicit"
            return await _freeze(chosen)
        if self._resolver is None:
            self._resolver = self._session.get_component("credential_provider")
        try:
            loaded = await self._resolver.load_credentials()
            if loaded is not None:
                self._method = getattr(loaded, "method", None)
                return await _freeze(loaded)
        except botocore.exceptions.CredentialRetrievalError as exc:
            provider = getattr(exc, "kwargs", {}).get("provider")
            if isinstance(provider, str):
                self._method = provider
            raise CredentialsError(
                f"{self.description} could not provide AWS credentials: {exc}" + proxy_hint(),
                source=self.description,
            ) from exc
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
            raise CredentialsError(
                f"{self.description} could not provide AWS credentials: {exc}",
                source=self.description,
            ) from exc
        raise CredentialsError(
            _no_credentials_message(self._base, self._profile), source=self.description
        )

    def offer_region(self, region: str, source: str) -> None:
        pass

    async def aclose(self) -> None:
        pass


_ARN_IN_MESSAGE = r"(arn:aws[\w-]*:(?:iam|sts)::\d*:[^\s,]+?)(?:\s|,|$)"  # compiled on use


class _AssumeRoleSource:
    """AssumeRole with aiobotocore's STS client, signing with credentials from another cache."""

    def __init__(
        self,
        inner: CredentialCache,
        session: Any,
        *,
        role_arn: str,
        role_session_name: str,
        external_id: str | None,
        duration: int | None,
        region: str | None,
        region_source: str,
    ) -> None:
        self._inner = inner
        self._session = session
        self._role_arn = role_arn
        self._role_session_name = role_session_name
        self._external_id = external_id
        self._duration = duration
        self._region = region
        self._region_source = region_source
        self._client: Any = None
        self._client_key: tuple[str, str | None] | None = None
        #: The Date of STS's last answer: evidence of clock skew for diagnosis.
        self.server_date: dt.datetime | None = None

    @property
    def description(self) -> str:
        return f"assume-role {self._role_arn} via {self._inner.source}"

    def offer_region(self, region: str, source: str) -> None:
        if self._region is None:
            self._region, self._region_source = region, source
            logger.info("AssumeRole calls STS in %s (from %s)", region, source)
        self._inner.offer_region(region, source)

    async def _client_for(self, source: Credentials) -> Any:
        if self._region is None:
            raise CredentialsError(
                f"no AWS region to call STS in for AssumeRole of {self._role_arn}: pass "
                "IAMAuth(region='<your region>') or set AWS_REGION",
                source=self.description,
            )
        key = (source.access_key, source.token)
        if self._client is None or self._client_key != key:
            await self._close_client()
            context = self._session.create_client(
                "sts",
                region_name=self._region,
                aws_access_key_id=source.access_key,
                aws_secret_access_key=source.secret_key,
                aws_session_token=source.token,
            )
            self._client = await context.__aenter__()
            self._client_key = key
        return self._client

    async def fetch(self) -> Credentials:
        import botocore.exceptions

        source = await self._inner.get()
        client = await self._client_for(source)
        params: dict[str, Any] = {
            "RoleArn": self._role_arn,
            "RoleSessionName": self._role_session_name,
        }
        if self._external_id is not None:
            params["ExternalId"] = self._external_id
        if self._duration is not None:
            params["DurationSeconds"] = self._duration
        try:
            response = await client.assume_role(**params)
        except botocore.exceptions.ClientError as exc:
            raise await self._refused(exc, client, source) from exc
        except botocore.exceptions.BotoCoreError as exc:
            raise CredentialsError(
                f"AssumeRole for role {self._role_arn} could not reach STS in {self._region} "
                f"(region from {self._region_source}): {exc}. Check "
                "network access to the STS endpoint (AWS_ENDPOINT_URL_STS, proxies, NO_PROXY)",
                source=self.description,
            ) from exc
        self.server_date = response_date(response)
        issued = response["Credentials"]
        expiry = issued["Expiration"]
        if expiry.tzinfo is None:
            expiry = expiry.replace(tzinfo=dt.timezone.utc)
        return Credentials(
            issued["AccessKeyId"],
            issued["SecretAccessKey"],
            issued.get("SessionToken"),
            expiry.astimezone(dt.timezone.utc),
        )

    async def _refused(self, exc: Any, client: Any, source: Credentials) -> CredentialsError:
        """Explain an AssumeRole that STS answered with an error."""
        error = exc.response.get("Error", {})
        code = error.get("Code", "")
        message = error.get("Message", "")
        if code in ("AccessDenied", "AccessDeniedException"):
            identity = await self._identity(client, message)
            return CredentialsError(
                f"AssumeRole denied for role {self._role_arn} by identity {identity} "
                f"(source credentials from {self._inner.source}): {message}. Allow "
                f"sts:AssumeRole on {self._role_arn} in that identity's IAM policy and name "
                "the identity as a principal in the role's trust policy"
                + (" (check the ExternalId too)" if self._external_id else ""),
                source=self.description,
            )
        return CredentialsError(
            f"AssumeRole for role {self._role_arn} failed with {code} (source credentials "
            f"from {self._inner.source}, access key {mask_access_key(source.access_key)}): "
            f"{message}",
            source=self.description,
        )

    async def _identity(self, client: Any, message: str) -> str:
        match = re.search(_ARN_IN_MESSAGE, message)
        if match is not None and match.group(1) != self._role_arn:
            return match.group(1)
        try:
            caller = await client.get_caller_identity()
        except Exception:
            return "(unknown: GetCallerIdentity failed too)"
        return str(caller.get("Arn", "(unknown)"))

    async def _close_client(self) -> None:
        client, self._client = self._client, None
        self._client_key = None
        if client is not None:
            await client.__aexit__(None, None, None)

    async def aclose(self) -> None:
        await self._close_client()
        await self._inner.aclose()


def _new_session(profile: str | None) -> Any:
    from aiobotocore.session import AioSession

    return AioSession(profile=profile)


def _check_profile(session: Any, profile: str) -> None:
    available = session.available_profiles
    if profile not in available:
        raise ConfigurationError(
            f"AWS profile {profile!r} is not defined in the config or credentials files "
            f"(AWS_CONFIG_FILE={os.environ.get('AWS_CONFIG_FILE', '~/.aws/config')}); "
            f"defined: {', '.join(sorted(available)) or 'none'}"
        )


def configured_region(*, profile: str | None = None, session: Any = None) -> str | None:
    """Return the region the AWS CLI would use: AWS_REGION, AWS_DEFAULT_REGION, the profile's.

    Reads config files synchronously (once, at configuration time).
    """
    found = region_from_environment()
    if found is not None:
        return found.name
    if session is None:
        session = _new_session(profile)
    if profile is not None:
        _check_profile(session, profile)
    region = session.get_config_variable("region")
    return str(region) if region else None


def build_cache(
    *,
    credentials: Credentials | None,
    profile: str | None,
    session: Any,
    role: AssumeRole | None,
    sts_region: tuple[str, str] | None,
    **tuning: Any,
) -> CredentialCache:
    """Return a credential cache for settings `IAMAuth` has already validated.

    `sts_region` is the region for STS and where it came from; None leaves it to the first
    `CredentialCache.offer_region` (the database endpoint's region). `tuning` goes to every
    `CredentialCache` made.
    """
    if session is None and (profile is not None or role is not None):
        session = _new_session(profile)
    if profile is not None:
        _check_profile(session, profile)
    base: _Source
    base = _StaticSource(credentials) if credentials is not None else _ChainSource(session, profile)
    if role is None:
        return CredentialCache(base, **tuning)
    region, region_source = sts_region if sts_region is not None else (None, "")
    source = _AssumeRoleSource(
        CredentialCache(base, **tuning),
        session,
        role_arn=role.role_arn,
        role_session_name=role.session_name or f"asyncpg-iam-{os.getpid()}",
        external_id=role.external_id,
        duration=role.duration,
        region=region,
        region_source=region_source,
    )
    return CredentialCache(source, **tuning)


class AssumeRole:
    """An explicit AssumeRole, as `IAMAuth` validated it.

    A plain slotted class (as `_tls.TLSSetting` says why), never changed once made.
    """

    __slots__ = ("duration", "external_id", "role_arn", "session_name")

    def __init__(
        self,
        *,
        role_arn: str,
        session_name: str | None = None,
        external_id: str | None = None,
        duration: int | None = None,
    ) -> None:
        self.role_arn = role_arn
        self.session_name = session_name
        self.external_id = external_id
        self.duration = duration
