"""The RDS IAM emulator: token verification, RDS's failure messages, and the relay."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import io
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import pytest

from asyncpg_iam._clock import ManualClock
from asyncpg_iam.testing import (
    DEFAULT_ENDPOINT,
    AccessKey,
    PostgresCluster,
    PostgresServer,
    RDSIAMEmulator,
)
from tests.conftest import TokenFactory, botocore_token, presigned_token

PAM = 'PAM authentication failed for user "{}"'


async def connect(
    emulator: RDSIAMEmulator, password: str, *, user: str = "postgres", **kwargs: Any
) -> asyncpg.Connection:
    options: dict[str, Any] = {**emulator.connect_kwargs(user=user), "database": "postgres"}
    options.update(kwargs)
    return await asyncpg.connect(password=password, timeout=30, **options)


async def eventually(predicate: Callable[[], bool]) -> None:
    """Wait until `predicate()` holds (a guard against hanging, not a timing assertion)."""
    for _ in range(1000):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition never became true")


async def assert_rejected(
    emulator: RDSIAMEmulator, password: str, reason: str, *, user: str = "postgres"
) -> None:
    with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError) as info:
        await connect(emulator, password, user=user)
    assert str(info.value) == PAM.format(user)
    assert info.value.sqlstate == "28000"
    record = emulator.records[-1]
    assert (record.accepted, record.reason) == (False, reason), record.detail
    assert emulator.backend_connections_total == 0


# -- acceptance -------------------------------------------------------------------------------


async def test_accepts_botocore_token_signed_with_registered_key(
    rds_emulator: RDSIAMEmulator, make_token: TokenFactory
) -> None:
    """A botocore token for the endpoint, port, region and user logs in and is relayed."""
    conn = await connect(rds_emulator, make_token())
    try:
        assert await conn.fetchval("SELECT 1") == 1
        pid = await conn.fetchval("SELECT pg_backend_pid()")
    finally:
        await conn.close()
    record = rds_emulator.records[-1]
    assert (record.accepted, record.reason, record.user, record.database) == (
        True,
        "ok",
        "postgres",
        "postgres",
    )
    assert record.backend_pid == pid
    assert record.access_key == "AKIAEMULATORTESTKEY1"
    assert record.token_age is not None
    assert (rds_emulator.logins_accepted, rds_emulator.logins_rejected) == (1, 0)
    assert rds_emulator.password_messages == 1


async def test_accepts_session_credentials(
    rds_emulator: RDSIAMEmulator, make_token: TokenFactory
) -> None:
    """A token signed with temporary credentials carries the matching session token."""
    key = AccessKey("ASIAEMULATORSESSION1", "session-secret", "session-token-value")
    rds_emulator.register_key(key.access_key, key.secret_key, key.session_token)
    conn = await connect(rds_emulator, make_token(key=key))
    await conn.close()
    assert rds_emulator.records[-1].reason == "ok"


async def test_rejects_token_signed_after_key_expiration(
    rds_emulator: RDSIAMEmulator, make_token: TokenFactory
) -> None:
    """A token dies with the credentials that signed it."""
    key = AccessKey("ASIAEMULATOREXPIRED1", "old-secret", "old-token")
    expired = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=1)
    rds_emulator.register_key(key.access_key, key.secret_key, key.session_token, expiration=expired)
    await assert_rejected(rds_emulator, make_token(key=key), "credentials_expired")


# -- rejection, one reason each ---------------------------------------------------------------

Case = Callable[[RDSIAMEmulator, TokenFactory, AccessKey], str]


def _wrong_secret(emulator: RDSIAMEmulator, make: TokenFactory, key: AccessKey) -> str:
    return make(key=AccessKey(key.access_key, "not-the-registered-secret"))


def _unknown_key(emulator: RDSIAMEmulator, make: TokenFactory, key: AccessKey) -> str:
    return make(key=AccessKey("AKIANOTREGISTERED001", key.secret_key))


def _wrong_session_token(emulator: RDSIAMEmulator, make: TokenFactory, key: AccessKey) -> str:
    emulator.register_key("ASIASESSIONKEY000001", "s3cret", "the-right-session-token")
    return make(key=AccessKey("ASIASESSIONKEY000001", "s3cret", "another-session-token"))


def _missing_session_token(emulator: RDSIAMEmulator, make: TokenFactory, key: AccessKey) -> str:
    emulator.register_key("ASIASESSIONKEY000002", "s3cret", "the-right-session-token")
    return make(key=AccessKey("ASIASESSIONKEY000002", "s3cret", None))


def _unexpected_session_token(emulator: RDSIAMEmulator, make: TokenFactory, key: AccessKey) -> str:
    return make(key=AccessKey(key.access_key, key.secret_key, "a-token-the-key-never-had"))


def _expired(emulator: RDSIAMEmulator, make: TokenFactory, key: AccessKey) -> str:
    emulator.clock_offset = 901
    return make()


def _future_dated(emulator: RDSIAMEmulator, make: TokenFactory, key: AccessKey) -> str:
    emulator.clock_offset = -600
    return make()


def _wrong_host(emulator: RDSIAMEmulator, make: TokenFactory, key: AccessKey) -> str:
    return make(host="otherdb.abcdefghijkl.us-east-1.rds.amazonaws.com")


def _wrong_port(emulator: RDSIAMEmulator, make: TokenFactory, key: AccessKey) -> str:
    return make(port=emulator.endpoint_port + 1)


def _wrong_region(emulator: RDSIAMEmulator, make: TokenFactory, key: AccessKey) -> str:
    return make(region="us-west-2")


def _wrong_user(emulator: RDSIAMEmulator, make: TokenFactory, key: AccessKey) -> str:
    return make(user="someone_else")


def _wrong_service(emulator: RDSIAMEmulator, make: TokenFactory, key: AccessKey) -> str:
    return presigned_token(
        key,
        host=emulator.endpoint,
        port=emulator.endpoint_port,
        user="postgres",
        region=emulator.region,
        service="rds",
    )


def _wrong_action(emulator: RDSIAMEmulator, make: TokenFactory, key: AccessKey) -> str:
    return presigned_token(
        key,
        host=emulator.endpoint,
        port=emulator.endpoint_port,
        user="postgres",
        region=emulator.region,
        action="DescribeDBInstances",
    )


def _not_iam_enabled(emulator: RDSIAMEmulator, make: TokenFactory, key: AccessKey) -> str:
    emulator.disable_iam_user("postgres")
    return make()


def _static_password(emulator: RDSIAMEmulator, make: TokenFactory, key: AccessKey) -> str:
    return "a-plain-database-password"


def _tampered(emulator: RDSIAMEmulator, make: TokenFactory, key: AccessKey) -> str:
    return make().replace("DBUser=postgres", "DBUser=postgres&X-Extra=1")


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        pytest.param(_wrong_secret, "signature_mismatch", id="wrong-secret"),
        pytest.param(_tampered, "signature_mismatch", id="tampered"),
        pytest.param(_unknown_key, "unknown_access_key", id="unknown-key"),
        pytest.param(_wrong_session_token, "session_token_mismatch", id="wrong-session-token"),
        pytest.param(_missing_session_token, "session_token_mismatch", id="no-session-token"),
        pytest.param(_unexpected_session_token, "session_token_mismatch", id="extra-session"),
        pytest.param(_expired, "expired", id="expired-901s"),
        pytest.param(_future_dated, "future_dated", id="future-dated"),
        pytest.param(_wrong_host, "wrong_host", id="wrong-host"),
        pytest.param(_wrong_port, "wrong_port", id="wrong-port"),
        pytest.param(_wrong_region, "wrong_region", id="wrong-region"),
        pytest.param(_wrong_user, "wrong_user", id="wrong-user"),
        pytest.param(_wrong_service, "wrong_service", id="wrong-service"),
        pytest.param(_wrong_action, "wrong_action", id="wrong-action"),
        pytest.param(_not_iam_enabled, "user_not_iam_enabled", id="user-not-iam-enabled"),
        pytest.param(_static_password, "malformed_token", id="not-a-token"),
    ],
)
async def test_rejects_bad_token_with_rds_message_and_records_reason(
    rds_emulator: RDSIAMEmulator,
    make_token: TokenFactory,
    rds_access_key: AccessKey,
    case: Case,
    reason: str,
) -> None:
    """Each bad token gets RDS's exact PAM failure while the record names the real cause."""
    token = case(rds_emulator, make_token, rds_access_key)
    await assert_rejected(rds_emulator, token, reason)
    assert (rds_emulator.logins_accepted, rds_emulator.logins_rejected) == (0, 1)


async def test_expired_token_records_its_age(
    rds_emulator: RDSIAMEmulator, make_token: TokenFactory
) -> None:
    """The record of an expired login carries the token's age by the shifted clock."""
    token = make_token()
    rds_emulator.clock_offset = 901
    await assert_rejected(rds_emulator, token, "expired")
    age = rds_emulator.records[-1].token_age
    assert age is not None
    assert age >= 901


@pytest.mark.parametrize(
    ("offset", "accepted"),
    [
        (898, True),  # 898 s old (899 with the Date's truncation): still inside 900 s
        (902, False),  # past 900 s
        (-290, True),  # dated a little ahead, within the allowed skew of 300 s
        (-310, False),  # dated further ahead than the allowed skew
    ],
)
async def test_token_age_and_skew_limits(
    rds_emulator: RDSIAMEmulator, make_token: TokenFactory, offset: int, accepted: bool
) -> None:
    """Tokens are accepted up to 900 s old and up to 300 s in the future, not beyond."""
    rds_emulator.clock_offset = offset
    token = make_token()
    if accepted:
        conn = await connect(rds_emulator, token)
        await conn.close()
        assert rds_emulator.records[-1].accepted
    else:
        await assert_rejected(rds_emulator, token, "expired" if offset > 0 else "future_dated")


async def test_plaintext_startup_rejected_like_rds_before_any_password(
    rds_emulator: RDSIAMEmulator, make_token: TokenFactory
) -> None:
    """A startup without TLS gets the pg_hba.conf rejection and no token ever leaves the client."""
    with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError) as info:
        await connect(rds_emulator, make_token(), ssl=False)
    assert str(info.value) == (
        'pg_hba.conf rejects connection for host "127.0.0.1", user "postgres", '
        'database "postgres", SSL off'
    )
    assert info.value.sqlstate == "28000"
    assert rds_emulator.records[-1].reason == "plaintext"
    assert rds_emulator.password_messages == 0
    assert rds_emulator.backend_connections_total == 0


async def test_accept_any_password_still_requires_tls(
    postgres_server: PostgresServer,
) -> None:
    """Static-password mode skips token checks but keeps refusing plaintext."""
    async with RDSIAMEmulator(
        backend_host=postgres_server.host,
        backend_port=postgres_server.port,
        backend_password=postgres_server.password,
        accept_any_password=True,
    ) as emulator:
        conn = await connect(emulator, "anything")
        assert await conn.fetchval("SELECT 2") == 2
        await conn.close()
        with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError):
            await connect(emulator, "anything", ssl=False)
        assert [r.reason for r in emulator.records] == ["ok", "plaintext"]


# -- the relay --------------------------------------------------------------------------------


async def test_relay_runs_copy_in_both_directions(
    rds_emulator: RDSIAMEmulator, make_token: TokenFactory
) -> None:
    """COPY FROM STDIN and COPY TO STDOUT pass through the relay unchanged."""
    conn = await connect(rds_emulator, make_token())
    try:
        await conn.execute("CREATE TEMP TABLE items (id int PRIMARY KEY, name text, data bytea)")
        records = [
            (i, f"name-{i}-é", hashlib.sha256(str(i).encode()).digest()) for i in range(5000)
        ]
        await conn.copy_records_to_table("items", records=records)
        csv = "".join(f"{i},csv-{i}\n" for i in range(5000, 6000)).encode()
        await conn.copy_to_table(
            "items", source=io.BytesIO(csv), columns=["id", "name"], format="csv"
        )
        out = io.BytesIO()
        await conn.copy_from_query(
            "SELECT id, name FROM items WHERE id >= 5000 ORDER BY id", output=out, format="csv"
        )
        assert out.getvalue() == csv
        rows = await conn.fetch("SELECT id, name, data FROM items WHERE id < 5000 ORDER BY id")
        assert [tuple(row) for row in rows] == records
    finally:
        await conn.close()


async def test_relay_carries_large_result_without_corruption(
    rds_emulator: RDSIAMEmulator, make_token: TokenFactory
) -> None:
    """A 100k-row result and a multi-megabyte value arrive intact."""
    conn = await connect(rds_emulator, make_token())
    try:
        rows = await conn.fetch("SELECT g, md5(g::text) FROM generate_series(1, 100000) g")
        assert len(rows) == 100000
        assert all(row[1] == hashlib.md5(str(row[0]).encode()).hexdigest() for row in rows)
        blob = await conn.fetchval(
            "SELECT string_agg(md5(g::text), '' ORDER BY g) FROM generate_series(1, 200000) g"
        )
        expected = "".join(hashlib.md5(str(g).encode()).hexdigest() for g in range(1, 200001))
        assert blob == expected
        echoed = await conn.fetchval("SELECT $1::bytea", bytes(range(256)) * 20000)
        assert echoed == bytes(range(256)) * 20000
    finally:
        await conn.close()


async def test_cancel_request_reaches_the_backend(
    rds_emulator: RDSIAMEmulator, make_token: TokenFactory
) -> None:
    """A query timeout's CancelRequest is relayed, so the connection is usable again."""
    conn = await connect(rds_emulator, make_token())
    try:
        with pytest.raises(asyncio.TimeoutError):
            await conn.execute("SELECT pg_sleep(60)", timeout=0.2)
        assert await conn.fetchval("SELECT 1", timeout=20) == 1
    finally:
        await conn.close()
    assert rds_emulator.backend_connections_total == 2  # the login and the cancel


async def test_lists_relayed_connections_and_forgets_closed_ones(
    rds_emulator: RDSIAMEmulator, make_token: TokenFactory
) -> None:
    """Open relayed connections are listed with their backend pid until they close."""
    first = await connect(rds_emulator, make_token())
    second = await connect(rds_emulator, make_token())
    pids = {await first.fetchval("SELECT pg_backend_pid()")}
    pids.add(await second.fetchval("SELECT pg_backend_pid()"))
    relayed = rds_emulator.relayed_connections()
    assert {item.backend_pid for item in relayed} == pids
    assert rds_emulator.open_connections == 2
    await first.close()
    await second.close()
    await eventually(lambda: rds_emulator.open_connections == 0)
    assert rds_emulator.relayed_connections() == []
    assert rds_emulator.connections_total == 2


# -- faults -----------------------------------------------------------------------------------


async def test_reject_next_refuses_that_many_logins(
    rds_emulator: RDSIAMEmulator, make_token: TokenFactory
) -> None:
    """reject_next(2) fails exactly the next two valid logins."""
    rds_emulator.reject_next(2)
    for _ in range(2):
        await assert_rejected(rds_emulator, make_token(), "fault_reject")
    conn = await connect(rds_emulator, make_token())
    await conn.close()
    assert [r.reason for r in rds_emulator.records] == ["fault_reject", "fault_reject", "ok"]


async def test_drop_all_connections_breaks_open_connections(
    rds_emulator: RDSIAMEmulator, make_token: TokenFactory
) -> None:
    """Dropped connections fail on next use; new logins still work."""
    conn = await connect(rds_emulator, make_token())
    assert rds_emulator.drop_all_connections() == 1
    with pytest.raises((asyncpg.ConnectionDoesNotExistError, asyncpg.InterfaceError, OSError)):
        await conn.fetchval("SELECT 1")
    conn.terminate()
    fresh = await connect(rds_emulator, make_token())
    assert await fresh.fetchval("SELECT 1") == 1
    await fresh.close()


async def test_throttle_rejects_logins_beyond_the_rate(postgres_server: PostgresServer) -> None:
    """With a cap of 2 a second, the third login in one second is throttled, the next second not."""
    clock = ManualClock(dt.datetime.now(dt.timezone.utc))
    key = AccessKey("AKIATHROTTLETEST0001", "throttle-secret")
    async with RDSIAMEmulator(
        backend_host=postgres_server.host,
        backend_port=postgres_server.port,
        backend_password=postgres_server.password,
        clock=clock,
        iam_users=["postgres"],
    ) as emulator:
        emulator.register_key(key.access_key, key.secret_key)
        emulator.max_logins_per_second = 2

        def token() -> str:
            return botocore_token(
                key,
                host=emulator.endpoint,
                port=emulator.port,
                user="postgres",
                region=emulator.region,
            )

        outcomes = []
        for _ in range(4):
            try:
                conn = await connect(emulator, token())
            except asyncpg.InvalidAuthorizationSpecificationError as exc:
                outcomes.append(str(exc))
            else:
                outcomes.append("ok")
                await conn.close()
        await clock.advance(1)
        conn = await connect(emulator, token())
        await conn.close()
    assert outcomes == ["ok", "ok", PAM.format("postgres"), PAM.format("postgres")]
    assert [r.reason for r in emulator.records] == ["ok", "ok", "throttled", "throttled", "ok"]
    assert sorted(emulator.login_attempts_per_second.values()) == [1, 4]
    assert emulator.max_login_attempts_in_one_second == 4


async def test_latency_holds_the_login_answer_until_the_clock_passes(
    postgres_server: PostgresServer,
) -> None:
    """With latency set, a login is answered only after that much emulator-clock time."""
    clock = ManualClock(dt.datetime.now(dt.timezone.utc))
    key = AccessKey("AKIALATENCYTEST00001", "latency-secret")
    async with RDSIAMEmulator(
        backend_host=postgres_server.host,
        backend_port=postgres_server.port,
        backend_password=postgres_server.password,
        clock=clock,
        iam_users=["postgres"],
    ) as emulator:
        emulator.register_key(key.access_key, key.secret_key)
        emulator.latency = 5.0
        token = botocore_token(
            key, host=emulator.endpoint, port=emulator.port, user="postgres", region=emulator.region
        )
        login = asyncio.ensure_future(connect(emulator, token))
        await eventually(lambda: emulator.password_messages == 1)
        await clock.advance(4)
        assert not login.done()
        assert emulator.records == []
        await clock.advance(1)
        conn = await login
        await conn.close()
        assert emulator.records[-1].reason == "ok"


async def test_pause_accepting_holds_new_connections_until_resumed(
    rds_emulator: RDSIAMEmulator, make_token: TokenFactory
) -> None:
    """While paused, a new connection gets no answer; resuming serves it."""
    rds_emulator.pause_accepting()
    assert not rds_emulator.accepting
    login = asyncio.ensure_future(connect(rds_emulator, make_token()))
    await eventually(lambda: rds_emulator.connections_total == 1)
    await asyncio.sleep(0.05)
    assert not login.done()
    assert rds_emulator.password_messages == 0
    rds_emulator.resume_accepting()
    conn = await login
    await conn.close()
    assert rds_emulator.logins_accepted == 1


async def test_stop_ends_open_connections(
    postgres_server: PostgresServer, rds_access_key: AccessKey
) -> None:
    """Stopping the emulator closes relayed connections and its listener."""
    emulator = RDSIAMEmulator(
        backend_host=postgres_server.host,
        backend_port=postgres_server.port,
        backend_password=postgres_server.password,
        iam_users=["postgres"],
    )
    emulator.register_key(rds_access_key.access_key, rds_access_key.secret_key)
    await emulator.start()
    token = botocore_token(
        rds_access_key,
        host=emulator.endpoint,
        port=emulator.port,
        user="postgres",
        region=emulator.region,
    )
    conn = await connect(emulator, token)
    await emulator.stop()
    assert emulator.open_connections == 0
    with pytest.raises((asyncpg.ConnectionDoesNotExistError, asyncpg.InterfaceError, OSError)):
        await conn.fetchval("SELECT 1")
    conn.terminate()
    with pytest.raises(ConnectionRefusedError):
        await connect(emulator, token)


# -- configuration and hygiene ----------------------------------------------------------------


def test_region_comes_from_the_endpoint() -> None:
    """The region is parsed from the RDS endpoint name, including China's."""
    emulator = RDSIAMEmulator(backend_host="127.0.0.1", backend_port=1)
    assert (emulator.endpoint, emulator.region) == (DEFAULT_ENDPOINT, "us-east-1")
    china = RDSIAMEmulator(
        backend_host="127.0.0.1",
        backend_port=1,
        endpoint="db.abcdefghijkl.cn-north-1.rds.amazonaws.com.cn",
    )
    assert china.region == "cn-north-1"


def test_endpoint_without_region_needs_one() -> None:
    """A CNAME-like endpoint without an explicit region is a configuration error."""
    with pytest.raises(ValueError, match="region"):
        RDSIAMEmulator(backend_host="127.0.0.1", backend_port=1, endpoint="db.internal")
    assert (
        RDSIAMEmulator(
            backend_host="127.0.0.1", backend_port=1, endpoint="db.internal", region="eu-west-1"
        ).region
        == "eu-west-1"
    )


def test_ca_file_holds_the_ca_pem() -> None:
    """ca_path is a PEM file with the CA that signed the emulator's certificate."""
    emulator = RDSIAMEmulator(backend_host="127.0.0.1", backend_port=1)
    with open(emulator.ca_path) as file:
        assert file.read() == emulator.ca_pem
    assert emulator.ca_pem.startswith("-----BEGIN CERTIFICATE-----")


async def test_certificate_names_the_endpoint_and_loopback(
    rds_emulator: RDSIAMEmulator, make_token: TokenFactory
) -> None:
    """The certificate verifies for localhost and ::1-style names as well as 127.0.0.1."""
    conn = await connect(rds_emulator, make_token(), host="localhost")
    await conn.close()
    assert rds_emulator.logins_accepted == 1


async def test_no_secret_reaches_logs_reprs_or_records(
    rds_emulator: RDSIAMEmulator,
    make_token: TokenFactory,
    rds_access_key: AccessKey,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Tokens, secret keys and session tokens never appear in logs, reprs or records."""
    caplog.set_level(logging.DEBUG, logger="asyncpg_iam")
    session_key = AccessKey("ASIAHYGIENETEST00001", "hygiene-secret-key", "hygiene-session-tok")
    rds_emulator.register_key(
        session_key.access_key, session_key.secret_key, session_key.session_token
    )
    tokens = [make_token(), make_token(key=session_key)]
    conn = await connect(rds_emulator, tokens[0])
    await conn.close()
    await assert_closed_rejection(
        lambda: connect(rds_emulator, make_token(key=AccessKey("AKIABAD", "x")))
    )
    rds_emulator.clock_offset = 2000
    await assert_closed_rejection(lambda: connect(rds_emulator, tokens[1]))
    ours = [r.getMessage() for r in caplog.records if r.name.startswith("asyncpg_iam")]
    reprs = [rds_emulator, rds_emulator.records, rds_access_key, session_key]
    text = "\n".join(ours + [repr(item) for item in reprs])
    signatures = [token.rsplit("X-Amz-Signature=", 1)[1] for token in tokens]
    for secret in [
        rds_access_key.secret_key,
        session_key.secret_key,
        "hygiene-session-tok",
        *tokens,
        *signatures,
    ]:
        assert secret not in text
    assert "reason=expired" in text  # the emulator's log was captured at all


async def assert_closed_rejection(attempt: Callable[[], Awaitable[Any]]) -> None:
    with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError):
        await attempt()


async def test_ensure_role_lets_a_new_iam_user_log_in(
    rds_emulator: RDSIAMEmulator, make_token: TokenFactory
) -> None:
    """ensure_role() creates the backend role, so an IAM-enabled new user can log in."""
    await rds_emulator.ensure_role("app_iam_user")
    await rds_emulator.ensure_role("app_iam_user")  # idempotent
    rds_emulator.enable_iam_user("app_iam_user")
    conn = await connect(rds_emulator, make_token(user="app_iam_user"), user="app_iam_user")
    try:
        assert await conn.fetchval("SELECT current_user") == "app_iam_user"
    finally:
        await conn.close()
    assert rds_emulator.records[-1].user == "app_iam_user"


@pytest.mark.parametrize("method", ["scram-sha-256", "md5", "password"])
async def test_backend_password_answers_the_backends_auth_request(method: str) -> None:
    """backend_password logs the relay in to a password backend; a wrong one relays its error."""
    with PostgresCluster() as cluster:
        admin = await asyncpg.connect(cluster.dsn, ssl=False)
        encryption = "md5" if method == "md5" else "scram-sha-256"
        await admin.execute(
            f"SET password_encryption = '{encryption}'; CREATE ROLE app LOGIN PASSWORD 'pw'"
        )
        (cluster.data_dir / "pg_hba.conf").write_text(
            f"local all all trust\nhost all postgres 127.0.0.1/32 trust\n"
            f"host all app 127.0.0.1/32 {method}\n"
        )
        await admin.execute("SELECT pg_reload_conf()")
        await admin.close()
        outcomes = []
        for password in ("pw", "wrong"):
            async with RDSIAMEmulator(
                backend_host=cluster.host,
                backend_port=cluster.port,
                backend_password=password,
                accept_any_password=True,
            ) as emulator:
                try:
                    conn = await connect(emulator, "static", user="app")
                except asyncpg.InvalidPasswordError as exc:
                    outcomes.append((str(exc), emulator.records[-1].reason))
                else:
                    outcomes.append((await conn.fetchval("SELECT current_user"), "ok"))
                    await conn.close()
    assert outcomes == [
        ("app", "ok"),
        ('password authentication failed for user "app"', "backend_error"),
    ]
