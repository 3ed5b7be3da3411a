"""Test helpers: a throwaway PostgreSQL, a local RDS IAM emulator, a failover rehearsal
(`FailoverCluster`), and a pytest plugin.

Enable the fixtures in a test suite with ``pytest_plugins = ["asyncpg_iam.testing.pytest_plugin"]``.
Needs the ``testing`` extra (``pip install asyncpg-iam[testing]``) for TLS certificates.
"""

from __future__ import annotations

from ._aws import CredentialServer, MotoSTS
from ._emulator import (
    DEFAULT_DSQL_ENDPOINT,
    DEFAULT_ENDPOINT,
    AccessKey,
    LoginRecord,
    RDSIAMEmulator,
    RelayedConnection,
)
from ._failover import (
    DEFAULT_CLUSTER_ENDPOINT,
    DEFAULT_READER_ENDPOINT,
    ClusterEndpoint,
    FailoverCluster,
    FailoverTimeline,
    ReaderEndpoint,
)
from ._postgres import PostgresCluster, PostgresNotFoundError, PostgresServer, find_postgres_bin

__all__ = [
    "DEFAULT_CLUSTER_ENDPOINT",
    "DEFAULT_DSQL_ENDPOINT",
    "DEFAULT_ENDPOINT",
    "DEFAULT_READER_ENDPOINT",
    "AccessKey",
    "ClusterEndpoint",
    "CredentialServer",
    "FailoverCluster",
    "FailoverTimeline",
    "LoginRecord",
    "MotoSTS",
    "PostgresCluster",
    "PostgresNotFoundError",
    "PostgresServer",
    "RDSIAMEmulator",
    "ReaderEndpoint",
    "RelayedConnection",
    "find_postgres_bin",
]
