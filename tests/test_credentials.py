"""The credential cache: fetch counts, refresh ahead, backoff, error messages, assume-role."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import socket
from typing import Any

import pytest
from aiobotocore.credentials import AioRefreshableCredentials
from aiobotocore.session import AioSession

from asyncpg_iam._auth import IAMAuth, TokenProvider, credential_cache_for
from asyncpg_iam._aws_env import credential_endpoints, proxy_problem
from asyncpg_iam._clock import ManualClock
from asyncpg_iam._credentials import CredentialCache, configured_region
from asyncpg_iam._errors import ConfigurationError, CredentialsError
from asyncpg_iam._signing import Credentials, build_auth_token
from asyncpg_iam.testing._aws import CredentialServer, MotoSTS
from asyncpg_iam.testing._aws_fixtures import isolate_aws_environment

UTC = dt.timezone.utc


def real_now_clock() -> ManualClock:
    """A manual clock that starts at the real time (aiobotocore and moto use real time)."""
    return ManualClock(dt.datetime.now(UTC))


def fast_retry_session() -> AioSession:
    """A session whose container fetcher does not sleep between its three attempts."""
    session = AioSession()
    fetcher = session.get_component("credential_provider").get_provider("container-role")._fetcher

    async def no_sleep(_: float) -> None:
        await asyncio.sleep(0)

    fetcher._sleep = no_sleep
    return session


async def settle(cache: CredentialCache, server: CredentialServer | None = None) -> None:
    """Let a fetch in flight reach the server and finish, without moving the clock."""
    for _ in range(2000):
        if cache._task is None and (server is None or server.requests >= cache.fetches):
            return
        await asyncio.sleep(0.001)
    raise AssertionError("the fetch did not finish")


@pytest.fixture
async def short_lived(credential_server: CredentialServer) -> CredentialServer:
    """The credential server issuing 5-minute credentials on a manual clock."""
    credential_server.lifetime = 300
    credential_server.rotate_every = 150
    credential_server.clock = real_now_clock()
    return credential_server


async def test_concurrent_first_reads_make_one_fetch(short_lived: CredentialServer) -> None:
    """1,000 concurrent first reads share exactly one fetch."""
    cache = credential_cache_for(clock=short_lived.clock)
    results = await asyncio.gather(*(cache.get() for _ in range(1000)))
    assert cache.fetches == 1
    assert short_lived.requests == 1
    assert {c.access_key for c in results} == {short_lived.issued[0]}
    assert cache.source == "default chain (container)"
    await cache.aclose()


async def test_reads_over_30_minutes_fetch_once_per_half_lifetime(
    short_lived: CredentialServer,
) -> None:
    """10,000 reads over 30 simulated minutes of 5-minute credentials fetch <= once per 150 s."""
    clock = short_lived.clock
    assert isinstance(clock, ManualClock)
    cache = credential_cache_for(clock=clock)
    seen = set()
    for _ in range(10_000):
        seen.add((await cache.get()).access_key)
        await settle(cache, short_lived)
        await clock.advance(0.18)
    print(f"our cache: {cache.fetches} fetches for 10,000 reads over 1,800 s")
    assert cache.fetches <= 1800 / 150 + 1
    assert cache.fetches >= 1800 / 150 - 1  # it does refresh ahead, every half lifetime
    assert short_lived.requests == cache.fetches
    assert len(seen) == cache.fetches  # each fetch brought rotated keys into use
    await cache.aclose()


async def test_plain_aiobotocore_credentials_fetch_on_every_read(
    short_lived: CredentialServer,
) -> None:
    """Measured: aiobotocore's refreshable credentials refetch on every read of 5-min keys."""
    clock = short_lived.clock
    assert isinstance(clock, ManualClock)
    creds = await AioSession().get_credentials()
    assert isinstance(creds, AioRefreshableCredentials)
    creds._time_fetcher = clock.now  # drive aiobotocore's own time source with the same clock
    before = short_lived.requests
    reads = 300
    for _ in range(reads):
        await creds.get_frozen_credentials()
        await clock.advance(1800 / reads)
    fetches = short_lived.requests - before
    print(f"aiobotocore: {fetches} fetches for {reads} reads over 1,800 s")
    assert fetches == reads


async def test_refresh_serves_old_credentials_while_in_flight(
    short_lived: CredentialServer,
) -> None:
    """During a refresh readers get the old credentials at once; the new ones follow."""
    clock = short_lived.clock
    assert isinstance(clock, ManualClock)
    cache = credential_cache_for(clock=clock)
    first = await cache.get()
    await clock.advance(170)  # less than 45 % of the lifetime left
    short_lived.hang = True
    for _ in range(100):
        assert await cache.get() is first
    assert cache.fetches == 2
    short_lived.hang = False
    await settle(cache, short_lived)
    assert (await cache.get()).access_key != first.access_key
    assert cache.fetches == 2
    await cache.aclose()


async def test_failed_refresh_logs_warning_and_backs_off(
    short_lived: CredentialServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A failed refresh while valid logs a WARNING without secrets and retries with backoff."""
    caplog.set_level(logging.DEBUG)
    clock = short_lived.clock
    assert isinstance(clock, ManualClock)
    cache = credential_cache_for(
        IAMAuth(session=fast_retry_session()), clock=clock, min_refresh_interval=0
    )
    first = await cache.get()
    short_lived.fail_status = 500
    await clock.advance(170)
    assert await cache.get() is first
    await settle(cache)
    assert cache.fetches == 2
    warnings = [
        r
        for r in caplog.records
        if r.levelno == logging.WARNING and r.name == "asyncpg_iam.credentials"
    ]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert "refreshing AWS credentials from default chain (container) failed" in message
    assert "retrying in 1 s" in message
    await clock.advance(0.5)
    await cache.get()
    assert cache.fetches == 2  # still backing off
    await clock.advance(0.6)
    await cache.get()
    await settle(cache)
    assert cache.fetches == 3
    await clock.advance(1.5)
    await cache.get()
    assert cache.fetches == 3  # second delay is 2 s
    short_lived.fail_status = None
    await clock.advance(0.6)
    await cache.get()
    await settle(cache)
    assert cache.fetches == 4
    assert (await cache.get()).access_key != first.access_key
    logged = "\n".join(r.getMessage() for r in caplog.records) + caplog.text
    assert first.secret_key not in logged
    assert first.token is not None
    assert first.token not in logged
    assert first.access_key not in logged
    await cache.aclose()


async def test_expired_credentials_with_failing_refresh_raise(
    short_lived: CredentialServer,
) -> None:
    """Once the old credentials expire and refresh fails, get() says both."""
    clock = short_lived.clock
    assert isinstance(clock, ManualClock)
    cache = credential_cache_for(IAMAuth(session=fast_retry_session()), clock=clock)
    await cache.get()
    short_lived.fail_status = 500
    await clock.advance(400)
    with pytest.raises(CredentialsError) as info:
        await cache.get()
    text = str(info.value)
    assert "the AWS credentials from default chain (container)" in text
    assert "expired at" in text
    assert "Refreshing them failed" in text
    assert "500" in text
    assert info.value.source == "default chain (container)"
    await cache.aclose()


async def test_container_endpoint_failure_message(credential_server: CredentialServer) -> None:
    """A failing container endpoint names the source and the HTTP status."""
    credential_server.fail_status = 500
    cache = credential_cache_for(IAMAuth(session=fast_retry_session()))
    with pytest.raises(CredentialsError, match=r"default chain \(container\) could not provide"):
        await cache.get()
    assert cache.fetches == 1
    with pytest.raises(CredentialsError, match="500"):
        await cache.get()  # within the backoff: the last error again, no new fetch
    assert cache.fetches == 1
    await cache.aclose()


async def test_container_endpoint_behind_proxy_message(
    credential_server: CredentialServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A container endpoint failing while HTTP_PROXY is set carries the doctor's NO_PROXY fix."""
    credential_server.fail_status = 502
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    cache = credential_cache_for(IAMAuth(session=fast_retry_session()))
    with pytest.raises(CredentialsError) as info:
        await cache.get()
    await cache.aclose()
    text = str(info.value)
    assert "NO_PROXY does not include" in text
    assert "127.0.0.1 (container credentials)" in text
    # The same function gives the doctor its fix line.
    problem = proxy_problem(credential_endpoints())
    assert problem is not None
    assert problem.fix in text


async def test_expired_on_arrival_message(short_lived: CredentialServer) -> None:
    """Credentials that arrive already expired raise an 'expired' error."""
    short_lived.expired = True
    cache = credential_cache_for(clock=short_lived.clock)
    with pytest.raises(CredentialsError, match=r"expired at .* s ago. Renew them"):
        await cache.get()
    await cache.aclose()


async def test_hanging_endpoint_times_out(short_lived: CredentialServer) -> None:
    """A hanging credential endpoint fails after fetch_timeout on the cache's clock."""
    clock = short_lived.clock
    assert isinstance(clock, ManualClock)
    short_lived.hang = True
    cache = credential_cache_for(clock=clock, fetch_timeout=10)
    reader = asyncio.ensure_future(cache.get())
    await clock.advance(11, step=1)
    with pytest.raises(CredentialsError, match="timed out after 10 s"):
        await reader
    short_lived.hang = False
    await cache.aclose()


def closed_port() -> int:
    """Return a loopback port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def no_credentials(
    monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """An environment where the default chain finds nothing."""
    isolate_aws_environment(monkeypatch, tmp_path_factory)


async def test_no_credentials_message(no_credentials: None) -> None:
    """With no source at all the error lists where the chain looked and what to set."""
    cache = credential_cache_for()
    with pytest.raises(CredentialsError) as info:
        await cache.get()
    text = str(info.value)
    assert "no AWS credentials found by the default chain" in text
    assert "AWS_PROFILE" in text
    assert "NO_PROXY" not in text
    await cache.aclose()


async def test_instance_metadata_behind_proxy_message(
    no_credentials: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Unreachable instance metadata with HTTPS_PROXY set and no NO_PROXY names the fix."""
    monkeypatch.delenv("AWS_EC2_METADATA_DISABLED")
    monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    monkeypatch.setenv("AWS_METADATA_SERVICE_TIMEOUT", "1")
    monkeypatch.setenv("AWS_METADATA_SERVICE_NUM_ATTEMPTS", "1")
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.corp.example:3128")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    cache = credential_cache_for()
    with pytest.raises(CredentialsError) as info:
        await cache.get()
    text = str(info.value)
    assert "no AWS credentials found" in text
    assert (
        "HTTPS_PROXY set but NO_PROXY does not include 169.254.169.254 (instance metadata)" in text
    )
    assert "fix: export NO_PROXY=169.254.169.254" in text
    await cache.aclose()
    monkeypatch.setenv("NO_PROXY", "localhost,169.254.169.254")
    cache = credential_cache_for()
    with pytest.raises(CredentialsError) as info:
        await cache.get()
    assert "NO_PROXY does not include" not in str(info.value)
    await cache.aclose()


async def test_static_credentials_fetch_once() -> None:
    """Static credentials are served without further fetches."""
    static = Credentials("AKIDEXAMPLE", "secret")
    cache = credential_cache_for(IAMAuth(credentials=static))
    for _ in range(100):
        assert await cache.get() is static
    assert cache.fetches == 1
    assert cache.source == "static"
    assert cache.peek() is static
    await cache.aclose()


async def test_profile_source_reads_shared_credentials(
    no_credentials: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    """A named profile's keys are used and the source names the profile."""
    (tmp_path / "credentials").write_text(
        "[dev]\naws_access_key_id = AKIDPROFILE\naws_secret_access_key = s3cr3t\n"
    )
    (tmp_path / "config").write_text("[profile dev]\nregion = eu-north-1\n")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    monkeypatch.delenv("AWS_REGION")
    cache = credential_cache_for(IAMAuth(profile="dev"))
    creds = await cache.get()
    assert creds.access_key == "AKIDPROFILE"
    assert cache.source == "profile 'dev' (shared credentials file)"
    assert configured_region(profile="dev") == "eu-north-1"
    assert configured_region() is None
    monkeypatch.setenv("AWS_DEFAULT_REGION", "ca-central-1")
    assert configured_region(profile="dev") == "ca-central-1"
    monkeypatch.setenv("AWS_REGION", "sa-east-1")
    assert configured_region(profile="dev") == "sa-east-1"
    with pytest.raises(ConfigurationError, match="profile 'nope' is not defined"):
        credential_cache_for(IAMAuth(profile="nope"))
    await cache.aclose()


_ARN = "arn:aws:iam::123456789012:role/app"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"role_duration": 900}, "role_duration only apply with role_arn"),
        ({"external_id": "xy"}, "external_id only apply with role_arn"),
        ({"role_arn": "app"}, "is not an IAM role ARN"),
        ({"role_arn": "arn:aws:iam::1:role/a"}, "is not an IAM role ARN"),
        ({"role_arn": _ARN, "role_duration": 60}, "whole seconds from 900 to 43200"),
        ({"role_arn": _ARN, "role_duration": 900.5}, "whole seconds from 900 to 43200"),
        ({"role_arn": _ARN, "role_session_name": "a b"}, "role_session_name"),
        ({"role_arn": _ARN, "external_id": "x"}, "external_id must be"),
        ({"credentials": Credentials("A", "b"), "profile": "p"}, "either credentials or profile"),
    ],
)
def test_role_settings_are_validated_once_by_iamauth(kwargs: dict[str, Any], message: str) -> None:
    """The credential cache takes an IAMAuth, so its settings pass IAMAuth's one set of rules."""
    with pytest.raises(ConfigurationError, match=message):
        credential_cache_for(IAMAuth(**kwargs))


def test_a_session_for_another_profile_is_refused(no_credentials: None) -> None:
    """A session made for one profile and profile= naming another is a ConfigurationError."""
    from aiobotocore.session import AioSession

    with pytest.raises(ConfigurationError, match="session is for profile 'dev' but profile='prod'"):
        IAMAuth(session=AioSession(profile="dev"), profile="prod")


@pytest.fixture
def unreachable_sts(no_credentials: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """STS at a loopback port nothing listens on, one attempt per call, no region configured."""
    monkeypatch.setenv("AWS_ENDPOINT_URL_STS", f"http://127.0.0.1:{closed_port()}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    monkeypatch.delenv("AWS_REGION", raising=False)


async def _sts_failure(provider: TokenProvider) -> str:
    with pytest.raises(CredentialsError) as info:
        await provider.credentials.get()
    return str(info.value)


async def test_sts_region_is_never_a_silent_default(unreachable_sts: None) -> None:
    """With no region anywhere, AssumeRole says so instead of calling STS in us-east-1."""
    provider = TokenProvider(IAMAuth(role_arn=_ARN, credentials=Credentials("AKIDEXAMPLE", "s")))
    text = await _sts_failure(provider)
    assert "no AWS region to call STS in for AssumeRole of " + _ARN in text
    assert "IAMAuth(region=" in text
    assert "AWS_REGION" in text
    await provider.aclose()


@pytest.mark.parametrize(
    ("auth_region", "env_region", "expected"),
    [
        (None, None, "STS in eu-west-2 (region from the RDS endpoint name)"),
        (None, "ca-central-1", "STS in ca-central-1 (region from AWS_REGION)"),
        ("ap-south-1", "ca-central-1", "STS in ap-south-1 (region from IAMAuth(region=...))"),
    ],
)
async def test_sts_region_and_its_source(
    unreachable_sts: None,
    monkeypatch: pytest.MonkeyPatch,
    auth_region: str | None,
    env_region: str | None,
    expected: str,
) -> None:
    """AssumeRole calls STS in IAMAuth's region, else the configured one, else the endpoint's."""
    if env_region is not None:
        monkeypatch.setenv("AWS_REGION", env_region)
    auth = IAMAuth(role_arn=_ARN, credentials=Credentials("AKIDEXAMPLE", "s"), region=auth_region)
    provider = TokenProvider(auth)
    provider.target("db.abc123.eu-west-2.rds.amazonaws.com", 5432, "app")
    text = await _sts_failure(provider)
    assert "could not reach STS" in text
    assert expected in text
    await provider.aclose()


def test_aiobotocore_internals_we_rely_on() -> None:
    """Pins the aiobotocore attributes the cache sets and reads to freeze credentials."""
    creds = AioRefreshableCredentials(
        "AKID", "secret", "token", dt.datetime.now(UTC) + dt.timedelta(minutes=5), None, "test"
    )
    assert isinstance(creds._expiry_time, dt.datetime)
    assert creds._advisory_refresh_timeout > 0
    assert creds._mandatory_refresh_timeout > 0
    assert creds.method == "test"


@pytest.fixture
def sts_env(moto_sts: MotoSTS, monkeypatch: pytest.MonkeyPatch) -> MotoSTS:
    """Send STS requests to the moto server."""
    for name, value in moto_sts.env().items():
        monkeypatch.setenv(name, value)
    return moto_sts


async def test_assume_role_keys_sign_and_refresh_before_expiry(
    credential_server: CredentialServer, sts_env: MotoSTS
) -> None:
    """Assumed-role keys (900 s) from moto's STS sign tokens and are refreshed before expiry."""
    clock = real_now_clock()
    credential_server.clock = clock
    role = sts_env.create_role("asyncpg-iam-app")
    cache = credential_cache_for(IAMAuth(role_arn=role, role_duration=900), clock=clock)
    assert cache.source == f"assume-role {role} via default chain"
    first = await cache.get()
    assert first.access_key not in credential_server.issued  # assumed, not the source keys
    assert first.token is not None
    token = build_auth_token(
        host="db.example.com",
        port=5432,
        user="app",
        region="us-east-1",
        credentials=first,
        now=clock.now(),
    )
    assert f"X-Amz-Credential={first.access_key}%2F" in token
    assert "X-Amz-Security-Token=" in token
    for _ in range(1000):  # a 900 s role never makes aiobotocore-style per-call fetches
        await cache.get()
    assert cache.fetches == 1
    await clock.advance(500)  # under 45 % of the lifetime left
    served = await cache.get()
    assert served is first  # old keys still served while the refresh runs
    await settle(cache)
    second = await cache.get()
    assert cache.fetches == 2
    assert second.access_key != first.access_key
    assert first.expiry is not None
    assert first.expiry > clock.now()  # refreshed before expiry
    assert f"X-Amz-Credential={second.access_key}%2F" in build_auth_token(
        host="db.example.com",
        port=5432,
        user="app",
        region="us-east-1",
        credentials=second,
        now=clock.now(),
    )
    assert cache.source == f"assume-role {role} via default chain (container)"
    await cache.aclose()


async def test_assume_role_denied_message(no_credentials: None, sts_env: MotoSTS) -> None:
    """A denied AssumeRole names the role and the identity that asked."""
    role = sts_env.create_role("asyncpg-iam-locked")
    user_arn, access_key, secret = sts_env.create_user("asyncpg-iam-denied")
    cache = credential_cache_for(
        IAMAuth(role_arn=role, credentials=Credentials(access_key, secret))
    )
    with sts_env.authorization(), pytest.raises(CredentialsError) as info:
        await cache.get()
    text = str(info.value)
    assert f"AssumeRole denied for role {role} by identity {user_arn}" in text
    assert "sts:AssumeRole" in text
    assert secret not in text
    assert info.value.source == f"assume-role {role} via static"
    await cache.aclose()


async def test_secrets_never_in_repr_or_debug_logs(
    short_lived: CredentialServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Captured at DEBUG, logs and reprs carry no secret key, token or full access key."""
    caplog.set_level(logging.DEBUG)
    cache = credential_cache_for(clock=short_lived.clock)
    creds = await cache.get()
    text = caplog.text + repr(cache) + repr(creds)
    assert creds.secret_key not in text
    assert creds.token is not None
    assert creds.token not in text
    assert creds.access_key not in text
    await cache.aclose()


async def test_a_token_is_signed_once_a_second_and_follows_rotated_keys(
    short_lived: CredentialServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In one whole second the provider presents the token it signed in that second (the same
    bytes signing again would give); the next second, or new keys, sign again."""
    import asyncpg_iam._auth

    clock = short_lived.clock
    assert isinstance(clock, ManualClock)
    signed: list[str] = []

    def counting_signer(**kwargs: Any) -> str:
        signed.append(kwargs["credentials"].access_key)
        return build_auth_token(**kwargs)

    monkeypatch.setattr(asyncpg_iam._auth, "build_auth_token", counting_signer)
    provider = TokenProvider(IAMAuth(), clock=clock)
    target = provider.target("mydb.abcdefghijkl.us-east-1.rds.amazonaws.com", 5432, "app")

    def signed_now(credentials: Credentials) -> str:
        return build_auth_token(
            host=target.signing_host,
            port=5432,
            user="app",
            region="us-east-1",
            credentials=credentials,
            now=clock.now(),
        )

    await clock.advance(1 - clock.now().microsecond / 1e6 + 0.05)  # 50 ms into a second
    first_key = (await provider.credentials.get()).access_key
    tokens = []
    for _ in range(5):
        tokens.append(await provider.token(target))
        await clock.advance(0.15)
    assert signed == [first_key]
    assert provider.tokens_signed == 5
    assert set(tokens) == {tokens[0]}
    assert tokens[0] == signed_now(await provider.credentials.get())  # still that second

    await clock.advance(0.3)  # the next second
    next_second = await provider.token(target)
    assert next_second != tokens[0]
    assert next_second == signed_now(await provider.credentials.get())
    assert len(signed) == 2

    # 200 s into the keys' 300 s, a read starts a refresh and gets the old keys; once the new
    # ones arrive, a token in that same second is signed with them.
    await clock.advance(198 - clock.now().microsecond / 1e6)
    old = await provider.token(target)
    await settle(provider.credentials, short_lived)
    new_credentials = await provider.credentials.get()
    assert new_credentials.access_key != first_key
    new = await provider.token(target)
    assert f"X-Amz-Credential={new_credentials.access_key}%2F" in new
    assert new != old
    assert new == signed_now(new_credentials)
    assert signed[-1] == new_credentials.access_key
    await provider.aclose()
