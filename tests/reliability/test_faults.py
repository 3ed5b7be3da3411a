"""Faults injected through PostgreSQL, the emulator and the AWS endpoints; the pool survives."""

from __future__ import annotations

import asyncio
import datetime as dt
import http.server
import logging
import secrets
import threading
import urllib.parse
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

import asyncpg_iam
from asyncpg_iam import (
    Credentials,
    CredentialsError,
    IAMAuth,
    IAMAuthenticationError,
)
from asyncpg_iam._auth import credential_cache_for
from asyncpg_iam.testing import (
    CredentialServer,
    ManualClock,
    PostgresServer,
    RDSIAMEmulator,
    Sandbox,
    find_postgres_bin,
    isolated_aws_environment,
)
from tests._support import run_in_lock_step, wait_for

from .conftest import no_hang, pool_kwargs

pytestmark = pytest.mark.reliability


class Load:
    """Workers that query a pool until stopped, recording each outcome by its phase."""

    def __init__(self, pool: asyncpg_iam.Pool, *, workers: int, timeout: float = 3.0) -> None:
        self.pool = pool
        self.timeout = timeout
        self.phase = "before"
        self.outcomes: dict[str, Counter[str]] = {}
        self.wrong_answers = 0
        self._stop = asyncio.Event()
        self._tasks = [asyncio.ensure_future(self._work(n)) for n in range(workers)]

    async def _work(self, n: int) -> None:
        i = 0
        while not self._stop.is_set():
            phase = self.phase
            i += 1
            value = n * 1_000_000 + i
            try:
                answer = await no_hang(self._query(value), self.timeout * 2 + 10)
            except Exception as exc:
                outcome = type(exc).__name__
                await asyncio.sleep(0.02)
            else:
                outcome = "ok"
                if answer != value:
                    self.wrong_answers += 1
            # A query that began in one phase and ended in another belongs to neither.
            key = phase if phase == self.phase else "transition"
            self.outcomes.setdefault(key, Counter())[outcome] += 1

    async def _query(self, value: int) -> Any:
        async with self.pool.acquire(timeout=self.timeout) as con:
            return await con.fetchval(
                "SELECT $1::bigint FROM pg_sleep(0.005)", value, timeout=self.timeout
            )

    def count(self, phase: str, outcome: str | None = None) -> int:
        found = self.outcomes.get(phase, Counter())
        if outcome is None:
            return sum(found.values())
        return found[outcome]

    def failures(self, phase: str) -> int:
        return self.count(phase) - self.count(phase, "ok")

    async def recovered(self) -> None:
        """Wait until a query succeeds again, then start the "after" phase."""
        done = self.count("during", "ok")
        await wait_for(lambda: self.count("during", "ok") > done, timeout=30)
        self.phase = "after"

    async def stop(self) -> None:
        self._stop.set()
        await no_hang(asyncio.gather(*self._tasks))


async def test_postgres_restart_under_load() -> None:
    """PostgreSQL stopped and started under load: failures while down, none after, no hang."""
    async with Sandbox() as sandbox:
        cluster, emulator = sandbox.cluster, sandbox.emulator
        assert cluster is not None
        pg_ctl = str(find_postgres_bin() / "pg_ctl")
        data = str(cluster.data_dir)
        log = str(cluster.data_dir.parent / "postgres.log")
        async with asyncpg_iam.create_pool(
            **pool_kwargs(emulator, cluster.server, min_size=4, max_size=8)
        ) as pool:
            load = Load(pool, workers=12)
            await asyncio.sleep(0.5)
            load.phase = "during"
            # The cluster's own runner (runuser when root); -m immediate is a crash, not a
            # polite shutdown.
            await asyncio.to_thread(cluster._run, [pg_ctl, "-D", data, "-m", "immediate", "stop"])
            await asyncio.sleep(1.0)
            start = [pg_ctl, "-D", data, "-l", log, "-w", "-o", f"-p {cluster.port}", "start"]
            await asyncio.to_thread(cluster._run, start)
            await load.recovered()
            await asyncio.sleep(1.0)
            await load.stop()
            stats = pool.stats()

    assert load.count("before", "ok") > 0
    assert load.failures("before") == 0
    # Felt by the pool; callers may not see it (queries in flight at the crash count as
    # "transition", and acquires wait out the restart within their timeout).
    assert stats.failover_events >= 1, "the restart was felt"
    assert load.count("after", "ok") >= 20
    assert load.failures("after") == 0, load.outcomes
    assert load.wrong_answers == 0
    assert stats.connect_failures > 0
    assert stats.auth_failures == 0
    # Refused only for want of a backend (down, or starting up), never for the token.
    refused = {r.reason for r in emulator.records if not r.accepted}
    assert refused <= {"backend_unavailable", "backend_error"}, refused


async def test_emulator_drops_every_connection(
    iam_emulator: RDSIAMEmulator, postgres_server: PostgresServer
) -> None:
    """Three rounds of dropping every connection: in-flight queries fail, then all pass."""
    async with asyncpg_iam.create_pool(
        **pool_kwargs(iam_emulator, postgres_server, min_size=4, max_size=4)
    ) as pool:
        load = Load(pool, workers=8)
        await asyncio.sleep(0.3)
        load.phase = "during"
        dropped = []
        for _ in range(3):
            await wait_for(lambda: iam_emulator.open_connections >= 4, timeout=15)
            dropped.append(iam_emulator.drop_all_connections())
            await asyncio.sleep(0.3)
        await load.recovered()
        await asyncio.sleep(0.5)
        await load.stop()
        stats = pool.stats()

    assert len(dropped) == 3
    assert all(n >= 4 for n in dropped)
    assert load.failures("during") > 0
    assert load.failures("after") == 0, load.outcomes
    assert load.count("after", "ok") >= 20
    assert load.wrong_answers == 0
    assert stats.connections_opened >= 4 * 4, "every drop was followed by reconnects"
    assert iam_emulator.logins_rejected == 0


async def test_rejected_logins_surface_then_pool_recovers(
    iam_emulator: RDSIAMEmulator, postgres_server: PostgresServer
) -> None:
    """With the next 5 logins rejected, exactly 5 of 30 callers get IAMAuthenticationError."""
    async with asyncpg_iam.create_pool(
        **pool_kwargs(iam_emulator, postgres_server, min_size=0, max_size=3)
    ) as pool:
        iam_emulator.reject_next(5)
        results = await no_hang(
            asyncio.gather(
                *(pool.fetchval("SELECT $1::int", n) for n in range(30)), return_exceptions=True
            )
        )
        after = await no_hang(
            asyncio.gather(*(pool.fetchval("SELECT $1::int", n) for n in range(30)))
        )
        stats = pool.stats()

    errors = [r for r in results if isinstance(r, BaseException)]
    assert len(errors) == 5
    assert all(isinstance(e, IAMAuthenticationError) and e.hints for e in errors)
    assert [r for r in results if not isinstance(r, BaseException)] == [
        n for n, r in enumerate(results) if not isinstance(r, BaseException)
    ]
    assert after == list(range(30))
    assert Counter(r.reason for r in iam_emulator.records if not r.accepted) == {"fault_reject": 5}
    assert stats.auth_failures == 5


@pytest.mark.parametrize(("offset", "reason"), [(1200, "expired"), (-1200, "future_dated")])
async def test_clock_skew_is_named_in_the_diagnosis(
    iam_emulator: RDSIAMEmulator, postgres_server: PostgresServer, offset: int, reason: str
) -> None:
    """An emulator clock 20 minutes off refuses logins; the error names clock skew; it recovers."""
    async with asyncpg_iam.create_pool(
        **pool_kwargs(iam_emulator, postgres_server, min_size=0, max_size=2)
    ) as pool:
        iam_emulator.clock_offset = offset
        with pytest.raises(IAMAuthenticationError) as info:
            await no_hang(pool.fetchval("SELECT 1"))
        iam_emulator.clock_offset = 0
        assert await no_hang(pool.fetchval("SELECT 1")) == 1

    assert any(hint.startswith("Clock skew") for hint in info.value.hints)
    assert "clock skew" in str(info.value).lower()
    assert [r.reason for r in iam_emulator.records] == [reason, "ok"]


async def test_credential_endpoint_down_then_credentials_expire(
    iam_emulator: RDSIAMEmulator,
    postgres_server: PostgresServer,
    credential_server: CredentialServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Endpoint down: zero failures while cached keys last, then CredentialsError, never a hang."""
    caplog.set_level(logging.WARNING, logger="asyncpg_iam.credentials")

    def still_serving() -> bool:
        return any("still serving" in r.getMessage() for r in caplog.records)

    # Time is a ManualClock shared by the pool and the endpoint: the real round trips (and
    # aiobotocore's three tries at a failing endpoint) take no clock time, so load cannot move
    # the phases. 10 s keys: the cache refreshes after ~5.5 s (that refresh fails) and serves
    # them until their last 2.5 s (a quarter of the lifetime).
    clock = ManualClock(dt.datetime.now(dt.timezone.utc))
    credential_server.clock = clock
    credential_server.lifetime = 10.0
    credential_server.rotate_every = 10.0
    kwargs = pool_kwargs(
        iam_emulator,
        postgres_server,
        min_size=0,
        max_size=4,
        max_lifetime=0.3,
        timeout=10,
        clock=clock,
    )
    async with asyncpg_iam.create_pool(**kwargs) as pool:
        assert await no_hang(pool.fetchval("SELECT 1")) == 1
        cached = pool._connector.provider.credentials.peek()
        assert cached is not None
        assert cached.expiry is not None
        credential_server.fail_status = 503
        requests_at_outage = credential_server.requests
        opened_at_outage = pool.stats().connections_opened
        fetches_at_outage = pool.stats().credential_fetches
        # Valid phase: until the cache's safety margin begins.
        valid_until = cached.expiry - dt.timedelta(seconds=2.8)
        served = 0
        while clock.now() < valid_until:
            assert await no_hang(pool.fetchval("SELECT $1::int", served)) == served
            served += 1
            if pool.stats().credential_fetches > fetches_at_outage:
                # The refresh began: the clock stands still until it has failed.
                await wait_for(still_serving, timeout=15)
            await clock.advance(0.02)
        opened_while_down = pool.stats().connections_opened - opened_at_outage
        refresh_attempts = credential_server.requests - requests_at_outage

        left = (cached.expiry - clock.now()).total_seconds()
        await clock.advance(max(0.0, left) + 0.2)
        await pool.expire_connections()
        requests_before = credential_server.requests
        fetches_before = pool.stats().credential_fetches
        results = await no_hang(
            asyncio.gather(*(pool.fetchval("SELECT 1") for _ in range(10)), return_exceptions=True),
            limit=kwargs["timeout"] + 5,
        )
        requests_after_expiry = credential_server.requests - requests_before
        fetches_after_expiry = pool.stats().credential_fetches - fetches_before

        credential_server.fail_status = None
        recovered = None
        for _ in range(100):
            try:
                recovered = await no_hang(pool.fetchval("SELECT 7"))
                break
            except CredentialsError:
                await clock.advance(0.1)

    assert served >= 20
    assert opened_while_down >= 5, "new connections were signed from the cached credentials"
    assert refresh_attempts >= 1, "a refresh was attempted (and failed) while they were valid"
    assert still_serving()
    assert all(isinstance(r, CredentialsError) for r in results), results
    assert "expired" in str(results[0])
    # One shared fetch (aiobotocore tries the endpoint up to 3 times), not one per caller.
    assert fetches_after_expiry == 1
    assert 1 <= requests_after_expiry <= 3
    assert recovered == 7
    assert iam_emulator.logins_rejected == 0


async def test_slow_credential_endpoint(
    iam_emulator: RDSIAMEmulator,
    postgres_server: PostgresServer,
    credential_server: CredentialServer,
) -> None:
    """A slow endpoint: connects that time out fail cleanly, one fetch serves everyone after."""
    # Slower than the connect timeout, faster than aiobotocore's own 2 s timeout (no retry).
    credential_server.delay = 1.2
    kwargs = pool_kwargs(iam_emulator, postgres_server, min_size=0, max_size=4, timeout=0.5)
    async with asyncpg_iam.create_pool(**kwargs) as pool:
        early = await no_hang(
            asyncio.gather(*(pool.fetchval("SELECT 1") for _ in range(8)), return_exceptions=True)
        )
        await wait_for(lambda: pool._connector.provider.credentials.peek() is not None, timeout=15)
        credential_server.delay = 0.0
        later = await no_hang(asyncio.gather(*(pool.fetchval("SELECT 1") for _ in range(8))))
        stats = pool.stats()

    assert all(isinstance(e, asyncio.TimeoutError) for e in early), early
    assert later == [1] * 8
    assert credential_server.requests == 1, "one fetch, shared, finished in the background"
    assert stats.credential_fetches == 1
    assert iam_emulator.logins_rejected == 0


# -- STS throttling -------------------------------------------------------------------------

_ROLE = "arn:aws:iam::123456789012:role/app"
_STS_NS = "https://sts.amazonaws.com/doc/2011-06-15/"
_THROTTLING = f"""<ErrorResponse xmlns="{_STS_NS}">
  <Error><Type>Sender</Type><Code>Throttling</Code><Message>Rate exceeded</Message></Error>
  <RequestId>c6104cbe-af31-11e0-8154-cbc7ccf896c7</RequestId>
</ErrorResponse>"""


class ThrottlingSTS:
    """STS on loopback: AssumeRole answers Throttling while `throttle` is set, else a new key."""

    def __init__(self) -> None:
        self.throttle = True
        self.requests = 0
        self.listeners: list[Any] = []
        self._lock = threading.Lock()
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                action = urllib.parse.parse_qs(body.decode()).get("Action", [""])[0]
                status, text = owner.answer(action)
                data = text.encode()
                self.send_response(status)
                self.send_header("Content-Type", "text/xml")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def answer(self, action: str) -> tuple[int, str]:
        with self._lock:
            self.requests += 1
        if action != "AssumeRole":
            return 400, _THROTTLING.replace("Throttling", "InvalidAction")
        if self.throttle:
            return 400, _THROTTLING
        access_key = "ASIA" + secrets.token_hex(8).upper()
        secret_key = secrets.token_urlsafe(30)
        token = secrets.token_urlsafe(96)
        for listener in self.listeners:
            listener(access_key, secret_key, token)
        expiry = (dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=1)).strftime(
            "%Y-%m-%dT%H:%M:%SZ"
        )
        return (
            200,
            f"""<AssumeRoleResponse xmlns="{_STS_NS}"><AssumeRoleResult>
  <Credentials><AccessKeyId>{access_key}</AccessKeyId><SecretAccessKey>{secret_key}</SecretAccessKey>
  <SessionToken>{token}</SessionToken><Expiration>{expiry}</Expiration></Credentials>
  <AssumedRoleUser><AssumedRoleId>AROAEXAMPLE:s</AssumedRoleId>
  <Arn>arn:aws:sts::123456789012:assumed-role/app/s</Arn></AssumedRoleUser>
</AssumeRoleResult><ResponseMetadata><RequestId>1</RequestId></ResponseMetadata>
</AssumeRoleResponse>""",
        )

    def __enter__(self) -> ThrottlingSTS:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


#: botocore's own attempts per AssumeRole call in these tests (AWS_MAX_ATTEMPTS).
_STS_ATTEMPTS = 2


@pytest.fixture
def throttling_sts() -> Iterator[ThrottlingSTS]:
    """A throttling STS that aiobotocore's STS clients are pointed at."""
    with (
        ThrottlingSTS() as sts,
        isolated_aws_environment(
            variables={
                "AWS_ENDPOINT_URL_STS": sts.url,
                "AWS_RETRY_MODE": "standard",
                "AWS_MAX_ATTEMPTS": str(_STS_ATTEMPTS),
            }
        ),
    ):
        yield sts


_SOURCE = Credentials("AKIASOURCEKEY0000001", "source-secret-" + "s" * 26)


async def test_sts_throttling_backs_off_with_bounded_retries(
    throttling_sts: ThrottlingSTS,
) -> None:
    """A throttled AssumeRole is retried a bounded number of times, with exponential backoff."""
    # On a manual clock that moves 10 ms only once every caller is paused: the real STS round
    # trips (and botocore's own retry pause) take no clock time, so load cannot starve callers.
    clock = ManualClock()
    cache = credential_cache_for(
        IAMAuth(role_arn=_ROLE, credentials=_SOURCE),
        retry_delay=0.1,
        max_retry_delay=0.4,
        min_refresh_interval=0,
        clock=clock,
    )
    calls = 0
    errors: Counter[bool] = Counter()

    async def turn(_n: int) -> None:
        nonlocal calls
        calls += 1
        try:
            await no_hang(cache.get())
        except CredentialsError as exc:
            errors["Throttling" in str(exc)] += 1

    try:
        await run_in_lock_step(
            clock, workers=10, step=0.01, until=clock.monotonic() + 1.5, turn=turn
        )
    finally:
        await cache.aclose()

    assert errors == {True: calls}, "every caller got a CredentialsError naming the throttling"
    assert calls >= 100
    assert 1 <= cache.fetches <= 10, "backoff: far fewer fetches than calls"
    assert throttling_sts.requests == _STS_ATTEMPTS * cache.fetches, "bounded retries per fetch"


async def test_pool_through_sts_throttling_recovers(
    throttling_sts: ThrottlingSTS,
    rds_emulator: RDSIAMEmulator,
    postgres_server: PostgresServer,
) -> None:
    """20 callers during STS throttling share one fetch and fail cleanly; the pool then recovers."""
    throttling_sts.listeners.append(rds_emulator.register_key)
    auth = IAMAuth(role_arn=_ROLE, credentials=_SOURCE, signing_host=rds_emulator.endpoint)
    kwargs = pool_kwargs(rds_emulator, postgres_server, iam=auth, min_size=0, max_size=4)
    async with asyncpg_iam.create_pool(**kwargs) as pool:
        during = await no_hang(
            asyncio.gather(*(pool.fetchval("SELECT 1") for _ in range(20)), return_exceptions=True)
        )
        requests_for_storm = throttling_sts.requests
        with pytest.raises(CredentialsError):  # within the backoff: no new request
            await no_hang(pool.fetchval("SELECT 1"))
        requests_in_backoff = throttling_sts.requests - requests_for_storm
        throttling_sts.throttle = False
        recovered = None
        while recovered is None:
            try:
                recovered = await no_hang(pool.fetchval("SELECT 2"))
            except CredentialsError:
                await asyncio.sleep(0.1)
        stats = pool.stats()

    assert all(isinstance(e, CredentialsError) and "Throttling" in str(e) for e in during)
    assert requests_for_storm == _STS_ATTEMPTS
    assert requests_in_backoff == 0
    assert recovered == 2
    assert throttling_sts.requests == _STS_ATTEMPTS + 1
    assert stats.auth_failures == 0
    assert rds_emulator.logins_rejected == 0


# -- the connect storm ----------------------------------------------------------------------

_RATE = 10


async def test_storm_of_1000_acquires_on_a_pool_of_10(
    iam_emulator: RDSIAMEmulator, postgres_server: PostgresServer
) -> None:
    """1,000 concurrent acquires on 10 connections recycling fast: all served or timed out."""
    iam_emulator.max_logins_per_second = _RATE + 1  # RDS-like throttle just above the pool's limit
    kwargs = pool_kwargs(
        iam_emulator,
        postgres_server,
        min_size=0,
        max_size=10,
        max_lifetime=0.5,
        max_lifetime_jitter=0.5,
        max_connect_rate=_RATE,
    )
    outcomes: Counter[str] = Counter()
    wrong = 0

    async def one(n: int) -> None:
        nonlocal wrong
        try:
            async with pool.acquire(timeout=8) as con:
                value = await con.fetchval("SELECT $1::int FROM pg_sleep(0.01)", n, timeout=8)
        except asyncio.TimeoutError:
            outcomes["timed out"] += 1
        except Exception as exc:
            outcomes[type(exc).__name__] += 1
        else:
            outcomes["served"] += 1
            wrong += value != n

    async with asyncpg_iam.create_pool(**kwargs) as pool:
        await no_hang(asyncio.gather(*(one(n) for n in range(1000))), limit=60)
        stats = pool.stats()

    assert set(outcomes) <= {"served", "timed out"}, outcomes
    assert sum(outcomes.values()) == 1000
    assert outcomes["served"] >= 500
    assert wrong == 0
    assert iam_emulator.max_login_attempts_in_one_second <= _RATE + 1
    assert iam_emulator.logins_rejected == 0, "the pool never tripped the server's throttle"
    assert stats.connects_rate_limited > 0
    assert stats.connections_opened > 10, "connections were recycled during the storm"
