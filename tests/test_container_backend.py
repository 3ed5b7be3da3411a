"""The container lane talks to a PostgreSQL inside a container, never to a silent fallback."""

from __future__ import annotations

import ipaddress
import os
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import asyncpg_iam
from asyncpg_iam.testing import PostgresServer, RDSIAMEmulator
from asyncpg_iam.testing import pytest_plugin as plugin
from tests._support import pool_kwargs


def container_lane() -> bool:
    """Whether this run asked for the container backend explicitly."""
    return os.environ.get(plugin.BACKEND_VARIABLE) == "container"


@pytest.fixture
def container(postgres_server: PostgresServer) -> Any:
    """The testcontainers container behind the session's server.

    In the container lane a server that is not in a container fails the test; elsewhere it skips.
    """
    found = plugin.backend_container(postgres_server)
    if postgres_server.kind == "container" and found is not None:
        return found
    message = f"the session's PostgreSQL is not in a container: {postgres_server!r}"
    if container_lane():
        pytest.fail(f"{plugin.BACKEND_VARIABLE}=container, yet {message}")
    pytest.skip(f"{message} (run with {plugin.BACKEND_VARIABLE}=container)")


def inspect(container: Any) -> dict[str, Any]:
    """Return the engine's current description of the container (docker inspect)."""
    wrapped = container.get_wrapped_container()
    wrapped.reload()
    attrs: dict[str, Any] = wrapped.attrs
    return attrs


@pytest.mark.containers
def test_container_lane_runs_on_a_container(postgres_server: PostgresServer) -> None:
    """With ASYNCPG_IAM_TEST_BACKEND=container the session's server is a running container."""
    if not container_lane():
        pytest.skip(f"not the container lane ({plugin.BACKEND_VARIABLE}=container is not set)")
    assert postgres_server.kind == "container"
    container = plugin.backend_container(postgres_server)
    assert container is not None
    attrs = inspect(container)
    assert attrs["State"]["Running"] is True
    wanted = os.environ.get(plugin.PG_IMAGE_VARIABLE) or plugin.DEFAULT_PG_IMAGE
    assert attrs["Config"]["Image"] == wanted


@pytest.mark.containers
async def test_server_answers_from_inside_the_container(
    container: Any, iam_emulator: RDSIAMEmulator, postgres_server: PostgresServer
) -> None:
    """Through the emulator, the server's address and data directory are the container's own."""
    attrs = inspect(container)
    networks = attrs["NetworkSettings"].get("Networks") or {}
    container_ips = {net.get("IPAddress") for net in networks.values()}
    container_ips.add(attrs["NetworkSettings"].get("IPAddress"))
    container_ips.discard(None)
    container_ips.discard("")
    env = dict(item.split("=", 1) for item in attrs["Config"]["Env"] or [])
    async with asyncpg_iam.create_pool(
        **pool_kwargs(iam_emulator, postgres_server, max_size=2)
    ) as pool:
        row = await pool.fetchrow(
            "SELECT host(inet_server_addr()) AS addr, current_setting('data_directory') AS data"
        )
    assert row is not None
    # A local cluster answers on loopback from a temporary directory on this machine.
    assert not ipaddress.ip_address(row["addr"]).is_loopback
    if container_ips:  # some rootless engines do not report an address
        assert row["addr"] in container_ips
    assert row["data"] == env.get("PGDATA", "/var/lib/postgresql/data")
    assert iam_emulator.logins_accepted >= 1


@pytest.mark.containers
async def test_emulator_session_is_seen_inside_the_container(
    container: Any, iam_emulator: RDSIAMEmulator, postgres_server: PostgresServer
) -> None:
    """A session opened through the emulator shows in the container's own pg_stat_activity."""
    marker = f"asyncpg_iam_probe_{secrets.token_hex(8)}"
    query = f"SELECT count(*) FROM pg_stat_activity WHERE application_name = '{marker}'"
    psql = ["psql", "-X", "-t", "-A", "-U", postgres_server.user, "-d", postgres_server.database]
    kwargs = pool_kwargs(
        iam_emulator, postgres_server, max_size=2, server_settings={"application_name": marker}
    )
    async with asyncpg_iam.create_pool(**kwargs) as pool, pool.acquire() as con:
        assert await con.fetchval("SELECT current_setting('application_name')") == marker
        result = container.exec([*psql, "-c", query])
        assert result.exit_code == 0, result.output.decode(errors="replace")
        assert result.output.decode().strip() == "1"


PROBE_ARGS = ["-p", "no:cacheprovider", "-rs", "test_probe.py"]


def test_forced_container_backend_without_engine_fails_instead_of_skipping(
    tmp_path: Path,
) -> None:
    """A forced container backend with no engine errors the tests and names the engine and image."""
    (tmp_path / "test_probe.py").write_text(
        "def test_probe(postgres_server):\n    assert postgres_server.kind == 'container'\n"
    )
    env = {
        **os.environ,
        plugin.BACKEND_VARIABLE: "container",
        plugin.PG_IMAGE_VARIABLE: "example.invalid/pg:probe",
        "DOCKER_HOST": f"unix://{tmp_path}/no-engine.sock",
    }
    env.pop(plugin.DSN_VARIABLE, None)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "asyncpg_iam.testing.pytest_plugin", *PROBE_ARGS],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "1 error" in out
    assert "skipped" not in out
    assert "testcontainers PostgreSQL (example.invalid/pg:probe)" in out  # the header
    assert f"no Docker engine answers at unix://{tmp_path}/no-engine.sock" in out
