"""asyncpg pools for Amazon RDS, Aurora PostgreSQL and RDS Proxy with IAM authentication.

    pool = await asyncpg_iam.create_pool(host="app.cluster-abc.us-east-1.rds.amazonaws.com",
                                         user="app", database="app", iam=True)

Every new connection gets a freshly signed token as its password, no connection lives past
`max_lifetime`, and AWS credentials come from the standard chain through aiobotocore, cached.
"""

from ._auth import IAMAuth, SigningTarget
from ._bluegreen import BlueGreenSettings
from ._errors import (
    CommitOutcomeUnknownError,
    ConfigurationError,
    ConnectError,
    ConnectTimeoutError,
    CredentialsError,
    IAMAuthenticationError,
    IAMError,
    NoWriterError,
    SwitchoverTimeoutError,
    TLSVerificationError,
)
from ._health import HealthCheck
from ._pool import Pool, PoolSettings, PoolStats, create_pool
from ._retry import run_transaction
from ._signing import Credentials, build_auth_token, build_dsql_token, region_from_host
from ._topology import AuroraTopology

__all__ = [
    "AuroraTopology",
    "BlueGreenSettings",
    "CommitOutcomeUnknownError",
    "ConfigurationError",
    "ConnectError",
    "ConnectTimeoutError",
    "Credentials",
    "CredentialsError",
    "HealthCheck",
    "IAMAuth",
    "IAMAuthenticationError",
    "IAMError",
    "NoWriterError",
    "Pool",
    "PoolSettings",
    "PoolStats",
    "SigningTarget",
    "SwitchoverTimeoutError",
    "TLSVerificationError",
    "__version__",
    "build_auth_token",
    "build_dsql_token",
    "create_pool",
    "region_from_host",
    "run_transaction",
]

# The one place the version is written: hatchling reads it from here for the distribution.
__version__ = "0.1.0"

# Public names report the public path (in reprs, tracebacks and docs), not the private module.
for _name in __all__:
    if _name != "__version__":
        globals()[_name].__module__ = __name__
del _name
