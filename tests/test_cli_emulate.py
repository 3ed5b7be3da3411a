"""The command line as a new user meets it: --version, a missing extra, a busy port, and
`emulate` with its own IAM users and the reason of every rejected login."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import ssl
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import asyncpg
import pytest
import pytest_asyncio

from asyncpg_iam.testing._leak_guard import REGISTRY
from tests._support import console_script, run_cli


def test_version_flag_and_python_m() -> None:
    """`asyncpg-iam --version` and `python -m asyncpg_iam --version` print the installed version."""
    import subprocess

    expected = f"asyncpg-iam {metadata.version('asyncpg-iam')}\n"
    for argv in (
        [console_script(), "--version"],
        [sys.executable, "-m", "asyncpg_iam", "--version"],
    ):
        result = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
        assert (result.returncode, result.stdout) == (0, expected), result.stderr


@pytest.mark.parametrize("command", ["emulate", "demo"])
async def test_without_the_cli_extra_one_line_names_it(command: str, tmp_path: Path) -> None:
    """Without trustme, `emulate`/`demo` exit 1 with one line naming the [cli] extra."""
    (tmp_path / "trustme.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'trustme'\", name='trustme')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    code, out, err = await run_cli(command, env=env)
    assert code == 1, out + err
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert "pip install 'asyncpg-iam[cli]'" in lines[0]
    assert "trustme" in lines[0]


async def test_emulate_on_a_busy_port_says_so_in_one_line() -> None:
    """`emulate --port N` with N taken exits 1 with one line naming the port and --port."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code, out, err = await run_cli("emulate", "--no-sts", "--port", str(port))
    assert code == 1, out + err
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert f"port {port}" in lines[0]
    assert "--port" in lines[0]


# -- a running `emulate` ------------------------------------------------------------------------


@dataclass
class Emulate:
    proc: asyncio.subprocess.Process
    banner: str
    env: dict[str, str]
    port: int
    endpoint: str
    ca: str

    async def next_line(self) -> str:
        assert self.proc.stdout is not None
        return (await asyncio.wait_for(self.proc.stdout.readline(), 30)).decode()

    async def token(self, user: str) -> str:
        args = ["--host", "127.0.0.1", "--port", str(self.port), "--user", user]
        code, out, err = await run_cli(
            "token", *args, "--signing-host", self.endpoint, env=self.env
        )
        assert code == 0, err
        token = out.strip()
        REGISTRY.add_token(token)  # the leak guard now fails the test if it shows up anywhere
        return token

    async def connect(self, user: str, password: str) -> asyncpg.Connection:
        return await asyncpg.connect(
            host="127.0.0.1",
            port=self.port,
            user=user,
            database="postgres",
            password=password,
            ssl=ssl.create_default_context(cafile=self.ca),
            timeout=30,
        )

    async def stop(self) -> str:
        self.proc.send_signal(signal.SIGINT)
        rest, _ = await asyncio.wait_for(self.proc.communicate(), 30)
        assert self.proc.returncode == 0
        return rest.decode()


async def start_emulate(*options: str) -> Emulate:
    proc = await asyncio.create_subprocess_exec(
        console_script(),
        "emulate",
        "--no-sts",
        *options,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    banner: list[str] = []
    while True:
        line = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
        assert line, "emulate exited before it was ready"
        banner.append(line)
        if line.startswith("Running until"):
            break
    text = "".join(banner)
    exports = dict(re.findall(r"^export (\w+)=(\S+)$", text, re.M))
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k != "PGSSLROOTCERT"}
    env.update(exports)
    port = re.search(r"host=127\.0\.0\.1 port=(\d+)", text)
    endpoint = re.search(r"--signing-host ([\w.-]+)", text)
    assert port is not None
    assert endpoint is not None
    return Emulate(
        proc, text, env, int(port.group(1)), endpoint.group(1), exports["ASYNCPG_IAM_CA_BUNDLE"]
    )


@pytest_asyncio.fixture
async def emulate_alice() -> AsyncIterator[Emulate]:
    """`asyncpg-iam emulate --iam-user alice` running, killed if the test does not stop it."""
    emulate = await start_emulate("--iam-user", "alice")
    try:
        yield emulate
    finally:
        if emulate.proc.returncode is None:
            emulate.proc.kill()
            await emulate.proc.wait()


async def test_emulate_creates_iam_users_and_prints_each_rejection(emulate_alice: Emulate) -> None:
    """--iam-user makes a token user; a rejection prints its reason, never the token."""
    emulate = emulate_alice
    assert "alice" in re.search(r"IAM users: (.*)", emulate.banner).group(1)  # type: ignore[union-attr]
    token = await emulate.token("alice")
    conn = await emulate.connect("alice", token)
    assert await conn.fetchval("SELECT current_user") == "alice"
    assert await conn.fetchval("SELECT pg_has_role('alice', 'rds_iam', 'member')")
    await conn.close()

    # A bad signature: one hex digit of the signature changed.
    tampered = token[:-1] + ("0" if token[-1] != "0" else "1")
    REGISTRY.add_token(tampered)
    with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError):
        await emulate.connect("alice", tampered)
    line = await emulate.next_line()
    assert "rejected login" in line
    assert "'alice'" in line
    assert "bad signature" in line
    assert "signature_mismatch" in line

    # A user created by SQL, without GRANT rds_iam: a token is refused as a missing grant.
    admin = await emulate.connect("postgres", await emulate.token("postgres"))
    await admin.execute("CREATE USER bob PASSWORD 'bob-password'")
    await admin.close()
    with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError):
        await emulate.connect("bob", await emulate.token("bob"))
    line = await emulate.next_line()
    assert "'bob'" in line
    assert "missing grant" in line
    bob = await emulate.connect("bob", "bob-password")
    assert await bob.fetchval("SELECT current_user") == "bob"
    await bob.close()

    rest = await emulate.stop()
    output = emulate.banner + rest
    print(output)  # the leak guard scans captured output too
    assert REGISTRY.find(output) == []
    assert "X-Amz-Signature" not in output


async def test_quiet_rejections_prints_none() -> None:
    """With --quiet-rejections a rejected login prints nothing."""
    emulate = await start_emulate("--quiet-rejections")
    try:
        assert "not printed (--quiet-rejections)" in emulate.banner
        with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError):
            await emulate.connect("postgres", "not-a-token")
        rest = await emulate.stop()
    finally:
        if emulate.proc.returncode is None:
            emulate.proc.kill()
            await emulate.proc.wait()
    assert "rejected login" not in rest


async def test_emulate_proxy_prints_each_pin_and_the_summary() -> None:
    """`emulate --proxy` stands in for an RDS Proxy: a SET prints the pinned session with the
    proxy's reason, and the counts print on exit."""
    emulate = await start_emulate("--proxy")
    try:
        assert "an RDS Proxy endpoint" in emulate.banner
        assert ".proxy-" in emulate.endpoint
        con = await emulate.connect("postgres", await emulate.token("postgres"))
        try:
            await con.execute("SET search_path = public")
            line = await emulate.next_line()
        finally:
            await con.close()
        rest = await emulate.stop()
    finally:
        if emulate.proc.returncode is None:
            emulate.proc.kill()
            await emulate.proc.wait()
    assert line.startswith("pinned session (user): A SET statement was detected.")
    assert "RDS Proxy: 1 of 1 sessions pinned (1 by user); 0 startups refused" in rest


async def test_emulate_proxy_refuses_an_endpoint_that_is_no_proxy() -> None:
    """--proxy with an instance endpoint name exits with one line saying what it needs."""
    code, _out, err = await run_cli(
        "emulate", "--proxy", "--endpoint", "db.abc.us-east-1.rds.amazonaws.com"
    )
    assert code == 1
    assert len(err.splitlines()) == 1
    assert "--proxy needs an RDS Proxy endpoint name" in err
