"""Bad arguments raise ConfigurationError at creation, with a message that says what to pass."""

from __future__ import annotations

from typing import Any

import pytest

import asyncpg_iam
from asyncpg_iam import ConfigurationError, IAMAuth

RDS = "mydb.abcdefghijkl.us-east-1.rds.amazonaws.com"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_lifetime": -1}, "max_lifetime must be seconds"),
        ({"max_lifetime": 0}, "max_lifetime must be seconds"),
        ({"max_lifetime": float("nan")}, "max_lifetime must be seconds"),
        ({"max_lifetime_jitter": 1.0}, r"max_lifetime_jitter must be a fraction in \[0, 1\)"),
        ({"max_lifetime_jitter": -0.1}, r"max_lifetime_jitter must be a fraction in \[0, 1\)"),
        ({"max_lifetime": True}, "max_lifetime must be seconds > 0"),
        ({"max_lifetime": float("inf")}, "max_lifetime must be seconds > 0"),
        ({"max_lifetime": 10**400}, "max_lifetime must be seconds > 0"),
        ({"max_lifetime_jitter": float("nan")}, r"max_lifetime_jitter must be a fraction"),
        ({"max_connect_rate": 0}, "max_connect_rate must be new connections per second"),
        ({"max_connect_rate": 10**400}, "max_connect_rate must be new connections per second"),
        ({"max_connect_rate": 1e-300}, "max_connect_rate must be new connections per second"),
        ({"max_connect_rate": True}, "max_connect_rate must be new connections per second"),
        ({"port": 70000}, "port must be a TCP port from 1 to 65535"),
        ({"host": " "}, "host must be a host name or address"),
        ({"iam": "yes"}, "iam must be True"),
        ({"password": "secret"}, "password cannot be combined with IAM"),
        ({"ssl": "prefer"}, r"sslmode 'prefer' \(from ssl='prefer'\) could send the IAM token"),
        ({"host": "/var/run/postgresql"}, "is a Unix socket"),
    ],
)
async def test_pool_arguments_are_validated(kwargs: dict[str, Any], message: str) -> None:
    """Each invalid pool argument raises ConfigurationError (also a ValueError) naming it."""
    arguments: dict[str, Any] = {"host": RDS, "user": "app", "ssl": "verify-full"}
    arguments.update(kwargs)
    with pytest.raises(ConfigurationError, match=message) as caught:
        asyncpg_iam.create_pool(**arguments)
    assert isinstance(caught.value, ValueError)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"region": "US East"}, "is not an AWS region name"),
        ({"region": "useast1"}, "is not an AWS region name"),
        ({"region": "us-east-1\n"}, "is not an AWS region name"),
        ({"role_arn": "arn:aws:iam::123456789012:role/app\n"}, "is not an IAM role ARN"),
        ({"signing_port": 0}, "signing_port must be a TCP port from 1 to 65535"),
        ({"signing_port": 70000}, "signing_port must be a TCP port from 1 to 65535"),
        ({"signing_host": "db.example.com:5432/x"}, "signing_host must be the RDS endpoint"),
        ({"signing_host": "mydb.rds.amazonaws.com)"}, "signing_host must be the RDS endpoint"),
        ({"signing_host": "a..b"}, "signing_host must be the RDS endpoint"),
        ({"token_reuse": 841}, "token_reuse must be seconds from 0"),
        ({"token_reuse": -1}, "token_reuse must be seconds from 0"),
        ({"role_arn": "arn:aws:iam::123:user/x"}, "is not an IAM role ARN"),
        ({"role_session_name": "x"}, "only apply with role_arn"),
        (
            {"role_arn": "arn:aws:iam::123456789012:role/app", "role_duration": 60},
            "role_duration must be whole seconds from 900 to 43200",
        ),
        (
            {
                "credentials": asyncpg_iam.Credentials(access_key="AKIA", secret_key="s"),
                "profile": "dev",
            },
            "either credentials or profile",
        ),
    ],
)
def test_iam_auth_arguments_are_validated(kwargs: dict[str, Any], message: str) -> None:
    """Each invalid IAMAuth argument raises ConfigurationError with the allowed values."""
    with pytest.raises(ConfigurationError, match=message):
        IAMAuth(**kwargs)


async def test_no_region_from_any_source(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    """A non-RDS host with no region configured anywhere says how to give one."""
    for name in ("AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    with pytest.raises(ConfigurationError, match=r"no AWS region for 'db\.internal'"):
        asyncpg_iam.create_pool(host="db.internal", user="app")


async def test_region_comes_from_endpoint_then_configuration(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The endpoint name's region wins over AWS_REGION; AWS_REGION serves other names."""
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    pool = asyncpg_iam.create_pool(host=RDS, user="app")
    assert pool.settings.signing_targets[0].region == "us-east-1"
    pool = asyncpg_iam.create_pool(host="db.internal", user="app")
    assert (
        pool.settings.signing_targets[0].region,
        pool.settings.signing_targets[0].region_source,
    ) == (
        "eu-west-1",
        "AWS_REGION",
    )


async def test_default_tls_is_verify_full() -> None:
    """Without ssl options an IAM pool verifies the certificate and the host name."""
    pool = asyncpg_iam.create_pool(host=RDS, user="app")
    context = pool._connector.plan.tls.context
    assert context is not None
    assert context.check_hostname is True
    assert context.verify_mode.name == "CERT_REQUIRED"
