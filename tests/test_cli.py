"""The installed `asyncpg-iam` console script end to end: token, psql, ca-bundle, emulate, demo."""

from __future__ import annotations

import asyncio
import http.server
import os
import re
import shutil
import signal
import ssl
import stat
import threading
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
import trustme

from asyncpg_iam import _tls
from asyncpg_iam.testing import CredentialServer, MotoSTS, PostgresServer, RDSIAMEmulator
from tests._support import console_script, run_cli


def read_lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def listdir(path: Path) -> list[str]:
    return [entry.name for entry in path.iterdir()]


def exists(path: str) -> bool:
    return os.path.exists(path)


def target_args(emulator: RDSIAMEmulator, server: PostgresServer) -> list[str]:
    return [
        "--host",
        emulator.host,
        "--port",
        str(emulator.port),
        "--user",
        server.user,
        "--signing-host",
        emulator.endpoint,
    ]


# -- token --------------------------------------------------------------------------------------


async def test_token_logs_in(iam_emulator: RDSIAMEmulator, postgres_server: PostgresServer) -> None:
    """`token` prints one token that the emulator accepts as the password."""
    code, out, err = await run_cli("token", *target_args(iam_emulator, postgres_server))
    assert code == 0, err
    token = out.strip()
    assert "\n" not in token
    assert token.startswith(f"{iam_emulator.endpoint}:{iam_emulator.port}/?Action=connect&DBUser=")
    assert token not in err
    conn = await asyncpg.connect(
        **iam_emulator.connect_kwargs(user=postgres_server.user, database=postgres_server.database),
        password=token,
    )
    try:
        assert await conn.fetchval("SELECT 1") == 1
    finally:
        await conn.close()
    assert iam_emulator.records[-1].reason == "ok"


async def test_token_assumes_the_role(
    iam_emulator: RDSIAMEmulator,
    postgres_server: PostgresServer,
    credential_server: CredentialServer,
    moto_sts: MotoSTS,
) -> None:
    """`token --role-arn` signs with the assumed role's key, not the source credentials."""
    role = moto_sts.create_role("cli-token-role")
    env = {**os.environ, **moto_sts.env()}
    code, out, err = await run_cli(
        "token",
        *target_args(iam_emulator, postgres_server),
        "--role-arn",
        role,
        "--role-session-name",
        "cli-test",
        "--duration",
        "900",
        env=env,
    )
    assert code == 0, err
    query = urllib.parse.parse_qs(out.strip().split("?", 1)[1])
    signing_key = query["X-Amz-Credential"][0].split("/")[0]
    assert signing_key.startswith("ASIA")
    assert signing_key not in credential_server.issued


async def test_token_rejects_role_options_without_a_role() -> None:
    """Role options without --role-arn exit with status 2 and say what to pass."""
    code, out, err = await run_cli(
        "token", "--host", "db.example.com", "--user", "app", "--role-session-name", "x1"
    )
    assert code == 2
    assert out == ""
    assert "role_arn" in err


# -- psql ---------------------------------------------------------------------------------------


async def test_psql_runs_a_query(
    iam_emulator: RDSIAMEmulator, postgres_server: PostgresServer
) -> None:
    """`psql` runs the real psql over verify-full TLS with the token, and the query answers."""
    if shutil.which("psql") is None:
        pytest.skip("psql is not installed")
    env = {**os.environ, "PGSSLROOTCERT": iam_emulator.ca_path}
    code, out, err = await run_cli(
        "psql",
        *target_args(iam_emulator, postgres_server),
        "--dbname",
        postgres_server.database,
        "--",
        "-tAc",
        "SELECT current_user || '/' || (SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid())",
        env=env,
    )
    assert code == 0, err
    # The emulator relays to the backend over plain TCP; the client side is TLS.
    assert out.strip() == f"{postgres_server.user}/false"
    assert iam_emulator.records[-1].reason == "ok"


async def test_psql_keeps_the_token_out_of_argv(
    iam_emulator: RDSIAMEmulator, postgres_server: PostgresServer, tmp_path: Path
) -> None:
    """psql gets the token in a scoped password file only (not argv, not PGPASSWORD), and a
    connection string with sslmode=verify-full and the CA bundle as its last --dbname."""
    record = tmp_path / "record"
    fake = tmp_path / "psql"
    fake.write_text(
        "#!/bin/sh\n"
        f'printf "%s\\n" "$@" > {record}.argv\n'
        f"env > {record}.env\n"
        'for a in "$@"; do case "$a" in --dbname=*) '
        "f=${a#*passfile=\\'}; f=${f%%\\'*}; "
        f'cp "$f" {record}.pgpass;; esac; done\n'
    )
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    env = {**os.environ, "PGSSLROOTCERT": iam_emulator.ca_path}
    code, out, err = await run_cli(
        "psql",
        *target_args(iam_emulator, postgres_server),
        "--psql",
        str(fake),
        "--",
        "-c",
        "x",
        env=env,
    )
    assert code == 0, err
    argv = read_lines(Path(f"{record}.argv"))
    assert argv[:2] == ["-c", "x"]
    assert len(argv) == 4
    assert argv[2] == argv[3]
    conninfo = argv[2]
    assert "sslmode='verify-full'" in conninfo
    assert f"sslrootcert='{iam_emulator.ca_path}'" in conninfo
    assert f"host='{iam_emulator.host}'" in conninfo
    assert "Action=connect" not in conninfo
    seen = dict(line.split("=", 1) for line in read_lines(Path(f"{record}.env")) if "=" in line)
    assert "PGPASSWORD" not in seen
    assert "PGSSLROOTCERT" not in seen
    host, port, _database, user, token = read_lines(Path(f"{record}.pgpass"))[0].split(":", 4)
    assert (host, port, user) == (iam_emulator.host, str(iam_emulator.port), postgres_server.user)
    assert token.startswith(f"{iam_emulator.endpoint}\\:{iam_emulator.port}/?Action=connect")
    assert token not in out + err


async def test_psql_missing(iam_emulator: RDSIAMEmulator, postgres_server: PostgresServer) -> None:
    """Without psql the command says how to install it and exits 1, before signing anything."""
    code, _out, err = await run_cli(
        "psql", *target_args(iam_emulator, postgres_server), "--psql", "no-such-psql-here"
    )
    assert code == 1
    assert "was not found" in err
    assert "postgresql-client" in err


async def test_psql_without_a_ca_bundle(
    iam_emulator: RDSIAMEmulator, postgres_server: PostgresServer, tmp_path: Path
) -> None:
    """With no CA bundle anywhere psql is not started and the message names `ca-bundle`."""
    env = {k: v for k, v in os.environ.items() if k not in ("PGSSLROOTCERT", _tls.CA_BUNDLE_ENV)}
    env["XDG_CACHE_HOME"] = str(tmp_path)
    code, _, err = await run_cli("psql", *target_args(iam_emulator, postgres_server), env=env)
    assert code == 2
    assert "asyncpg-iam ca-bundle" in err


# -- ca-bundle ----------------------------------------------------------------------------------


class BundleServer:
    """An HTTPS server on 127.0.0.1 serving `body` at /global/global-bundle.pem."""

    def __init__(self, ca: trustme.CA, body: bytes) -> None:
        self.body = body
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Length", str(len(owner.body)))
                self.end_headers()
                self.wfile.write(owner.body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ca.issue_cert("127.0.0.1").configure_cert(context)
        self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"https://127.0.0.1:{self.httpd.server_address[1]}/global/global-bundle.pem"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def bundle_server(tmp_path: Path) -> Iterator[tuple[BundleServer, str, bytes]]:
    """Serve a two-certificate PEM bundle over HTTPS; yield (server, its CA file, the bundle)."""
    ca = trustme.CA()
    ca_file = tmp_path / "download-ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    bundle = trustme.CA().cert_pem.bytes() + trustme.CA().cert_pem.bytes()
    server = BundleServer(ca, bundle)
    try:
        yield server, str(ca_file), bundle
    finally:
        server.stop()


async def test_ca_bundle_downloads_to_the_cache(
    bundle_server: tuple[BundleServer, str, bytes],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`ca-bundle` stores the PEM in the cache dir, prints its path, and the pool finds it."""
    server, ca_file, bundle = bundle_server
    cache = tmp_path / "cache"
    env = {**os.environ, "XDG_CACHE_HOME": str(cache)}
    env.pop(_tls.CA_BUNDLE_ENV, None)
    code, out, err = await run_cli("ca-bundle", "--url", server.url, "--cafile", ca_file, env=env)
    assert code == 0, err
    expected = cache / "asyncpg-iam" / _tls.CA_BUNDLE_FILENAME
    assert out.strip() == str(expected)
    assert expected.read_bytes() == bundle
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    monkeypatch.delenv(_tls.CA_BUNDLE_ENV, raising=False)
    assert _tls.ca_bundle_path() == expected


async def test_ca_bundle_refuses_what_is_not_pem(
    bundle_server: tuple[BundleServer, str, bytes], tmp_path: Path
) -> None:
    """A download that is not PEM certificates fails and leaves the cached bundle untouched."""
    server, ca_file, bundle = bundle_server
    output = tmp_path / "bundle.pem"
    output.write_bytes(bundle)
    for body in (
        b"<html>proxy login</html>",
        bundle + b"<html>trailing</html>",
        b"-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n",
    ):
        server.body = body
        code, out, _err = await run_cli(
            "ca-bundle", "--url", server.url, "--cafile", ca_file, "--output", str(output)
        )
        assert code == 1, body
        assert out == ""
        assert output.read_bytes() == bundle
    assert [name for name in listdir(tmp_path) if name.startswith(".ca-bundle-")] == []


async def test_ca_bundle_verifies_the_download_server(
    bundle_server: tuple[BundleServer, str, bytes], tmp_path: Path
) -> None:
    """Without trusting the server's CA the download fails with a certificate error."""
    server, _, _ = bundle_server
    output = tmp_path / "bundle.pem"
    code, _, err = await run_cli("ca-bundle", "--url", server.url, "--output", str(output))
    assert code == 1
    assert "CERTIFICATE_VERIFY_FAILED" in err
    assert not output.exists()


# -- emulate ------------------------------------------------------------------------------------


async def test_emulate_serves_until_interrupted(tmp_path: Path) -> None:
    """`emulate` prints settings another shell can use (psql works), then cleans up on SIGINT."""
    proc = await asyncio.create_subprocess_exec(
        console_script(),
        "emulate",
        "--no-sts",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    banner: list[str] = []
    try:
        while True:
            line = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
            assert line, "emulate exited before it was ready"
            banner.append(line)
            if line.startswith("Running until"):
                break
        text = "".join(banner)
        exports = dict(re.findall(r"^export (\w+)=(\S+)$", text, re.M))
        port = re.search(r"host=127\.0\.0\.1 port=(\d+) user=(\S+)", text)
        data_dir = re.search(r"PostgreSQL data: (\S+)", text)
        assert port
        assert data_dir
        assert "AWS_CONTAINER_CREDENTIALS_FULL_URI" in exports
        assert exists(data_dir.group(1))
        env = {
            k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k != "PGSSLROOTCERT"
        }
        env.update(exports)
        endpoint = re.search(r"--signing-host ([\w.-]+)", text)
        assert endpoint is not None
        args = ["--host", "127.0.0.1", "--port", port.group(1), "--user", port.group(2)]
        code, out, err = await run_cli("token", *args, "--signing-host", endpoint.group(1), env=env)
        assert code == 0, err
        conn = await asyncpg.connect(
            host="127.0.0.1",
            port=int(port.group(1)),
            user=port.group(2),
            database="postgres",
            password=out.strip(),
            ssl=ssl.create_default_context(cafile=exports["ASYNCPG_IAM_CA_BUNDLE"]),
        )
        assert await conn.fetchval("SELECT 2") == 2
        await conn.close()
        proc.send_signal(signal.SIGINT)
        rest, _ = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0
    assert "stopped; removed" in rest.decode()
    assert not exists(data_dir.group(1))
    assert not exists(exports["ASYNCPG_IAM_CA_BUNDLE"])


# -- demo ---------------------------------------------------------------------------------------


@pytest.mark.slow
async def test_demo_runs_clean() -> None:
    """`demo` runs an IAM pool that recycles connections with no failed query, and exits 0."""
    code, out, err = await run_cli(
        "demo",
        "--duration",
        "5",
        "--max-lifetime",
        "1.5",
        "--credential-lifetime",
        "8",
        timeout=120,
    )
    assert code == 0, out + err
    assert "demo: OK" in out
    summary = re.search(r"Summary: (\d+) queries in [\d.]+ s \(\d+/s\), (\d+) failed", out)
    assert summary is not None
    assert int(summary.group(1)) > 0
    assert summary.group(2) == "0"
    opened = re.search(r"connections: (\d+) opened, (\d+) recycled", out)
    assert opened is not None
    assert int(opened.group(2)) > 0
    logins = re.search(r"tokens signed: (\d+); emulator logins accepted (\d+), rejected 0", out)
    assert logins is not None
    assert int(logins.group(2)) == int(opened.group(1))
    assert "queries/s" in out
    assert "credential fetches" in out
    assert "SecretAccessKey" not in out + err
    assert "X-Amz-Signature" not in out + err
