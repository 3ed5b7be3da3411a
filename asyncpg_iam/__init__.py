"""asyncpg pools for Amazon RDS, Aurora PostgreSQL and RDS Proxy with IAM authentication."""

from __future__ import annotations

from ._errors import ConfigurationError, CredentialsError, IAMAuthenticationError, IAMError

__all__ = [
    "ConfigurationError",
    "CredentialsError",
    "IAMAuthenticationError",
    "IAMError",
]
