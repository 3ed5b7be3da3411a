"""`asyncpg-iam doctor`, run as the installed console script against the emulator, per fault."""

from __future__ import annotations

import asyncio
import json
import os
import re
from pathlib import Path
from typing import Any

import pytest
import trustme

from asyncpg_iam.cli import build_parser
from asyncpg_iam.cli.doctor import FAIL, PASS, Context, dns_verdict, run_checks
from asyncpg_iam.testing import CredentialServer, MotoSTS, PostgresServer, RDSIAMEmulator
from tests._support import resolve_as_unknown, run_cli

CHECKS = [
    "proxy",
    "credentials",
    "identity",
    "region",
    "dns",
    "tcp",
    "tls",
    "clock",
    "token",
    "login",
    "select",
]


class Setup:
    """An emulator trusting the credential server's keys, moto for STS, and doctor arguments."""

    def __init__(
        self,
        emulator: RDSIAMEmulator,
        server: PostgresServer,
        credentials: CredentialServer,
        sts: MotoSTS,
    ) -> None:
        self.emulator = emulator
        self.server = server
        self.credentials = credentials
        self.env = {**os.environ, **sts.env()}

    def args(self, **overrides: str | None) -> list[str]:
        options: dict[str, str | None] = {
            "--host": self.emulator.host,
            "--port": str(self.emulator.port),
            "--user": self.server.user,
            "--dbname": self.server.database,
            "--signing-host": self.emulator.endpoint,
            "--ca": self.emulator.ca_path,
            "--timeout": "3",
        }
        options.update(
            {
                k if k.startswith("-") else "--" + k.replace("_", "-"): v
                for k, v in overrides.items()
            }
        )
        argv = ["doctor"]
        for name, value in options.items():
            if value is not None:
                argv += [name, value]
        return argv

    async def doctor(
        self, *extra: str, env: dict[str, str] | None = None, **overrides: str | None
    ) -> tuple[int, dict[str, dict[str, Any]], str]:
        """Run doctor --json; return (exit status, checks by name, all output)."""
        code, out, err = await run_cli(
            *self.args(**overrides), "--json", *extra, env=env or self.env
        )
        document = json.loads(out)
        checks = {check["name"]: check for check in document["checks"]}
        assert [check["name"] for check in document["checks"]] == CHECKS
        assert document["ok"] is (code == 0)
        self.assert_no_secrets(out + err)
        return code, checks, out + err

    def assert_no_secrets(self, text: str) -> None:
        issued = self.credentials.current_credentials()
        assert issued["SecretAccessKey"] not in text
        assert issued["Token"] not in text
        assert "X-Amz-Signature" not in text


@pytest.fixture
async def setup(
    iam_emulator: RDSIAMEmulator,
    postgres_server: PostgresServer,
    credential_server: CredentialServer,
    moto_sts: MotoSTS,
) -> Setup:
    """A healthy IAM set-up for the doctor to examine."""
    return Setup(iam_emulator, postgres_server, credential_server, moto_sts)


def failing(checks: dict[str, dict[str, Any]]) -> list[str]:
    return [name for name, check in checks.items() if check["status"] == FAIL]


async def test_healthy_setup_passes_every_check(setup: Setup) -> None:
    """Against a working endpoint every check passes, in the documented order, exit status 0."""
    code, out, err = await run_cli(*setup.args(), env=setup.env)
    assert code == 0, out + err
    lines = out.splitlines()
    assert [line[7:].split()[0] for line in lines[: len(CHECKS)]] == CHECKS
    assert all(line.startswith("[ OK ]") for line in lines[: len(CHECKS)])
    assert "default chain (container)" in out
    assert "arn:aws:sts::" in out
    assert setup.emulator.logins_accepted == 1
    setup.assert_no_secrets(out + err)
    code, checks, _ = await setup.doctor()
    assert code == 0
    assert all(check["status"] == PASS for check in checks.values())


async def test_wrong_region(setup: Setup) -> None:
    """A --region that disagrees with the endpoint fails the region check and the login."""
    code, checks, _ = await setup.doctor(region="eu-west-1")
    assert code == 1
    assert failing(checks) == ["region", "login"]
    assert "us-east-1" in checks["region"]["detail"]
    assert checks["region"]["fix"] == "drop --region or pass --region us-east-1"
    assert "PAM authentication failed" in checks["login"]["detail"]
    assert "Region mismatch" in checks["login"]["fix"]
    assert setup.emulator.records[-1].reason != "ok"


async def test_alias_without_the_real_rds_name(setup: Setup) -> None:
    """Dialling 'localhost' without --signing-host fails DNS with the fix, and the login."""
    code, checks, _ = await setup.doctor(host="localhost", signing_host=None)
    assert code == 1
    assert failing(checks) == ["dns", "login"]
    assert "not an RDS endpoint name" in checks["dns"]["detail"]
    assert "--signing-host" in checks["dns"]["fix"]
    assert "signing-host" in checks["login"]["fix"]


def test_cname_names_the_rds_endpoint_to_sign_for() -> None:
    """A CNAME to an RDS endpoint: the DNS verdict tells to sign for the canonical RDS name."""
    rds = "prod.cluster-abc123.eu-west-1.rds.amazonaws.com"
    check = dns_verdict("db.example.com", ["10.0.0.5"], rds + ".", None)
    assert check.status == FAIL
    assert f"CNAME for {rds}" in check.detail
    assert check.fix is not None
    assert f"--signing-host {rds}" in check.fix
    assert dns_verdict("db.example.com", ["10.0.0.5"], rds, rds).status == PASS
    other = "other.cluster-abc123.eu-west-1.rds.amazonaws.com"
    assert dns_verdict("db.example.com", ["10.0.0.5"], rds, other).status == FAIL


async def test_expired_credentials(setup: Setup) -> None:
    """Credentials that already expired fail the credentials check; nothing is signed."""
    setup.credentials.expired = True
    code, checks, _ = await setup.doctor()
    assert code == 1
    assert checks["credentials"]["status"] == FAIL
    assert "expired" in checks["credentials"]["detail"]
    assert "renew" in checks["credentials"]["fix"]
    for name in ("identity", "clock", "token", "login", "select"):
        assert checks[name]["status"] == "skip", name
    assert setup.emulator.password_messages == 0


async def test_clock_skew(setup: Setup) -> None:
    """A clock 20 minutes behind fails the clock check, and the login names the skew first."""
    code, checks, _ = await setup.doctor("--clock-offset", "-1200")
    assert code == 1
    assert failing(checks) == ["clock", "login"]
    # The Date header has whole seconds, so the measurement is good to about a second.
    assert re.search(r"\b(1199|1200|1201) s behind", checks["clock"]["detail"])
    assert "NTP" in checks["clock"]["fix"]
    assert checks["login"]["fix"].startswith("(1) Clock skew")
    assert setup.emulator.records[-1].reason == "expired"


async def test_user_not_enabled_for_iam(setup: Setup) -> None:
    """A user without rds_iam fails only the login, whose fix gives the GRANT and the policy."""
    setup.emulator.disable_iam_user(setup.server.user)
    code, checks, _ = await setup.doctor()
    assert code == 1
    assert failing(checks) == ["login"]
    assert checks["select"]["status"] == "skip"
    assert f'GRANT rds_iam TO "{setup.server.user}";' in checks["login"]["fix"]
    assert "rds-db:connect on arn:aws:rds-db:us-east-1:" in checks["login"]["fix"]
    assert setup.emulator.records[-1].reason == "user_not_iam_enabled"


async def test_plaintext_server(setup: Setup) -> None:
    """A server that refuses TLS fails the TLS check, and no token is sent to it."""
    received = bytearray()

    async def refuse_tls(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read(8)
        received.extend(data)
        writer.write(b"N")
        await writer.drain()
        received.extend(await reader.read(65536))
        writer.close()

    server = await asyncio.start_server(refuse_tls, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        code, checks, _ = await setup.doctor(port=str(port))
    finally:
        server.close()
        await server.wait_closed()
    assert code == 1
    assert failing(checks) == ["tls"]
    assert "refuses TLS" in checks["tls"]["detail"]
    assert "never use sslmode" in checks["tls"]["fix"]
    assert checks["login"]["status"] == "skip"
    assert b"rds.amazonaws.com" not in received  # no token reached it


async def test_bad_ca(setup: Setup, tmp_path: Path) -> None:
    """A CA bundle that did not sign the server's certificate fails TLS; no token is sent."""
    other = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    code, checks, _ = await setup.doctor(ca=str(other))
    assert code == 1
    assert failing(checks) == ["tls"]
    assert "certificate verification failed" in checks["tls"]["detail"]
    assert "asyncpg-iam ca-bundle" in checks["tls"]["fix"]
    assert checks["login"]["status"] == "skip"
    assert setup.emulator.password_messages == 0


async def test_proxy_capturing_the_metadata_address(setup: Setup) -> None:
    """HTTP_PROXY with a NO_PROXY lacking 169.254.169.254 fails the proxy check with the fix."""
    env = {
        **setup.env,
        "HTTP_PROXY": "http://proxyuser:proxy-password-123@127.0.0.1:9",
        "NO_PROXY": "localhost,127.0.0.1",
    }
    code, checks, output = await setup.doctor(env=env)
    assert code == 1
    assert checks["proxy"]["status"] == FAIL
    assert "169.254.169.254 (instance metadata)" in checks["proxy"]["detail"]
    assert checks["proxy"]["fix"].startswith("export NO_PROXY=localhost,127.0.0.1,169.254.169.254")
    assert "proxy-password-123" not in output
    env["NO_PROXY"] = "localhost,127.0.0.1,169.254.169.254,169.254.170.2"
    code, checks, _ = await setup.doctor(env=env)
    assert checks["proxy"]["status"] == PASS, checks["proxy"]


async def test_no_credentials_at_all(setup: Setup) -> None:
    """With no credential source the credentials check fails with where to get some."""
    env = {k: v for k, v in setup.env.items() if k != "AWS_CONTAINER_CREDENTIALS_FULL_URI"}
    code, checks, _ = await setup.doctor(env=env)
    assert code == 1
    assert failing(checks) == ["credentials"]
    assert "no AWS credentials found" in checks["credentials"]["detail"]
    assert "AWS_PROFILE" in checks["credentials"]["fix"]
    for name in ("identity", "clock", "token", "login", "select"):
        assert checks[name]["status"] == "skip", name


async def test_dns_failure_skips_the_checks_that_need_an_address(
    setup: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A name that does not resolve fails dns once; tcp, tls and login are skipped, not failed.

    DNS itself cannot be asked here (no traffic off loopback): the loop's resolver answers as a
    resolver does for an unknown name, and the doctor runs in this process.
    """
    resolve_as_unknown(monkeypatch, "db.nowhere.invalid")
    for name, value in setup.env.items():
        monkeypatch.setenv(name, value)
    args = build_parser().parse_args(setup.args(host="db.nowhere.invalid")[0:])
    checks = {c.name: c for c in await run_checks(Context.from_args(args))}
    assert checks["dns"].status == FAIL
    assert "db.nowhere.invalid" in checks["dns"].detail
    for name in ("tcp", "tls", "login", "select"):
        assert checks[name].status == "skip", (name, checks[name])
    assert "needs an address" in checks["tcp"].detail


async def test_silent_port_says_no_answer_within_the_timeout(setup: Setup) -> None:
    """A port that accepts TCP and never answers: the TLS check names --timeout and a hint."""

    async def silent(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(10)
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        code, checks, _ = await setup.doctor(port=str(port), timeout="1")
    finally:
        server.close()
    assert code == 1
    assert checks["tcp"]["status"] == PASS
    assert "no answer to the TLS request within 1 s (--timeout)" in checks["tls"]["detail"]
    assert "check --host and --port" in checks["tls"]["fix"]


async def test_select_reports_the_server_version_as_the_server_does(
    setup: Setup, postgres_server: PostgresServer
) -> None:
    """The select check shows the version the server reports (15.18, not asyncpg's 15.0)."""
    import asyncpg

    con = await asyncpg.connect(
        host=postgres_server.host,
        port=postgres_server.port,
        user=postgres_server.user,
        password=postgres_server.password,
        database=postgres_server.database,
    )
    try:
        version = str(await con.fetchval("SHOW server_version")).split()[0]
    finally:
        await con.close()
    _code, checks, _ = await setup.doctor()
    assert f"(PostgreSQL {version})" in checks["select"]["detail"]


async def test_login_hints_use_the_command_lines_words(setup: Setup) -> None:
    """The login check's fix names --region and --signing-host, never IAMAuth(...)."""
    _code, checks, _ = await setup.doctor(region="eu-west-1")
    assert "--region" in checks["login"]["fix"]
    assert "IAMAuth(" not in checks["login"]["fix"]
    _code, checks, _ = await setup.doctor(host="localhost", signing_host=None)
    assert "--signing-host" in checks["login"]["fix"]
    assert "IAMAuth(" not in checks["login"]["fix"]


async def test_a_fix_is_printed_once(setup: Setup, tmp_path: Path) -> None:
    """When several checks share a fix, the text output prints it once."""
    code, out, _err = await run_cli(*setup.args(host="localhost", signing_host=None), env=setup.env)
    assert code == 1
    fixes = [line.split("-> fix: ", 1)[1] for line in out.splitlines() if "-> fix: " in line]
    assert fixes
    assert len(fixes) == len(set(fixes))


async def test_no_region_anywhere_fails_the_region_check_and_assumes_none(setup: Setup) -> None:
    """With no region given, in the host, the environment or the profile, the doctor says so."""
    env = {k: v for k, v in setup.env.items() if k not in ("AWS_REGION", "AWS_DEFAULT_REGION")}
    code, checks, output = await setup.doctor(env=env, host="localhost", signing_host=None)
    assert code == 1
    assert failing(checks) == ["region", "dns"]
    region = checks["region"]
    assert region["detail"].startswith("no AWS region found: no --region, localhost is not")
    assert "AWS_REGION and AWS_DEFAULT_REGION are not set" in region["detail"]
    assert "--region" in region["fix"]
    assert "AWS_REGION" in region["fix"]
    for name in ("identity", "token"):
        assert checks[name]["status"] == "skip", name
        assert "region" in checks[name]["detail"], name
    assert "us-east-1" not in output  # no region is made up, not even for STS
    assert setup.emulator.password_messages == 0


@pytest.mark.parametrize(
    ("variables", "config", "source"),
    [
        ({"AWS_REGION": "us-east-1"}, "", "AWS_REGION"),
        ({"AWS_DEFAULT_REGION": "us-east-1"}, "", "AWS_DEFAULT_REGION"),
        ({}, "[default]\nregion = us-east-1\n", "the default profile in the AWS config file"),
    ],
)
async def test_region_check_names_where_the_region_came_from(
    setup: Setup, tmp_path: Path, variables: dict[str, str], config: str, source: str
) -> None:
    """Dialling an address, the region comes from the environment or the profile: named."""
    config_file = tmp_path / "config"
    config_file.write_text(config)
    env = {k: v for k, v in setup.env.items() if k not in ("AWS_REGION", "AWS_DEFAULT_REGION")}
    env.update(variables, AWS_CONFIG_FILE=str(config_file))
    code, checks, output = await setup.doctor(env=env, signing_host=None)
    assert checks["region"]["status"] == PASS, output
    assert checks["region"]["detail"].startswith(f"us-east-1 (from {source}); 127.0.0.1 is not")
    assert checks["identity"]["status"] == PASS
    assert code == 1  # the address is not an RDS name: the dns check fails, the login too
    assert failing(checks) == ["dns", "login"]
