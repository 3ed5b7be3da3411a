"""The public API as users see it, pinned: names, where they say they live, and signatures.

An added, removed or renamed public name, or a changed signature, fails here: update this list
deliberately, with a CHANGELOG entry.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import importlib
import inspect
import pickle
from typing import Any

import pytest

import asyncpg_iam

PUBLIC = {
    "asyncpg_iam": [
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
    ],
    "asyncpg_iam.testing": [
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
    ],
    "asyncpg_iam.otel": ["PoolInstrumentation", "instrument_pool"],
    "asyncpg_iam.starlette": ["PoolState", "close_pool", "connection", "get_pool", "lifespan"],
    "asyncpg_iam.sqlalchemy": ["create_async_engine"],
}

SIGNATURES = {
    "asyncpg_iam.create_pool": [
        "dsn", "iam", "max_lifetime", "max_lifetime_jitter", "max_connect_rate", "health_check",
        "asyncpg_kwargs",
    ],
    "asyncpg_iam.IAMAuth": [
        "region", "profile", "role_arn", "role_session_name", "external_id", "role_duration",
        "credentials", "session", "signing_host", "signing_port", "token_reuse",
        "insecure_unverified_tls", "service", "dsql_admin",
    ],
    "asyncpg_iam.build_auth_token": ["host", "port", "user", "region", "credentials", "now"],
    "asyncpg_iam.build_dsql_token": [
        "host", "region", "credentials", "admin", "expires_in", "now"
    ],
    "asyncpg_iam.run_transaction": [
        "target", "fn", "retries", "backoff", "max_backoff", "isolation", "timeout", "clock", "rng"
    ],
    "asyncpg_iam.testing.Sandbox": [
        "server", "postgres_settings", "endpoint", "port", "iam_users", "access_key",
        "credential_server", "credential_lifetime", "sts", "accept_any_password", "ca", "clock",
        "isolate_environment",
    ],
    "asyncpg_iam.testing.isolated_aws_environment": ["region", "variables"],
    "asyncpg_iam.otel.instrument_pool": ["pool", "meter_provider", "histograms"],
    "asyncpg_iam.starlette.lifespan": [
        "dsn", "close_timeout", "app_lifespan", "metrics", "keep_pool", "create_pool_kwargs"
    ],
    "asyncpg_iam.sqlalchemy.create_async_engine": [
        "url", "iam", "max_lifetime", "max_lifetime_jitter", "max_connect_rate", "connect_args",
        "name", "health_check", "topology", "blue_green", "engine_kwargs",
    ],
}  # fmt: skip

POOL_STATS = [
    "connections_opened", "connections_closed", "connect_attempts", "connect_failures",
    "auth_failures", "tokens_signed", "token_reuses", "credential_fetches",
    "connects_rate_limited", "handed_out_due", "open_connections", "failover_events",
    "failover_retired", "read_only_retries", "connect_retries", "auth_failures_by_cause",
    "credential_fetch_failures", "credentials_expiry", "acquire_timeouts", "waiting_acquires",
    "silent_hosts", "health_probes", "topology_refreshes", "connections_by_instance",
    "blue_green_phase", "blue_green_holds", "blue_green_hold_timeouts", "blue_green_reroutes",
    "blue_green_fallback_refusals",
]  # fmt: skip


POOL_SETTINGS = [
    "endpoints", "user", "database", "tls_mode", "tls_mode_source", "ca_source",
    "target_session_attrs", "signing_targets", "max_lifetime", "max_connect_rate",
]  # fmt: skip

SIGNING_TARGET = [
    "host", "port", "signing_host", "signing_port", "user", "region", "region_source",
    "endpoint_region", "service", "admin",
]  # fmt: skip


def _resolve(path: str) -> object:
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


@pytest.mark.parametrize("module", sorted(PUBLIC))
def test_public_names_are_exactly_the_pinned_ones(module: str) -> None:
    """Each public module exports exactly the pinned names, sorted, and each exists."""
    loaded = importlib.import_module(module)
    assert loaded.__all__ == PUBLIC[module]
    for name in PUBLIC[module]:
        assert hasattr(loaded, name), name


def test_root_names_report_the_public_path() -> None:
    """Classes and functions of the package root say asyncpg_iam, not a private module."""
    for name in PUBLIC["asyncpg_iam"]:
        if name != "__version__":  # a string
            assert getattr(asyncpg_iam, name).__module__ == "asyncpg_iam", name
    assert repr(asyncpg_iam.IAMAuth).startswith("<class 'asyncpg_iam.IAMAuth'")


def test_testing_names_report_the_public_path() -> None:
    """Classes and functions of asyncpg_iam.testing report it, not a private module."""
    testing = importlib.import_module("asyncpg_iam.testing")
    for name in PUBLIC["asyncpg_iam.testing"]:
        if not name.isupper():  # the DEFAULT_* constants are strings
            assert getattr(testing, name).__module__ == "asyncpg_iam.testing", name
    assert repr(testing.Sandbox).startswith("<class 'asyncpg_iam.testing.Sandbox'")


@pytest.mark.parametrize("path", sorted(SIGNATURES))
def test_signatures_are_pinned(path: str) -> None:
    """The main entry points take exactly the pinned parameters, in order."""
    assert list(inspect.signature(_resolve(path)).parameters) == SIGNATURES[path]  # type: ignore[arg-type]


def test_pool_stats_fields_are_pinned() -> None:
    """PoolStats has exactly the pinned fields, in order."""
    assert [field.name for field in dataclasses.fields(asyncpg_iam.PoolStats)] == POOL_STATS


@pytest.mark.parametrize(
    ("cls", "fields"),
    [("PoolSettings", POOL_SETTINGS), ("SigningTarget", SIGNING_TARGET)],
)
def test_settings_fields_are_pinned(cls: str, fields: list[str]) -> None:
    """PoolSettings and SigningTarget have exactly the pinned fields, in order."""
    value = getattr(asyncpg_iam, cls)
    if dataclasses.is_dataclass(value):
        assert [field.name for field in dataclasses.fields(value)] == fields
    else:
        assert list(value._fields) == fields
        assert list(inspect.signature(value).parameters) == fields


def _values() -> list[tuple[object, dict[str, object]]]:
    """One value of each public settings class, and a valid change to it."""
    expiry = datetime.datetime(2030, 1, 1, tzinfo=datetime.timezone.utc)
    return [
        (asyncpg_iam.IAMAuth(region="eu-west-1", token_reuse=60.0), {"region": "us-east-1"}),
        (asyncpg_iam.Credentials("AKIAEXAMPLEKEY123456", "s3cr3t", "t0", expiry), {"token": None}),
        (asyncpg_iam.HealthCheck(interval=2.0), {"count": 5}),
        (
            asyncpg_iam.SigningTarget("h", 5432, "h.x.eu-west-1.rds.amazonaws.com", 5432, "u",
                                      "eu-west-1", "the RDS endpoint name", "eu-west-1"),
            {"port": 6432},
        ),
    ]  # fmt: skip


@pytest.mark.parametrize(("value", "change"), _values(), ids=lambda v: type(v).__name__)
def test_settings_values_are_frozen_comparable_and_replaceable(
    value: Any, change: dict[str, object]
) -> None:
    """IAMAuth, Credentials, HealthCheck and SigningTarget are immutable values: equal field by
    field, hashable, replaced into checked copies, pickled and copied whole."""
    fields = type(value)._fields
    same = type(value)(**{name: getattr(value, name) for name in fields})
    assert same == value
    assert hash(same) == hash(value)
    assert same is not value
    with pytest.raises(AttributeError, match="immutable"):
        value.port = 1
    changed = value.replace(**change)
    assert changed != value
    assert [getattr(changed, name) for name in change] == list(change.values())
    assert all(getattr(changed, n) == getattr(value, n) for n in fields if n not in change)
    with pytest.raises(TypeError, match="no field nonsense"):
        value.replace(nonsense=1)
    assert pickle.loads(pickle.dumps(value)) == value
    assert copy.copy(value) == value
    assert copy.deepcopy(value) == value
    assert not hasattr(value, "__dict__")


def test_settings_values_check_their_fields_again_when_replaced() -> None:
    """A replaced value is checked as a new one: a bad change raises ConfigurationError."""
    with pytest.raises(asyncpg_iam.ConfigurationError, match="region"):
        asyncpg_iam.IAMAuth().replace(region="nowhere")
    with pytest.raises(asyncpg_iam.ConfigurationError, match="interval"):
        asyncpg_iam.HealthCheck().replace(interval=-1)


def test_iam_auth_equality_ignores_the_session_and_credentials_reprs_hide_secrets() -> None:
    """Two IAMAuth differing only in `session` are equal; a Credentials repr shows no secret."""
    assert asyncpg_iam.IAMAuth(session=object()) == asyncpg_iam.IAMAuth()  # type: ignore[arg-type]
    credentials = asyncpg_iam.Credentials("AKIAEXAMPLEKEY123456", "s3cr3t", "t0ken")
    assert "s3cr3t" not in repr(credentials)
    assert "t0ken" not in repr(credentials)
    assert "s3cr3t" not in repr(asyncpg_iam.IAMAuth(credentials=credentials))


def test_version_comes_from_the_installed_metadata() -> None:
    """asyncpg_iam.__version__ is the installed distribution's version."""
    from importlib import metadata

    assert asyncpg_iam.__version__ == metadata.version("asyncpg-iam")
    assert asyncpg_iam.__version__ != "0+unknown"
