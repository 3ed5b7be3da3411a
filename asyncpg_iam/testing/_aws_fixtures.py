"""pytest fixtures for the local AWS endpoints: `credential_server` and `moto_sts`."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from ._aws import AWS_CREDENTIAL_VARIABLES, CredentialServer, MotoSTS

__all__ = ["AWS_CREDENTIAL_VARIABLES", "credential_server", "isolate_aws_environment", "moto_sts"]


def isolate_aws_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Hide the host's AWS credentials, config files, proxies and instance metadata."""
    for name in AWS_CREDENTIAL_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    empty = tmp_path_factory.mktemp("aws-config")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(empty / "config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(empty / "credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_REGION", "us-east-1")


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
