"""pytest fixtures for the local AWS endpoints: `credential_server` and `moto_sts`."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from ._aws import AWS_CREDENTIAL_VARIABLES, CredentialServer, MotoSTS
from ._isolation import aws_isolation_variables

__all__ = ["AWS_CREDENTIAL_VARIABLES", "credential_server", "isolate_aws_environment", "moto_sts"]


def isolate_aws_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Hide the host's AWS credentials, config files, proxies and instance metadata.

    The ``monkeypatch`` form of `asyncpg_iam.testing.isolated_aws_environment`.
    """
    empty = tmp_path_factory.mktemp("aws-config")
    for name, value in aws_isolation_variables(empty, region="us-east-1").items():
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)


@pytest.fixture
def credential_server(
    monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[CredentialServer]:
    """Serve rotating container credentials and point the default chain at them.

    The server's `lifetime`, `rotate_every`, `clock` and fault switches may be changed by the
    test at any time.
    """
    isolate_aws_environment(monkeypatch, tmp_path_factory)
    with CredentialServer() as server:
        for name, value in server.env().items():
            monkeypatch.setenv(name, value)
        yield server


@pytest.fixture(scope="session")
def moto_sts() -> Iterator[MotoSTS]:
    """Run moto's server (STS and IAM) on a loopback port for the whole session.

    Point clients at it with ``monkeypatch.setenv`` over ``moto_sts.env()``.
    """
    with MotoSTS() as server:
        yield server
