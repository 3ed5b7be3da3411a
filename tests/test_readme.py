"""Docs that run: every README code block and every example, against the RDS IAM emulator.

Each ```python block in README.md follows a marker comment that says what it is:

- ``<!-- program -->``: a complete program; it runs as written, in a fresh process;
- ``<!-- app: GET /path -->``: a module defining a Starlette or FastAPI ``app``; its lifespan
  runs and the request is made;
- ``<!-- conftest -->``, ``<!-- pytest-config -->`` (a toml block) and ``<!-- pytest -->``:
  a user's test suite, run with pytest in a new project made of exactly those blocks;
- ``<!-- fragment of PATH -->``: part of the complete program PATH, whose lines it repeats.

The blocks name a real RDS endpoint (``app.cluster-abc123.us-east-1.rds.amazonaws.com``) and
run unchanged: the emulator answers for that name on loopback (the name resolves to 127.0.0.1
through a resolver hook, since no DNS can be asked here; ``PGPORT`` points at the emulator and
``ASYNCPG_IAM_CA_BUNDLE`` at its CA), credentials come from the local credential endpoint and
roles are assumed through moto's STS.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import botocore.exceptions
import pytest

from asyncpg_iam.testing import CredentialServer, MotoSTS, PostgresServer, RDSIAMEmulator

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
ENDPOINT = "app.cluster-abc123.us-east-1.rds.amazonaws.com"
_BLOCK = re.compile(
    r"(?:<!-- (?P<marker>[^>]*?) -->\n)?```(?P<lang>python|toml)\n(?P<code>.*?)```", re.S
)
_MARKERS = re.compile(r"program|app: GET \S+|conftest|pytest-config|pytest|fragment of \S+")
# Resolves the README's endpoint names to the emulator on loopback, in the block's process.
_SITECUSTOMIZE = """
import socket

_real = socket.getaddrinfo


def _getaddrinfo(host, *args, **kwargs):
    if isinstance(host, str) and host.endswith(".rds.amazonaws.com"):
        host = "127.0.0.1"
    return _real(host, *args, **kwargs)


socket.getaddrinfo = _getaddrinfo
"""
_APP_DRIVER = """
import sys
import warnings

warnings.simplefilter("ignore", DeprecationWarning)  # Starlette's notice about its test client
from starlette.testclient import TestClient

namespace = {"__name__": "readme_app"}
exec(compile(open(sys.argv[1]).read(), sys.argv[1], "exec"), namespace)
with TestClient(namespace["app"]) as client:
    response = client.get(sys.argv[2])
    print(response.status_code, response.text)
    assert response.status_code == 200, response.text
"""


@dataclass(frozen=True)
class Block:
    """One code block of the README."""

    marker: str
    lang: str
    code: str
    line: int

    def __str__(self) -> str:
        return f"README.md:{self.line} <!-- {self.marker} -->"


def readme_blocks() -> list[Block]:
    """Return the README's python and toml blocks with their markers."""
    text = README.read_text()
    return [
        Block(m["marker"] or "", m["lang"], m["code"], text.count("\n", 0, m.start()) + 1)
        for m in _BLOCK.finditer(text)
    ]


def _blocks(kind: str) -> list[Block]:
    return [b for b in readme_blocks() if b.marker == kind or b.marker.startswith(kind + ":")]


def test_every_block_is_a_program_or_a_marked_fragment() -> None:
    """Each block carries a marker; programs compile; fragments repeat their program's lines."""
    blocks = readme_blocks()
    assert len(blocks) >= 8
    for block in blocks:
        assert _MARKERS.fullmatch(block.marker), f"{block}: unmarked or unknown marker"
        if block.marker.startswith(("program", "app", "pytest", "conftest")):
            compile(block.code, str(block), "exec")  # no top-level await, no syntax error
        if block.marker.startswith("fragment of "):
            program = ROOT / block.marker.removeprefix("fragment of ")
            assert program.is_file(), f"{block}: {program} does not exist"
            lines = {line.strip() for line in program.read_text().splitlines()}
            for line in block.code.splitlines():
                if line.strip() and line.strip() != "..." and not line.strip().startswith("#"):
                    assert line.strip() in lines, f"{block}: {line.strip()!r} not in {program}"


@dataclass
class LookAlike:
    """An emulator answering as the README's RDS endpoint, and the environment to reach it."""

    emulator: RDSIAMEmulator
    env: dict[str, str]


@pytest.fixture
async def rds_lookalike(
    postgres_server: PostgresServer,
    credential_server: CredentialServer,
    moto_sts: MotoSTS,
    tmp_path: Path,
) -> AsyncIterator[LookAlike]:
    """The README's endpoint, user app and database app, through the emulator."""
    emulator = RDSIAMEmulator(
        backend_host=postgres_server.host,
        backend_port=postgres_server.port,
        backend_user=postgres_server.user,
        backend_password=postgres_server.password,
        endpoint=ENDPOINT,
        iam_users=["app"],
    )
    credential_server.add_emulator(emulator)
    emulator.add_key_source(moto_sts.issued_key)
    with contextlib.suppress(botocore.exceptions.ClientError):  # made by an earlier test
        moto_sts.create_role("app-db")
    async with emulator:
        await emulator.ensure_role("app")
        admin = await asyncpg.connect(
            host=postgres_server.host,
            port=postgres_server.port,
            user=postgres_server.user,
            password=postgres_server.password,
            database=postgres_server.database,
        )
        try:
            if not await admin.fetchval("SELECT 1 FROM pg_database WHERE datname = 'app'"):
                await admin.execute("CREATE DATABASE app OWNER app")
        finally:
            await admin.close()
        hook = tmp_path / "resolver"
        hook.mkdir()
        (hook / "sitecustomize.py").write_text(_SITECUSTOMIZE)
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(moto_sts.env())
        env.update(
            PGPORT=str(emulator.port),
            ASYNCPG_IAM_CA_BUNDLE=emulator.ca_path,
            PYTHONPATH=os.pathsep.join([str(hook), str(ROOT)]),
        )
        yield LookAlike(emulator, env)


async def _run(*args: str, env: dict[str, str], cwd: Path, timeout: float = 120) -> str:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        *args,
        env=env,
        cwd=cwd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    text = out.decode()
    assert proc.returncode == 0, text
    return text


@pytest.mark.parametrize("block", _blocks("program"), ids=str)
async def test_program_block_runs(block: Block, rds_lookalike: LookAlike, tmp_path: Path) -> None:
    """A README program runs as written and logs in with a token the emulator verified."""
    program = tmp_path / "program.py"
    program.write_text(block.code)
    await _run(str(program), env=rds_lookalike.env, cwd=tmp_path)
    emulator = rds_lookalike.emulator
    assert emulator.logins_accepted >= 1
    assert emulator.logins_rejected == 0, [r.reason for r in emulator.records]


@pytest.mark.parametrize("block", _blocks("app"), ids=str)
async def test_app_block_serves(block: Block, rds_lookalike: LookAlike, tmp_path: Path) -> None:
    """A README app starts (its lifespan opens the pool) and answers its request."""
    module = tmp_path / "app.py"
    module.write_text(block.code)
    driver = tmp_path / "driver.py"
    driver.write_text(_APP_DRIVER)
    path = block.marker.split()[-1]
    out = await _run(str(driver), str(module), path, env=rds_lookalike.env, cwd=tmp_path)
    assert "\n200 " in "\n" + out, out
    assert rds_lookalike.emulator.logins_accepted >= 1


async def test_pytest_example_passes_in_a_new_project(tmp_path: Path) -> None:
    """The README's conftest, pytest configuration and test pass in a new project as written."""
    (conftest,) = _blocks("conftest")
    (config,) = _blocks("pytest-config")
    (test,) = _blocks("pytest")
    project = tmp_path / "project"
    project.mkdir()
    (project / "conftest.py").write_text(conftest.code)
    (project / "pyproject.toml").write_text(config.code)
    (project / "test_example.py").write_text(test.code)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    out = await _run("-m", "pytest", "-q", "-p", "no:cacheprovider", env=env, cwd=project)
    assert "1 passed" in out


@pytest.mark.parametrize(
    "example", sorted(p.name for p in (ROOT / "examples").glob("[!_]*.py")), ids=str
)
async def test_example_runs_against_the_emulator(example: str, tmp_path: Path) -> None:
    """Each example runs self-contained (PostgreSQL + the emulator) and exits 0."""
    source = (ROOT / "examples" / example).read_text()
    args = ["--check"] if "--check" in source else []
    env = {k: v for k, v in os.environ.items() if k != "ASYNCPG_IAM_EXAMPLE_DSN"}
    await _run(str(ROOT / "examples" / example), *args, env=env, cwd=tmp_path, timeout=180)
