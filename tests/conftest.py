"""The project's own tests use the same fixtures users get from the pytest plugin."""

from __future__ import annotations

import functools
from typing import Any, Protocol

import botocore.session
import pytest
from botocore.auth import SigV4QueryAuth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from asyncpg_iam.testing import AccessKey, RDSIAMEmulator

pytest_plugins = ["asyncpg_iam.testing.pytest_plugin", "asyncpg_iam.testing._leak_guard"]


class TokenFactory(Protocol):
    def __call__(
        self,
        *,
        key: AccessKey | None = None,
        host: str | None = None,
        port: int | None = None,
        user: str | None = None,
        region: str | None = None,
    ) -> str: ...


@functools.lru_cache(maxsize=32)
def _rds_client(access_key: str, secret_key: str, session_token: str | None, region: str) -> Any:
    # Creating a botocore client costs ~100 ms the first time: reuse them across tests.
    return botocore.session.get_session().create_client(
        "rds",
        region_name=region,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        aws_session_token=session_token,
    )


def botocore_token(key: AccessKey, *, host: str, port: int, user: str, region: str) -> str:
    """Sign a token with botocore's own `generate_db_auth_token`."""
    client = _rds_client(key.access_key, key.secret_key, key.session_token, region)
    token: str = client.generate_db_auth_token(
        DBHostname=host, Port=port, DBUsername=user, Region=region
    )
    return token


def presigned_token(
    key: AccessKey,
    *,
    host: str,
    port: int,
    user: str,
    region: str,
    service: str = "rds-db",
    action: str = "connect",
) -> str:
    """Sign a token with botocore's SigV4 query signer, for a chosen service and action."""
    request = AWSRequest(
        method="GET", url=f"https://{host}:{port}/", params={"Action": action, "DBUser": user}
    )
    credentials = Credentials(key.access_key, key.secret_key, key.session_token)
    SigV4QueryAuth(credentials, service, region, expires=900).add_auth(request)
    url: str = request.url
    return url[len("https://") :]


@pytest.fixture
def make_token(rds_emulator: RDSIAMEmulator, rds_access_key: AccessKey) -> TokenFactory:
    """Sign botocore tokens for the emulator; each argument overrides what the emulator wants."""

    def make(
        *,
        key: AccessKey | None = None,
        host: str | None = None,
        port: int | None = None,
        user: str | None = None,
        region: str | None = None,
    ) -> str:
        return botocore_token(
            key or rds_access_key,
            host=host or rds_emulator.endpoint,
            port=port or rds_emulator.endpoint_port,
            user=user or "postgres",
            region=region or rds_emulator.region,
        )

    return make
