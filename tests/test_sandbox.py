"""`asyncpg_iam.testing.Sandbox`: the whole local stack started, reached and stopped as one."""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

import asyncpg
import pytest

import asyncpg_iam
from asyncpg_iam import ConfigurationError, Credentials, IAMAuthenticationError
from asyncpg_iam.testing import (
    AccessKey,
    ManualClock,
    PostgresServer,
    Sandbox,
    isolated_aws_environment,
)

_KEY = AccessKey("AKIASANDBOXTESTKEY01", "sandbox-secret-" + "s" * 25)


async def test_pool_logs_in_with_credential_server_keys_and_environment_is_restored(
    postgres_server: PostgresServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Inside the block the default chain finds the sandbox's keys only; outside, the old env."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAHOSTKEYNOTTOUSE1")
    monkeypatch.setenv("AWS_PROFILE", "host-profile")
    before = dict(os.environ)
    async with Sandbox(server=postgres_server) as sandbox:
        assert sandbox.credential_server is not None
        assert os.environ["AWS_CONTAINER_CREDENTIALS_FULL_URI"] == sandbox.credential_server.url
        assert "AWS_ACCESS_KEY_ID" not in os.environ
        assert "AWS_PROFILE" not in os.environ
        assert os.environ["ASYNCPG_IAM_CA_BUNDLE"] == sandbox.ca_path
        async with asyncpg_iam.create_pool(**sandbox.pool_kwargs(min_size=1)) as pool:
            assert await pool.fetchval("SELECT current_user") == postgres_server.user
        emulator = sandbox.emulator
        assert emulator.logins_accepted >= 1
        assert emulator.logins_rejected == 0, [r.reason for r in emulator.records]
        assert sandbox.credential_server.requests >= 1
    assert dict(os.environ) == before


async def test_static_key_without_credential_server_leaves_environ_alone(
    postgres_server: PostgresServer,
) -> None:
    """A static key is trusted; without isolation os.environ is untouched; the DSN works."""
    before = dict(os.environ)
    sandbox = Sandbox(
        server=postgres_server,
        access_key=_KEY,
        credential_server=False,
        isolate_environment=False,
    )
    async with sandbox:
        assert dict(os.environ) == before
        assert sandbox.credential_server is None
        assert sandbox.cluster is None
        env = sandbox.environment()
        assert env["AWS_ACCESS_KEY_ID"] == _KEY.access_key
        assert "AWS_CONTAINER_CREDENTIALS_FULL_URI" not in env
        iam = sandbox.iam_auth(credentials=Credentials(_KEY.access_key, _KEY.secret_key))
        assert iam.signing_host == sandbox.emulator.endpoint
        async with asyncpg_iam.create_pool(dsn=sandbox.dsn, iam=iam, min_size=0) as pool:
            assert await pool.fetchval("SELECT 1") == 1
        assert sandbox.emulator.logins_accepted == 1
    assert dict(os.environ) == before


async def test_added_emulator_shares_the_backend_and_stops_with_the_sandbox(
    postgres_server: PostgresServer,
) -> None:
    """add_emulator() fronts the same PostgreSQL and is stopped on exit, with the first one."""
    async with Sandbox(server=postgres_server, credential_server=False) as sandbox:
        extra = await sandbox.add_emulator(accept_any_password=True)
        assert extra.port != sandbox.port
        assert extra.backend_port == sandbox.emulator.backend_port == postgres_server.port
        con = await asyncpg.connect(
            password="anything", **extra.connect_kwargs(user=postgres_server.user)
        )
        try:
            assert await con.fetchval("SELECT 1") == 1
        finally:
            await con.close()
        ports = [extra.port, sandbox.port]
    for port in ports:
        with pytest.raises(ConnectionRefusedError):
            await asyncpg.connect(host="127.0.0.1", port=port, user="x", timeout=5)


async def test_own_cluster_with_settings_and_iam_users_is_removed_on_exit() -> None:
    """Without a server it starts a cluster with the settings; IAM users log in; data removed."""
    async with Sandbox(postgres_settings={"max_connections": "42"}, iam_users=["alice"]) as sb:
        assert sb.cluster is not None
        data_dir = sb.cluster.data_dir
        assert data_dir.is_dir()
        async with asyncpg_iam.create_pool(**sb.pool_kwargs(min_size=0)) as pool:
            assert await pool.fetchval("SHOW max_connections") == "42"
        async with asyncpg_iam.create_pool(**sb.pool_kwargs(user="alice", min_size=0)) as pool:
            assert await pool.fetchval("SELECT current_user") == "alice"
        assert sb.emulator.logins_rejected == 0, [r.reason for r in sb.emulator.records]
    assert not data_dir.exists()
    with pytest.raises(RuntimeError, match="not running"):
        _ = sb.emulator


async def test_sts_keys_of_an_assumed_role_are_trusted(postgres_server: PostgresServer) -> None:
    """With sts=True the chain reaches moto's STS and the emulator trusts assumed-role keys."""
    async with Sandbox(server=postgres_server, sts=True) as sandbox:
        assert sandbox.sts is not None
        assert os.environ["AWS_ENDPOINT_URL_STS"] == sandbox.sts.endpoint_url
        role = sandbox.sts.create_role("sandbox-db")
        kwargs = sandbox.pool_kwargs(min_size=0, iam=sandbox.iam_auth(role_arn=role))
        async with asyncpg_iam.create_pool(**kwargs) as pool:
            assert await pool.fetchval("SELECT 1") == 1
        accepted = [r for r in sandbox.emulator.records if r.accepted]
        assert accepted
        assert all(r.access_key.startswith("ASIA") for r in accepted)


async def test_the_emulator_reads_time_from_the_given_clock(
    postgres_server: PostgresServer,
) -> None:
    """With a clock an hour ahead, a token signed now is rejected as expired."""
    clock = ManualClock(dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=1))
    sandbox = Sandbox(server=postgres_server, access_key=_KEY, credential_server=False, clock=clock)
    async with sandbox:
        iam = sandbox.iam_auth(credentials=Credentials(_KEY.access_key, _KEY.secret_key))
        with pytest.raises(IAMAuthenticationError):
            async with asyncpg_iam.create_pool(**sandbox.pool_kwargs(iam=iam, min_size=1)):
                pass
        assert [r.reason for r in sandbox.emulator.records] == ["expired"]


def test_settings_that_cannot_apply_are_refused() -> None:
    """postgres_settings with a given server, a bad port or lifetime: ConfigurationError."""
    server = PostgresServer(host="127.0.0.1", port=5432, user="u", database="d", kind="dsn")
    with pytest.raises(ConfigurationError, match="postgres_settings"):
        Sandbox(server=server, postgres_settings={"max_connections": "5"})
    with pytest.raises(ConfigurationError, match="port"):
        Sandbox(port=70000)
    with pytest.raises(ConfigurationError, match="credential_lifetime"):
        Sandbox(credential_lifetime=0)


def test_isolated_aws_environment_hides_the_host_and_restores_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The block sees no host credentials, empty config files and extra variables; then not."""
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "host-secret-not-to-use")
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    before = dict(os.environ)
    with isolated_aws_environment(region="eu-west-1", variables={"AWS_MAX_ATTEMPTS": "2"}) as d:
        assert isinstance(d, Path)
        assert d.is_dir()
        assert not any(d.iterdir())
        assert "AWS_SECRET_ACCESS_KEY" not in os.environ
        assert "HTTPS_PROXY" not in os.environ
        assert os.environ["AWS_CONFIG_FILE"] == str(d / "config")
        assert os.environ["AWS_EC2_METADATA_DISABLED"] == "true"
        assert os.environ["AWS_REGION"] == "eu-west-1"
        assert os.environ["AWS_MAX_ATTEMPTS"] == "2"
    assert dict(os.environ) == before
    assert not d.exists()
