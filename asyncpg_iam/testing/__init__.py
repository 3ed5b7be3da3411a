"""Test helpers: the whole local stack as one (`Sandbox`), a throwaway PostgreSQL, a local RDS
IAM emulator, local AWS endpoints, a failover rehearsal (`FailoverCluster`), an Aurora-like
cluster with instance endpoints (`AuroraCluster`), a blue/green switchover
(`BlueGreenDeployment`), a clock that moves
only when told (`ManualClock`), an isolated AWS environment, and a pytest plugin.

Enable the fixtures in a test suite with ``pytest_plugins = ["asyncpg_iam.testing.pytest_plugin"]``.
Needs the ``testing`` extra (``pip install 'asyncpg-iam[testing]'``) for TLS certificates.
"""

from __future__ import annotations

from .._clock import ManualClock
from ._aurora import AuroraCluster, AuroraInstance
from ._aws import CredentialServer, MotoSTS
from ._bluegreen import (
    DEFAULT_BLUE_ENDPOINT,
    DEFAULT_GREEN_ENDPOINT,
    BlueGreenDeployment,
    SwitchoverTimeline,
)
from ._emulator import (
    DEFAULT_DSQL_ENDPOINT,
    DEFAULT_ENDPOINT,
    DEFAULT_PROXY_ENDPOINT,
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
from ._isolation import isolated_aws_environment
from ._netns import NetworkPartition
from ._postgres import PostgresCluster, PostgresNotFoundError, PostgresServer, find_postgres_bin
from ._proxy import PinEvent, PinRules, ProxyReport
from ._sandbox import Sandbox

__all__ = [
    "DEFAULT_BLUE_ENDPOINT",
    "DEFAULT_CLUSTER_ENDPOINT",
    "DEFAULT_DSQL_ENDPOINT",
    "DEFAULT_ENDPOINT",
    "DEFAULT_GREEN_ENDPOINT",
    "DEFAULT_PROXY_ENDPOINT",
    "DEFAULT_READER_ENDPOINT",
    "AccessKey",
    "AuroraCluster",
    "AuroraInstance",
    "BlueGreenDeployment",
    "ClusterEndpoint",
    "CredentialServer",
    "FailoverCluster",
    "FailoverTimeline",
    "LoginRecord",
    "ManualClock",
    "MotoSTS",
    "NetworkPartition",
    "PinEvent",
    "PinRules",
    "PostgresCluster",
    "PostgresNotFoundError",
    "PostgresServer",
    "ProxyReport",
    "RDSIAMEmulator",
    "ReaderEndpoint",
    "RelayedConnection",
    "Sandbox",
    "SwitchoverTimeline",
    "find_postgres_bin",
    "isolated_aws_environment",
]

# Public names report the public path (in reprs, tracebacks and docs), not the private module.
for _name in __all__:
    if not _name.isupper():  # the DEFAULT_* constants are strings
        globals()[_name].__module__ = __name__
del _name
