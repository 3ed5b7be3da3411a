"""A user's first day: the rough edges of issue 31, each as the user met it."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import sys
from pathlib import Path

import asyncpg
import pytest

import asyncpg_iam
from asyncpg_iam.testing import DEFAULT_DSQL_ENDPOINT, PostgresServer, RDSIAMEmulator, Sandbox
from tests._support import run_cli

ROOT = Path(__file__).resolve().parent.parent
# `pip install asyncpg-iam[x]` unquoted: zsh reads the brackets as a glob and fails.
_UNQUOTED_EXTRA = re.compile(r"pip install (?!['\"])\S*\[")


def test_extras_hints_are_quoted_for_zsh() -> None:
    """Every `pip install ...[extra]` hint in code and docs quotes its argument."""
    paths = [ROOT / "README.md", *ROOT.glob("docs/**/*.md")]
    for folder in ("asyncpg_iam", "benchmarks", "examples"):
        paths += (ROOT / folder).rglob("*.py")
    found = [
        f"{path.relative_to(ROOT)}: {match.group(0)}"
        for path in paths
        for match in _UNQUOTED_EXTRA.finditer(path.read_text())
    ]
    assert found == []
    assert _UNQUOTED_EXTRA.search("pip install asyncpg-iam[starlette]")
    assert not _UNQUOTED_EXTRA.search("pip install 'asyncpg-iam[starlette]'")


async def test_forgotten_await_says_what_to_write(iam_emulator: RDSIAMEmulator) -> None:
    """A pool used without `await` names `await create_pool(...)` and `async with`."""
    pool = asyncpg_iam.create_pool(**iam_emulator.pool_kwargs(user="postgres"), min_size=0)
    with pytest.raises(asyncpg.InterfaceError, match=r"await create_pool\(\.\.\.\)`"):
        await pool.fetchval("SELECT 1")
    with pytest.raises(asyncpg.InterfaceError, match=r"async with create_pool\(\.\.\.\)`"):
        async with pool.acquire():
            pass
    await pool  # still usable the right way afterwards
    try:
        assert await pool.fetchval("SELECT 1") == 1
    finally:
        await pool.close()
    with pytest.raises(asyncpg.InterfaceError, match="pool is closed"):
        await pool.fetchval("SELECT 1")


async def test_plain_with_says_what_to_write() -> None:
    """`with create_pool(...)` raises a TypeError naming `async with create_pool(...)`."""
    pool = asyncpg_iam.create_pool(host="127.0.0.1", user="app", iam=False, min_size=0)
    with pytest.raises(TypeError, match=r"async with create_pool\(\.\.\.\)"), pool:
        pass


async def test_dsql_emulator_lets_admin_log_in_and_create_tables() -> None:
    """The emulator's DSQL mode has the role admin, as a DSQL cluster does; it may create tables."""
    async with Sandbox(endpoint=DEFAULT_DSQL_ENDPOINT) as sandbox:
        kwargs = sandbox.pool_kwargs(user="admin", database=None)
        async with asyncpg_iam.create_pool(**kwargs, min_size=1) as pool:
            assert await pool.fetchval("SELECT current_user") == "admin"
            await pool.execute("CREATE TABLE first_day (x int)")
        assert sandbox.emulator.logins_rejected == 0


async def test_server_errors_that_are_not_refusals_pass_through() -> None:
    """A verified token for a role the server lacks raises asyncpg's error, without IAM hints."""
    async with Sandbox(endpoint=DEFAULT_DSQL_ENDPOINT) as sandbox:
        sandbox.emulator.enable_iam_user("nobody")
        kwargs = sandbox.pool_kwargs(user="nobody", database=None)
        with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError) as caught:
            await asyncpg_iam.create_pool(**kwargs, min_size=1)
        assert not isinstance(caught.value, asyncpg_iam.IAMAuthenticationError)
        assert 'role "nobody" does not exist' in str(caught.value)
        assert "DbConnect" not in str(caught.value)
        # The token passed; the backend refused the role.
        assert [r.reason for r in sandbox.emulator.records] == ["backend_error"]


async def test_emulate_banner_shows_a_connect_line_that_works_per_iam_user() -> None:
    """The banner's line for IAM user app logs in; its CREATE DATABASE gives app a database."""
    from asyncpg_iam.cli.emulate import _emulate_banner

    async with Sandbox(iam_users=["app"]) as sandbox:
        banner = _emulate_banner(sandbox, sts_error=None)
        login = re.search(r"^  app: asyncpg-iam psql .*--user app --dbname (\S+)", banner, re.M)
        create = re.search(r"^    as (\S+): asyncpg-iam psql .* -- -c '(.*)'$", banner, re.M)
        assert login is not None, banner
        assert create is not None, banner
        kwargs = sandbox.pool_kwargs(user="app", database=login.group(1), min_size=1)
        async with asyncpg_iam.create_pool(**kwargs) as pool:
            assert await pool.fetchval("SELECT current_user") == "app"
        admin_kwargs = sandbox.pool_kwargs(user=create.group(1), min_size=1)
        async with asyncpg_iam.create_pool(**admin_kwargs) as admin:
            await admin.execute(create.group(2))
        then = re.search(r"^    then --dbname (\S+)", banner, re.M)
        assert then is not None
        async with asyncpg_iam.create_pool(
            **sandbox.pool_kwargs(user="app", database=then.group(1), min_size=1)
        ) as pool:
            await pool.execute("CREATE TABLE mine (x int)")
        assert sandbox.emulator.logins_rejected == 0


async def test_doctor_against_emulate_without_sts_skips_the_identity_check(
    iam_emulator: RDSIAMEmulator, postgres_server: PostgresServer, credential_server: object
) -> None:
    """As against `emulate` in a `[cli]` install (no STS): identity is skipped, saying why."""
    env = dict(os.environ)
    for name in ("AWS_ENDPOINT_URL_STS", "AWS_ENDPOINT_URL"):
        env.pop(name, None)
    # Were STS asked anyway, it goes to a proxy on loopback that refuses: never off this host.
    env.update(HTTPS_PROXY="http://127.0.0.1:9", HTTP_PROXY="http://127.0.0.1:9")
    _, out, err = await run_cli(
        "doctor",
        "--host", iam_emulator.host,
        "--port", str(iam_emulator.port),
        "--user", postgres_server.user,
        "--dbname", postgres_server.database,
        "--signing-host", iam_emulator.endpoint,
        "--ca", iam_emulator.ca_path,
        "--timeout", "3",
        "--json",
        env=env,
    )  # fmt: skip
    checks = {check["name"]: check for check in json.loads(out)["checks"]}
    assert checks["identity"]["status"] == "skip", checks["identity"]
    assert "no STS endpoint is set" in checks["identity"]["detail"]
    assert checks["login"]["status"] == "pass", checks["login"]
    assert [n for n, c in checks.items() if c["status"] == "fail"] in ([], ["proxy"]), out + err


async def test_a_pool_signing_for_an_ip_address_warns(
    credential_server: object, caplog: pytest.LogCaptureFixture
) -> None:
    """A pool whose tokens would be signed for an IP address says so once, at creation."""
    caplog.set_level(logging.WARNING, logger="asyncpg_iam")
    iam = asyncpg_iam.IAMAuth(region="us-east-1")
    async with asyncpg_iam.create_pool(host="10.0.0.1", user="app", iam=iam, min_size=0):
        pass
    warnings = [r.getMessage() for r in caplog.records if "an IP address" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert "10.0.0.1" in warnings[0]
    assert "signing_host=" in warnings[0]
    caplog.clear()
    iam = asyncpg_iam.IAMAuth(signing_host="app.cluster-abc123.us-east-1.rds.amazonaws.com")
    async with asyncpg_iam.create_pool(host="10.0.0.1", user="app", iam=iam, min_size=0):
        pass
    assert not [r for r in caplog.records if "an IP address" in r.getMessage()]


async def test_token_command_signing_for_an_ip_address_warns(credential_server: object) -> None:
    """`asyncpg-iam token --host 10.0.0.1` prints the token and a warning naming --signing-host."""
    args = ["token", "--host", "10.0.0.1", "--user", "app", "--region", "us-east-1"]
    code, out, err = await run_cli(*args, env=dict(os.environ))
    assert code == 0, err
    assert out.strip()
    assert "10.0.0.1, an IP address" in err
    assert "--signing-host" in err
    named = ["--signing-host", "app.cluster-abc123.us-east-1.rds.amazonaws.com"]
    code, out, err = await run_cli(*args, *named, env=dict(os.environ))
    assert code == 0, err
    assert "an IP address" not in err


async def test_psql_command_signing_for_an_ip_address_warns(
    iam_emulator: RDSIAMEmulator, postgres_server: PostgresServer, credential_server: object
) -> None:
    """`asyncpg-iam psql --host 127.0.0.1` without --signing-host warns before psql runs."""
    code, out, err = await run_cli(
        "psql",
        "--host", "127.0.0.1",
        "--port", str(iam_emulator.port),
        "--user", postgres_server.user,
        "--region", "us-east-1",
        "--ca", iam_emulator.ca_path,
        "--", "-c", "SELECT 1",
        env=dict(os.environ),
    )  # fmt: skip
    assert "127.0.0.1, an IP address" in err, out + err
    assert code != 0  # and RDS (here the emulator) refuses the token, as the warning said
    assert iam_emulator.logins_rejected == 1


_FAILING_PROGRAM = """
import asyncio, logging, sys
import asyncpg_iam
from asyncpg_iam.testing import Sandbox

logging.basicConfig(level=logging.WARNING)  # as an application logs


async def main(kind):
    async with Sandbox() as sandbox:
        kwargs = sandbox.pool_kwargs(min_size=1)
        if kind == "refused-login":
            sandbox.emulator.disable_iam_user(sandbox.user)
        else:
            kwargs["port"] = 1  # nothing listens there
        async with asyncpg_iam.create_pool(**kwargs) as pool:
            await pool.fetchval("SELECT 1")


asyncio.run(main(sys.argv[1]))
"""


@pytest.mark.parametrize(
    ("kind", "error"),
    [("refused-login", "IAMAuthenticationError"), ("refused-port", "ConnectError")],
)
async def test_a_failed_connect_prints_one_clear_error(
    kind: str, error: str, tmp_path: Path
) -> None:
    """An uncaught connect failure prints the library's error once, no asyncpg internals, no log."""
    program = tmp_path / "program.py"
    program.write_text(_FAILING_PROGRAM)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(program), kind, env=env, stderr=asyncio.subprocess.PIPE
    )
    _, err = await asyncio.wait_for(proc.communicate(), 120)
    text = err.decode()
    assert proc.returncode == 1, text
    assert text.count(f"asyncpg_iam.{error}: ") == 1, text
    assert "asyncpg/connect_utils.py" not in text, text  # the cause's frames are not printed
    assert "WARNING" not in text, text  # the error is not logged a second time
