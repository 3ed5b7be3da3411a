"""pytest fixtures for code that talks to RDS with IAM authentication.

Enable in a test suite's ``conftest.py``::

    pytest_plugins = ["asyncpg_iam.testing.pytest_plugin"]

Fixtures:

- ``postgres_server`` (session): a `PostgresServer`. The backend is the first that answers of:
  a DSN in ``ASYNCPG_IAM_TEST_DSN``; a throwaway cluster from the local PostgreSQL binaries;
  testcontainers' PostgreSQL when a Docker engine answers (image ``ASYNCPG_IAM_TEST_PG_IMAGE``,
  default ``postgres:16-alpine``; one container for the whole session). Otherwise the tests that
  need it are skipped with a message saying how to get one.
  ``ASYNCPG_IAM_TEST_BACKEND=dsn|local|container`` forces one: then a backend that cannot be had
  fails the tests instead of skipping them, so a lane never passes on the wrong backend.
- ``rds_access_key``: the `AccessKey` the emulator trusts (fresh secret each session).
- ``rds_emulator``: a started `RDSIAMEmulator` in front of ``postgres_server``, with the
  backend's user enabled for IAM and ``rds_access_key`` registered.
- ``rds_proxy_emulator``: the same in RDS Proxy mode: it counts pinned sessions by reason and
  cause (``proxy_report()``) and refuses the ``options`` startup parameter.
- ``credential_server`` and ``moto_sts``: see `asyncpg_iam.testing.CredentialServer`.
- ``iam_emulator``: ``rds_emulator`` trusting every key ``credential_server`` issues, so a pool
  on the default AWS chain logs in; ``iam_emulator.pool_kwargs(user=...)`` gives its arguments.
- ``sandbox``: a started `asyncpg_iam.testing.Sandbox` on ``postgres_server`` (emulator,
  credential server, the AWS environment isolated and pointed at it for the test);
  ``sandbox.pool_kwargs()`` gives a pool's arguments.

The pytest header names the backend that will be used, the terminal summary the one that was.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest
import pytest_asyncio

from ._aws import CredentialServer
from ._aws_fixtures import credential_server, moto_sts  # noqa: F401
from ._emulator import DEFAULT_PROXY_ENDPOINT, AccessKey, RDSIAMEmulator
from ._postgres import PostgresCluster, PostgresNotFoundError, PostgresServer, find_postgres_bin
from ._sandbox import Sandbox

__all__ = [
    "BACKEND_PROVIDERS",
    "BACKEND_VARIABLE",
    "DEFAULT_PG_IMAGE",
    "DSN_VARIABLE",
    "PG_IMAGE_VARIABLE",
    "BackendUnavailable",
    "backend_container",
    "iam_emulator",
    "postgres_server",
    "rds_access_key",
    "rds_emulator",
    "rds_proxy_emulator",
    "sandbox",
    "select_backend",
]

DSN_VARIABLE = "ASYNCPG_IAM_TEST_DSN"
BACKEND_VARIABLE = "ASYNCPG_IAM_TEST_BACKEND"
PG_IMAGE_VARIABLE = "ASYNCPG_IAM_TEST_PG_IMAGE"
DEFAULT_PG_IMAGE = "postgres:16-alpine"
_HOW_TO_GET_ONE = (
    "no PostgreSQL for the asyncpg-iam tests: install the server binaries "
    "(apt-get install -y postgresql), or set ASYNCPG_IAM_TEST_DSN=postgresql://user@host:port/db "
    "(trust or password auth over plain TCP), or start a Docker engine for testcontainers"
)


class BackendUnavailable(Exception):
    """A backend provider cannot give a server here; the message says why."""


BackendProvider = Callable[[contextlib.ExitStack], PostgresServer]


def dsn_backend(stack: contextlib.ExitStack) -> PostgresServer:
    """Use the server named by ``ASYNCPG_IAM_TEST_DSN``."""
    dsn = os.environ.get(DSN_VARIABLE)
    if not dsn:
        raise BackendUnavailable(f"{DSN_VARIABLE} is not set")
    parts = urlsplit(dsn)
    if parts.scheme not in ("postgres", "postgresql") or not parts.hostname:
        raise BackendUnavailable(
            f"{DSN_VARIABLE} must be postgresql://user[:password]@host:port/db"
        )
    user = unquote(parts.username or "postgres")
    return PostgresServer(
        host=parts.hostname,
        port=parts.port or 5432,
        user=user,
        database=unquote(parts.path.lstrip("/")) or user,
        kind="dsn",
        password=unquote(parts.password) if parts.password is not None else None,
    )


def local_backend(stack: contextlib.ExitStack) -> PostgresServer:
    """Start a throwaway cluster from the local PostgreSQL binaries."""
    try:
        find_postgres_bin()
    except PostgresNotFoundError as exc:
        raise BackendUnavailable(str(exc)) from exc
    cluster = stack.enter_context(PostgresCluster())
    return cluster.server


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


# The containers this session started, by the server they provide (see `backend_container`),
# and what the terminal summary says about each (kept after the container is gone).
_containers: dict[PostgresServer, Any] = {}
_container_notes: dict[PostgresServer, str] = {}


def container_backend(stack: contextlib.ExitStack) -> PostgresServer:
    """Start testcontainers' PostgreSQL when a Docker engine answers.

    The image is ``ASYNCPG_IAM_TEST_PG_IMAGE`` (default `DEFAULT_PG_IMAGE`); it needs no TLS
    (the emulator in front provides it) and logs in with a random password.
    """
    try:
        from testcontainers.community.postgres import PostgresContainer
    except ImportError:
        try:  # testcontainers < 4.14 has no `community` namespace
            from testcontainers.postgres import PostgresContainer
        except ImportError as exc:
            raise BackendUnavailable(
                "testcontainers is not installed (pip install testcontainers)"
            ) from exc
    image = os.environ.get(PG_IMAGE_VARIABLE) or DEFAULT_PG_IMAGE
    engine = os.environ.get("DOCKER_HOST") or "the default Docker socket"
    try:
        # testcontainers connects to the engine here: no engine raises DockerException.
        container = PostgresContainer(
            image,
            username="postgres",
            password=secrets.token_urlsafe(18),
            dbname="asyncpg_iam_test",
            driver=None,
        )
    except Exception as exc:  # docker.errors.DockerException and kin: no engine
        raise BackendUnavailable(
            f"no Docker engine answers at {engine} ({_first_line(exc)}); start one, or set "
            "DOCKER_HOST to one"
        ) from exc
    try:
        container.start()
    except Exception as exc:
        with contextlib.suppress(Exception):
            container.stop()
        raise BackendUnavailable(
            f"the PostgreSQL container ({image}) did not start on {engine}: {_first_line(exc)}"
        ) from exc
    stack.callback(container.stop)
    server = PostgresServer(
        host=container.get_container_host_ip(),
        port=int(container.get_exposed_port(5432)),
        user=container.username,
        database=container.dbname,
        kind="container",
        password=container.password,
    )
    _containers[server] = container
    stack.callback(_containers.pop, server, None)
    _container_notes[server] = (
        f" in container {container.get_wrapped_container().short_id} ({image}) on {engine}"
    )
    return server


def backend_container(server: PostgresServer) -> Any | None:
    """Return the testcontainers container behind `server`, or None when it is not one of ours.

    The object is testcontainers' ``PostgresContainer`` (``exec()``,
    ``get_wrapped_container()``...), for tests that look inside the container.
    """
    return _containers.get(server)


BACKEND_PROVIDERS: dict[str, BackendProvider] = {
    "dsn": dsn_backend,
    "local": local_backend,
    "container": container_backend,
}
"""Backend providers in the order they are tried; replace or extend to plug in another."""


def select_backend(stack: contextlib.ExitStack) -> PostgresServer:
    """Return the first backend that answers, honouring ``ASYNCPG_IAM_TEST_BACKEND``."""
    forced = os.environ.get(BACKEND_VARIABLE)
    if forced and forced not in BACKEND_PROVIDERS:
        raise BackendUnavailable(
            f"{BACKEND_VARIABLE}={forced!r}: choose one of {', '.join(BACKEND_PROVIDERS)}"
        )
    if forced:  # the caller chose: say why that one failed, not how to get any other
        return BACKEND_PROVIDERS[forced](stack)
    reasons: list[str] = []
    for name in BACKEND_PROVIDERS:
        try:
            return BACKEND_PROVIDERS[name](stack)
        except BackendUnavailable as exc:
            reasons.append(f"{name}: {exc}")
    raise BackendUnavailable(f"{_HOW_TO_GET_ONE} ({'; '.join(reasons)})")


def _container_plan() -> str:
    image = os.environ.get(PG_IMAGE_VARIABLE) or DEFAULT_PG_IMAGE
    engine = os.environ.get("DOCKER_HOST") or "the default Docker socket"
    return f"testcontainers PostgreSQL ({image}) on {engine}"


def _planned_backend() -> str:
    forced = os.environ.get(BACKEND_VARIABLE)
    if forced == "container":
        return f"container (forced by {BACKEND_VARIABLE}): {_container_plan()}"
    if forced:
        return f"{forced} (forced by {BACKEND_VARIABLE})"
    dsn = os.environ.get(DSN_VARIABLE)
    if dsn:
        parts = urlsplit(dsn)
        return f"dsn from {DSN_VARIABLE} ({parts.hostname}:{parts.port or 5432})"
    try:
        return f"local PostgreSQL binaries in {find_postgres_bin()}"
    except PostgresNotFoundError:
        return f"{_container_plan()} if an engine answers, else skipped"


_chosen: list[PostgresServer] = []
_unavailable: list[str] = []


def pytest_report_header(config: pytest.Config) -> str:
    """Name the PostgreSQL backend the asyncpg-iam fixtures will use."""
    return f"asyncpg-iam test backend: {_planned_backend()}"


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Name the PostgreSQL backend that was used, if any."""
    for server in _chosen:
        note = _container_notes.get(server, "")
        terminalreporter.write_line(f"asyncpg-iam test backend used: {server!r}{note}")
    for reason in _unavailable:
        terminalreporter.write_line(f"asyncpg-iam test backend: none ({reason})")


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """Provide a PostgreSQL server for the whole session.

    Skip when there is none; fail when the backend forced by ``ASYNCPG_IAM_TEST_BACKEND``
    cannot be had, so a lane meant for one backend never passes without it.
    """
    with contextlib.ExitStack() as stack:
        try:
            server = select_backend(stack)
        except BackendUnavailable as exc:
            _unavailable.append(str(exc))
            forced = os.environ.get(BACKEND_VARIABLE)
            if forced:
                pytest.fail(f"{BACKEND_VARIABLE}={forced} but it is unavailable: {exc}")
            pytest.skip(str(exc))
        _chosen.append(server)
        yield server


@pytest.fixture(scope="session")
def rds_access_key() -> AccessKey:
    """Provide the access key that ``rds_emulator`` trusts (a fresh secret per session)."""
    return AccessKey(access_key="AKIAEMULATORTESTKEY1", secret_key=secrets.token_urlsafe(30))


@pytest_asyncio.fixture
async def rds_emulator(
    postgres_server: PostgresServer, rds_access_key: AccessKey
) -> AsyncIterator[RDSIAMEmulator]:
    """Provide a started RDS IAM emulator in front of ``postgres_server``.

    The backend's user is enabled for IAM and ``rds_access_key`` is registered.
    """
    sandbox = Sandbox(
        server=postgres_server,
        access_key=rds_access_key,
        credential_server=False,
        isolate_environment=False,
    )
    async with sandbox:
        yield sandbox.emulator


@pytest_asyncio.fixture
async def rds_proxy_emulator(
    postgres_server: PostgresServer, rds_access_key: AccessKey
) -> AsyncIterator[RDSIAMEmulator]:
    """Provide a started emulator in RDS Proxy mode (endpoint `DEFAULT_PROXY_ENDPOINT`).

    As ``rds_emulator``; it also counts pinned sessions (``proxy_report()``) and refuses the
    ``options`` startup parameter as RDS Proxy does.
    """
    sandbox = Sandbox(
        server=postgres_server,
        access_key=rds_access_key,
        credential_server=False,
        isolate_environment=False,
        endpoint=DEFAULT_PROXY_ENDPOINT,
    )
    async with sandbox:
        yield sandbox.emulator


@pytest.fixture
def iam_emulator(
    rds_emulator: RDSIAMEmulator,
    credential_server: CredentialServer,  # noqa: F811 (the fixture imported above)
) -> RDSIAMEmulator:
    """Provide ``rds_emulator`` trusting every key that ``credential_server`` issues.

    The default AWS chain points at ``credential_server``, so a pool created with
    ``iam_emulator.pool_kwargs(user=...)`` signs with rotating keys the emulator accepts.
    """
    credential_server.add_emulator(rds_emulator)
    return rds_emulator


@pytest_asyncio.fixture
async def sandbox(postgres_server: PostgresServer) -> AsyncIterator[Sandbox]:
    """Provide a started `Sandbox` in front of ``postgres_server``, its environment applied.

    The default AWS chain finds the keys of ``sandbox.credential_server`` (which the emulator
    trusts) for the test; the environment is restored afterwards.
    """
    async with Sandbox(server=postgres_server) as started:
        yield started
