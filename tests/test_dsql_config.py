"""A pool for an Aurora DSQL endpoint gets DSQL tokens, defaults and limits, decided at creation."""

from __future__ import annotations

import datetime as dt
import ssl
from typing import Any

import pytest

import asyncpg_iam
from asyncpg_iam import ConfigurationError, Credentials, IAMAuth
from asyncpg_iam._dsql import DEFAULT_CONNECT_RATE, DEFAULT_MAX_LIFETIME, MAX_LIFETIME

DSQL = "abcdefghijklmnopqrstuvwxyz.dsql.eu-west-1.on.aws"
RDS = "mydb.abcdefghijkl.us-east-1.rds.amazonaws.com"
CREDS = Credentials("AKIDEXAMPLE", "secret")


@pytest.fixture(autouse=True)
def _no_libpq_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("PGDATABASE", "PGSSLMODE", "PGSSLROOTCERT", "PGHOST"):
        monkeypatch.delenv(name, raising=False)


async def test_dsql_endpoint_gets_dsql_defaults() -> None:
    """A DSQL host: database postgres, max_lifetime 3300 s, 50 connects/s, DSQL region."""
    pool = asyncpg_iam.create_pool(host=DSQL, user="admin")
    assert pool.settings.database == "postgres"
    assert pool.settings.max_lifetime == DEFAULT_MAX_LIFETIME == 3300.0
    assert pool.settings.max_connect_rate is not None
    assert pool.settings.max_connect_rate == DEFAULT_CONNECT_RATE < 100
    target = pool.settings.signing_targets[0]
    assert (target.service, target.admin, target.region) == ("dsql", True, "eu-west-1")
    assert target.region_source == "the DSQL endpoint name"
    context = pool._connector.plan.tls.context
    assert isinstance(context, ssl.SSLContext)
    assert context.check_hostname
    assert context.verify_mode == ssl.CERT_REQUIRED
    # DSQL's certificates come from a public CA: the system store, not the RDS bundle.
    assert pool._connector.plan.tls.ca_file is None
    assert "system store" in pool.settings.ca_source


async def test_rds_endpoint_keeps_rds_defaults() -> None:
    """An RDS host keeps max_lifetime 900 s, no rate limit and the user's database."""
    pool = asyncpg_iam.create_pool(host=RDS, user="app")
    assert pool.settings.max_lifetime == 900.0
    assert pool.settings.max_connect_rate is None
    assert pool.settings.database == "app"
    assert pool.settings.signing_targets[0].service == "rds"


@pytest.mark.parametrize("max_lifetime", [3600.01, 7200, None])
async def test_dsql_lifetime_is_capped(max_lifetime: float | None) -> None:
    """max_lifetime above DSQL's one hour (or None, forever) is a ConfigurationError."""
    with pytest.raises(ConfigurationError, match="at most 3600 s for Aurora DSQL"):
        asyncpg_iam.create_pool(host=DSQL, user="app", max_lifetime=max_lifetime)


async def test_dsql_explicit_settings_win() -> None:
    """Explicit max_lifetime, max_connect_rate (None too) and database are kept for DSQL."""
    pool = asyncpg_iam.create_pool(
        host=DSQL, user="app", max_lifetime=MAX_LIFETIME, max_connect_rate=None, database="x"
    )
    assert pool.settings.max_lifetime == 3600
    assert pool.settings.max_connect_rate is None
    assert pool.settings.database == "x"
    pool = asyncpg_iam.create_pool(f"postgresql://app@{DSQL}/other", max_connect_rate=10)
    assert pool.settings.database == "other"
    assert pool.settings.max_connect_rate is not None
    assert pool.settings.max_connect_rate == 10


@pytest.mark.parametrize(
    ("user", "iam", "admin"),
    [
        ("admin", IAMAuth(), True),
        ("app", IAMAuth(), False),
        ("app", IAMAuth(dsql_admin=True), True),
        ("admin", IAMAuth(dsql_admin=False), False),
    ],
)
async def test_admin_action_follows_user_unless_overridden(
    user: str, iam: IAMAuth, admin: bool
) -> None:
    """The user admin signs DbConnectAdmin, others DbConnect; dsql_admin overrides either way."""
    pool = asyncpg_iam.create_pool(host=DSQL, user=user, iam=iam)
    assert pool.settings.signing_targets[0].admin is admin


async def test_service_dsql_for_a_cname() -> None:
    """IAMAuth(service='dsql') makes a CNAME a DSQL pool; the region must then be given."""
    pool = asyncpg_iam.create_pool(
        host="db.internal", user="app", iam=IAMAuth(service="dsql", region="us-east-2")
    )
    target = pool.settings.signing_targets[0]
    assert (target.service, target.region) == ("dsql", "us-east-2")
    assert pool.settings.max_lifetime == DEFAULT_MAX_LIFETIME
    # service='rds' turns detection off for a DSQL-looking name.
    pool = asyncpg_iam.create_pool(host=DSQL, user="app", iam=IAMAuth(service="rds"))
    assert pool.settings.signing_targets[0].service == "rds"
    assert pool.settings.max_lifetime == 900.0


async def test_signing_host_names_the_dsql_endpoint() -> None:
    """A tunnel to DSQL: signing_host decides, and its region is read from it."""
    pool = asyncpg_iam.create_pool(
        host="127.0.0.1", port=15432, user="app", iam=IAMAuth(signing_host=DSQL)
    )
    target = pool.settings.signing_targets[0]
    assert (target.service, target.region, target.signing_host) == ("dsql", "eu-west-1", DSQL)


async def test_provider_signs_dsql_tokens() -> None:
    """The pool's token provider signs a DSQL token equal to build_dsql_token's."""
    pool = asyncpg_iam.create_pool(host=DSQL, user="admin", iam=IAMAuth(credentials=CREDS))
    assert pool._connector.provider is not None
    now = dt.datetime.now(dt.timezone.utc)
    token = await pool._connector.provider.token(pool.settings.signing_targets[0])
    assert token.startswith(f"{DSQL}/?Action=DbConnectAdmin&")
    expected = asyncpg_iam.build_dsql_token(
        host=DSQL, region="eu-west-1", credentials=CREDS, admin=True, now=now
    )
    assert token.partition("X-Amz-Date=")[0] == expected.partition("X-Amz-Date=")[0]
    await pool._connector.provider.aclose()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"service": "aurora"}, "service must be 'rds'"),
        ({"dsql_admin": "yes"}, "dsql_admin must be True"),
    ],
)
def test_dsql_iam_arguments_are_validated(kwargs: dict[str, Any], message: str) -> None:
    """IAMAuth's DSQL arguments are checked at construction."""
    with pytest.raises(ConfigurationError, match=message):
        IAMAuth(**kwargs)


async def test_sqlalchemy_engine_gets_dsql_defaults() -> None:
    """The SQLAlchemy engine applies the same DSQL defaults and cap as the pool."""
    from asyncpg_iam.sqlalchemy import create_async_engine

    engine = create_async_engine(f"postgresql+asyncpg://admin@{DSQL}")
    try:
        assert engine.sync_engine.pool._recycle == DEFAULT_MAX_LIFETIME
    finally:
        await engine.dispose()
    with pytest.raises(ConfigurationError, match="at most 3600 s"):
        create_async_engine(f"postgresql+asyncpg://admin@{DSQL}", max_lifetime=4000)


async def test_cached_rds_bundle_is_not_used_for_dsql(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    """With the RDS CA bundle cached, a DSQL pool still verifies against the system store."""
    from asyncpg_iam import _tls

    monkeypatch.delenv(_tls.CA_BUNDLE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    bundle = tmp_path / "asyncpg-iam" / _tls.CA_BUNDLE_FILENAME
    bundle.parent.mkdir()
    bundle.write_text("not read for DSQL\n")
    assert _tls.ca_bundle_path() == bundle
    pool = asyncpg_iam.create_pool(host=DSQL, user="admin")
    assert pool._connector.plan.tls.ca_file is None
    assert pool.settings.tls_mode == "verify-full"
    # An explicit root certificate still wins (here one that cannot load).
    with pytest.raises(ConfigurationError, match="CA bundle"):
        asyncpg_iam.create_pool(host=DSQL, user="admin", sslrootcert=str(bundle))


async def test_set_connect_args_keeps_dsql_defaults() -> None:
    """New connection arguments for a DSQL pool get the same DSQL defaults (database, TLS)."""
    pool = asyncpg_iam.create_pool(host=DSQL, user="admin")
    pool.set_connect_args(host=DSQL.replace("abcdefghijklmnopqrstuvwxyz", "other"), user="admin")
    plan = pool._connector.plan
    assert plan.database == "postgres"
    assert plan.tls.ca_file is None
    assert pool.settings.signing_targets[0].signing_host.startswith("other.dsql.")
