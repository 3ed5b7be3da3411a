"""Docs that run: every code block of README.md and docs/, and every example, against the emulator.

Each ```python block in README.md and in docs/**/*.md follows a marker comment that says what it
is (a block without one fails `test_block_is_marked`):

- ``<!-- program -->``: a complete program; it runs as written, in a fresh process;
- ``<!-- app: GET /path -->``: a module defining a Starlette or FastAPI ``app``; its lifespan
  runs and the request is made;
- ``<!-- conftest -->``, ``<!-- pytest-config -->`` (a toml block) and ``<!-- pytest -->``:
  a user's test suite, run with pytest in a new project made of exactly those blocks of one page;
- ``<!-- fragment of PATH -->``: part of the complete program PATH, whose lines it repeats;
- ``<!-- not run: REASON -->``: a block that cannot run here (a Lambda handler, a step that
  needs AWS itself); REASON says why.

Shell sessions are ```console or ```bash blocks and output is ```text: those are not run.

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
# Every Markdown page whose blocks run: the README and the documentation site's pages.
DOCS = [README, *sorted((ROOT / "docs").rglob("*.md"))]
ENDPOINT = "app.cluster-abc123.us-east-1.rds.amazonaws.com"
_BLOCK = re.compile(
    r"(?:<!-- (?P<marker>[^>]*?) -->\n)?```(?P<lang>python|toml)\n(?P<code>.*?)```", re.S
)
_MARKERS = re.compile(
    r"program|app: GET \S+|conftest|pytest-config|pytest|fragment of \S+|not run: \S.*"
)
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
    """One python or toml code block of a Markdown page."""

    marker: str
    lang: str
    code: str
    line: int
    path: Path = README

    def __str__(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line} <!-- {self.marker} -->"


def page_blocks(path: Path) -> list[Block]:
    """Return the python and toml blocks of one page with their markers."""
    text = path.read_text()
    return [
        Block(m["marker"] or "", m["lang"], m["code"], text.count("\n", 0, m.start()) + 1, path)
        for m in _BLOCK.finditer(text)
    ]


def readme_blocks() -> list[Block]:
    """Return the python and toml blocks of the README and of every documentation page."""
    return [block for path in DOCS for block in page_blocks(path)]


def _blocks(kind: str) -> list[Block]:
    """Return the blocks marked `kind`; a block repeated word for word (README and site) once."""
    seen: set[str] = set()
    found = []
    for block in readme_blocks():
        if (block.marker == kind or block.marker.startswith(kind + ":")) and block.code not in seen:
            seen.add(block.code)
            found.append(block)
    return found


def test_readme_and_docs_have_blocks() -> None:
    """The README and the site's pages are found, with their code blocks."""
    assert README in DOCS
    assert len(DOCS) >= 10
    assert len(page_blocks(README)) >= 2
    assert len(readme_blocks()) >= 12


def test_readme_is_a_landing_page_whose_links_resolve() -> None:
    """The README stays under 250 lines, and each of its relative links names a file here."""
    text = README.read_text()
    assert text.count("\n") < 250
    targets = re.findall(r"\]\((?!https?:|#)([^)#\s]+)", text)
    assert "docs/index.md" in targets
    missing = [target for target in targets if not (ROOT / target).exists()]
    assert missing == []


@pytest.mark.parametrize("block", readme_blocks(), ids=str)
def test_block_is_marked(block: Block) -> None:
    """Each block carries a marker; programs compile; fragments repeat their program's lines."""
    assert _MARKERS.fullmatch(block.marker), f"{block}: unmarked or unknown marker"
    if block.marker.startswith(("program", "app", "pytest", "conftest")) and block.lang == "python":
        compile(block.code, str(block), "exec")  # no top-level await, no syntax error
    if block.marker.startswith("fragment of "):
        program = ROOT / block.marker.removeprefix("fragment of ")
        assert program.is_file(), f"{block}: {program} does not exist"
        lines = {line.strip() for line in program.read_text().splitlines()}
        for line in block.code.splitlines():
            if line.strip() and line.strip() != "..." and not line.strip().startswith("#"):
                assert line.strip() in lines, f"{block}: {line.strip()!r} not in {program}"


def test_an_unmarked_block_is_found(tmp_path: Path) -> None:
    """A python block without a marker, or with an empty reason, is reported as unmarked."""
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n\n```python\nprint(1)\n```\n\n<!-- not run:  -->\n```python\nx = 1\n```\n"
    )
    markers = [block.marker for block in page_blocks(page)]
    assert markers == ["", "not run: "]
    assert not any(_MARKERS.fullmatch(marker) for marker in markers)


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


def _pages_with(kind: str) -> list[Path]:
    return [path for path in DOCS if any(b.marker == kind for b in page_blocks(path))]


@pytest.mark.parametrize("page", _pages_with("conftest"), ids=lambda p: str(p.relative_to(ROOT)))
async def test_pytest_example_passes_in_a_new_project(page: Path, tmp_path: Path) -> None:
    """A page's conftest, pytest configuration and test pass in a new project as written."""
    blocks = page_blocks(page)
    (conftest,) = [b for b in blocks if b.marker == "conftest"]
    (config,) = [b for b in blocks if b.marker == "pytest-config"]
    (test,) = [b for b in blocks if b.marker == "pytest"]
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


# -- "When it fails": the README's messages are the library's, as it prints them today ----------

_FAILURE = re.compile(r"<!-- failure: (?P<name>[\w-]+) -->\n```text\n(?P<text>.*?)```", re.S)


def _normalize(text: str, port: int) -> str:
    """Replace what differs from run to run with what the README shows."""
    text = text.replace(f":{port}", ":5432")
    text = re.sub(
        r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?\+00:00", "2026-12-03T09:00:00+00:00", text
    )
    text = re.sub(r"token age [\d.]+ s", "token age 0.0 s", text)
    text = re.sub(r"within [\d.]+ s", "within 60 s", text)
    text = re.sub(r"measured against AWS: [+-]\d+ s|not measured", "not measured", text)
    text = re.sub(r"AKIA\w+|ASIA\w+", "ASIA…", text)
    return re.sub(r"\(it read [^)]*\)", "(it read 2026-12-03T09:00:00+00:00, not measured)", text)


@pytest.fixture
async def in_process_lookalike(
    rds_lookalike: LookAlike, monkeypatch: pytest.MonkeyPatch
) -> LookAlike:
    """The look-alike for code in this process: the same resolver hook and variables."""
    loop = asyncio.get_running_loop()
    real = loop.getaddrinfo

    async def resolve(host: object, *args: object, **kwargs: object) -> object:
        if isinstance(host, str) and host.endswith(".rds.amazonaws.com"):
            host = "127.0.0.1"
        return await real(host, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(loop, "getaddrinfo", resolve)
    for name in ("PGPORT", "ASYNCPG_IAM_CA_BUNDLE"):
        monkeypatch.setenv(name, rds_lookalike.env[name])
    return rds_lookalike


async def _failure(name: str, lookalike: LookAlike, monkeypatch: pytest.MonkeyPatch) -> str:
    """Make failure `name` happen through the library; return its message as a user sees it."""
    import ssl

    import asyncpg_iam

    emulator = lookalike.emulator
    kwargs = {"host": ENDPOINT, "user": "app", "database": "app", "min_size": 0}
    if name == "missing-grant":
        emulator.disable_iam_user("app")
    elif name == "signed-for-an-ip":
        kwargs.update(host="127.0.0.1", iam=asyncpg_iam.IAMAuth(region="us-east-1"))
    elif name == "untrusted-certificate":
        monkeypatch.delenv("ASYNCPG_IAM_CA_BUNDLE")
        monkeypatch.setenv("XDG_CACHE_HOME", "/nonexistent")
    elif name == "no-credentials":
        for variable in [v for v in os.environ if v.startswith("AWS_CONTAINER")]:
            monkeypatch.delenv(variable)
        monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    elif name == "sslmode-require":
        monkeypatch.setenv("PGSSLMODE", "require")
    elif name == "silent-port":
        kwargs["timeout"] = 1
    try:
        if name == "silent-port":
            server = await asyncio.start_server(lambda r, w: asyncio.sleep(5), "127.0.0.1", 0)
            monkeypatch.setenv("PGPORT", str(server.sockets[0].getsockname()[1]))
            port = server.sockets[0].getsockname()[1]
            async with server, asyncpg_iam.create_pool(**kwargs) as pool:
                await pool.fetchval("SELECT 1")
        else:
            port = emulator.port
            async with asyncpg_iam.create_pool(**kwargs) as pool:
                await pool.fetchval("SELECT 1")
    except (asyncpg_iam.IAMError, ssl.SSLError) as exc:
        return f"{type(exc).__name__}: {_normalize(str(exc), port)}"
    raise AssertionError(f"{name}: no failure")


def _readme_failures() -> dict[str, str]:
    return {m["name"]: m["text"] for path in DOCS for m in _FAILURE.finditer(path.read_text())}


def test_when_it_fails_lists_six_failures() -> None:
    """The errors guide's "six failures new users meet most" shows six failures."""
    assert len(_readme_failures()) == 6


@pytest.mark.parametrize("name", sorted(_readme_failures()))
async def test_when_it_fails_messages_are_current(
    name: str, in_process_lookalike: LookAlike, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each message in "When it fails" is what the library says today, line for line."""
    message = await _failure(name, in_process_lookalike, monkeypatch)
    if os.environ.get("ASYNCPG_IAM_PRINT_FAILURES"):
        print(f"\n<!-- failure: {name} -->\n```text\n{message}\n```")
    assert _readme_failures()[name] == message + "\n"
