"""Where the RDS CA bundle lives, and the TLS context IAM connections use by default."""

from __future__ import annotations

import os
import ssl
from pathlib import Path

__all__ = ["ca_bundle_path", "default_ssl_context"]

#: Environment variable naming a CA bundle to use instead of the cached RDS bundle.
CA_BUNDLE_ENV = "ASYNCPG_IAM_CA_BUNDLE"
CA_BUNDLE_FILENAME = "rds-global-bundle.pem"


def cache_dir() -> Path:
    """Return the directory where asyncpg-iam caches downloads (XDG cache convention)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "asyncpg-iam"


def ca_bundle_path() -> Path | None:
    """Return the CA bundle to verify RDS servers with, or None when there is none.

    ``$ASYNCPG_IAM_CA_BUNDLE`` wins; otherwise the bundle that ``asyncpg-iam ca-bundle``
    downloaded into the cache directory, if it exists.
    """
    explicit = os.environ.get(CA_BUNDLE_ENV)
    if explicit:
        return Path(explicit)
    cached = cache_dir() / CA_BUNDLE_FILENAME
    return cached if cached.is_file() else None


def default_ssl_context() -> ssl.SSLContext:
    """Return a verify-full client context: the RDS CA bundle if known, else the system store."""
    bundle = ca_bundle_path()
    context = ssl.create_default_context(cafile=str(bundle) if bundle is not None else None)
    context.check_hostname = True
    context.verify_mode = ssl.CERT_REQUIRED
    return context
