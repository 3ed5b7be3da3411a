"""asyncpg pools for Amazon RDS, Aurora PostgreSQL and RDS Proxy with IAM authentication.

    pool = await asyncpg_iam.create_pool(host="app.cluster-abc.us-east-1.rds.amazonaws.com",
                                         user="app", database="app", iam=True)

Every new connection gets a freshly signed token as its password, no connection lives past
`max_lifetime`, and AWS credentials come from the standard chain through aiobotocore, cached.
"""

import importlib
from typing import TYPE_CHECKING, Any

from ._auth import IAMAuth, SigningTarget
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
from ._pool import Pool, create_pool
from ._signing import Credentials, build_auth_token, build_dsql_token, region_from_host

if TYPE_CHECKING:
    from ._pool_stats import PoolSettings, PoolStats
    from ._retry import run_transaction
    from ._switchover import BlueGreenSettings
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

# Public names a pool does not need to start, loaded on first use (see `__getattr__`): a cold
# start (AWS Lambda) pays for no module it does not run. tests/test_serverless.py pins it.
_LAZY = {
    "AuroraTopology": "._topology",
    "BlueGreenSettings": "._switchover",
    "PoolSettings": "._pool_stats",
    "PoolStats": "._pool_stats",
    "run_transaction": "._retry",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    value.__module__ = __name__
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


# Public names report the public path (in reprs, tracebacks and docs), not the private module.
for _name in __all__:
    if _name != "__version__" and _name not in _LAZY:
        globals()[_name].__module__ = __name__
del _name
