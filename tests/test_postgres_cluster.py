"""The throwaway PostgreSQL cluster and the test-backend selection of the pytest plugin."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
from pathlib import Path

import asyncpg
import pytest

from asyncpg_iam import testing
from asyncpg_iam.testing import (
    PostgresCluster,
    PostgresNotFoundError,
    PostgresServer,
    find_postgres_bin,
)
from asyncpg_iam.testing import pytest_plugin as plugin


async def _ssl_query(cluster: PostgresCluster, sql: str) -> object:
    conn = await asyncpg.connect(cluster.dsn, ssl=cluster.client_ssl_context(), timeout=30)
    try:
        return await conn.fetchval(sql)
    finally:
        await conn.close()


def test_cluster_serves_tls_with_its_ca_and_cleans_up() -> None:
    """A started cluster serves verified TLS with fsync off; leaving the block removes it all."""
    with PostgresCluster() as cluster:
        assert cluster.running
        data_dir = cluster.data_dir
        ssl_used = asyncio.run(
            _ssl_query(cluster, "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        )
        assert ssl_used is True
        assert asyncio.run(_ssl_query(cluster, "SHOW fsync")) == "off"
        assert Path(cluster.ca_path).read_text() == cluster.ca_pem
        if os.geteuid() == 0:
            owner = pwd.getpwuid(data_dir.stat().st_uid).pw_name
            assert owner == "postgres"
        port = cluster.port
    assert not data_dir.exists()
    assert not cluster.running
    with pytest.raises(ConnectionRefusedError):
        asyncio.run(asyncpg.connect(host="127.0.0.1", port=port, user="postgres", timeout=5))


def test_cluster_is_removed_when_the_block_fails() -> None:
    """An exception inside the with block still stops the server and removes the directory."""
    with contextlib.suppress(RuntimeError), PostgresCluster() as cluster:
        data_dir = cluster.data_dir
        raise RuntimeError("a failing test")
    assert not data_dir.exists()


def test_start_stop_api_and_double_stop() -> None:
    """start() returns the cluster; stop() may be called twice; the dsn names it."""
    cluster = PostgresCluster(database="app").start()
    try:
        assert cluster.server == PostgresServer(
            host="127.0.0.1",
            port=cluster.port,
            user="postgres",
            database="app",
            kind="local",
            ca_path=cluster.ca_path,
        )
        assert cluster.dsn == f"postgresql://postgres@127.0.0.1:{cluster.port}/app"

        async def current_database() -> object:
            conn = await asyncpg.connect(cluster.dsn, ssl=False, timeout=30)
            try:
                return await conn.fetchval("SELECT current_database()")
            finally:
                await conn.close()

        assert asyncio.run(current_database()) == "app"
    finally:
        cluster.stop()
        cluster.stop()
    with pytest.raises(RuntimeError, match="not started"):
        _ = cluster.port


def test_find_postgres_bin_prefers_path_then_newest_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without initdb on PATH the newest versioned directory wins; with none, a clear error."""
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    for version in ("9.6", "15", "13"):
        bin_dir = tmp_path / version / "bin"
        bin_dir.mkdir(parents=True)
        (bin_dir / "initdb").write_text("")
    assert find_postgres_bin(search_root=tmp_path) == tmp_path / "15" / "bin"
    with pytest.raises(PostgresNotFoundError, match="apt-get install -y postgresql"):
        find_postgres_bin(search_root=tmp_path / "nothing")


def test_found_binaries_include_pg_ctl() -> None:
    """On this machine the located directory holds initdb and pg_ctl."""
    bin_dir = find_postgres_bin()
    assert (bin_dir / "initdb").exists()
    assert (bin_dir / "pg_ctl").exists()


def test_server_dsn_quotes_and_repr_hides_password() -> None:
    """A backend description quotes its DSN and keeps the password out of its repr."""
    server = PostgresServer(
        host="db", port=5433, user="a b", database="d", kind="dsn", password="p@ss/word"
    )
    assert server.dsn == "postgresql://a%20b:p%40ss%2Fword@db:5433/d"
    assert "p@ss" not in repr(server)


def test_dsn_backend_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """ASYNCPG_IAM_TEST_DSN names the backend, password included."""
    monkeypatch.setenv(plugin.DSN_VARIABLE, "postgresql://app:secret@db.example:6543/appdb")
    with contextlib.ExitStack() as stack:
        server = plugin.select_backend(stack)
    assert server == PostgresServer(
        host="db.example", port=6543, user="app", database="appdb", kind="dsn", password="secret"
    )


def test_unknown_forced_backend_is_explained(monkeypatch: pytest.MonkeyPatch) -> None:
    """A forced backend name that does not exist lists the ones that do."""
    monkeypatch.setenv(plugin.BACKEND_VARIABLE, "cloud")
    with pytest.raises(plugin.BackendUnavailable, match="dsn, local, container"):
        plugin.select_backend(contextlib.ExitStack())


def test_no_backend_skip_message_says_how_to_get_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """When every provider declines, the message names the ways to get a PostgreSQL."""

    def decline(stack: contextlib.ExitStack) -> PostgresServer:
        raise plugin.BackendUnavailable("not here")

    monkeypatch.setattr(plugin, "BACKEND_PROVIDERS", {"a": decline, "b": decline})
    monkeypatch.delenv(plugin.BACKEND_VARIABLE, raising=False)
    with pytest.raises(plugin.BackendUnavailable) as info:
        plugin.select_backend(contextlib.ExitStack())
    message = str(info.value)
    assert "apt-get install -y postgresql" in message
    assert "ASYNCPG_IAM_TEST_DSN" in message
    assert "a: not here; b: not here" in message


def test_container_backend_declines_without_docker_engine(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With no Docker engine answering, the container provider declines instead of failing."""
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/docker.sock")
    with pytest.raises(plugin.BackendUnavailable), contextlib.ExitStack() as stack:
        plugin.container_backend(stack)


def test_session_backend_is_described(postgres_server: PostgresServer) -> None:
    """The session fixture hands out a reachable backend description."""
    assert postgres_server.kind in {"dsn", "local", "container"}
    assert postgres_server.port > 0


def test_all_lists_the_public_names() -> None:
    """asyncpg_iam.testing's __all__ is exactly its public names, sorted."""
    public = {name for name in vars(testing) if not name.startswith("_")}
    public -= {"annotations", "pytest_plugin"}
    assert set(testing.__all__) == public
