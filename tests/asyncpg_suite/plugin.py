"""pytest plugin: run asyncpg's own ``tests/test_pool.py`` with every pool an asyncpg_iam.Pool.

``.ci/asyncpg-suite`` (and ``nox -s asyncpg_suite``) fetch that file from the sdist of the
installed asyncpg and load this plugin with ``-p tests.asyncpg_suite.plugin``. It is not a
conftest, so the normal test run never loads it. Within the run it

- replaces ``asyncpg.pool.Pool`` (what ``asyncpg.create_pool`` builds and the tests subclass)
  and the pool class of asyncpg's test base with `SuitePool`, an ``asyncpg_iam.Pool(iam=False)``
  whose ``max_lifetime`` ``--suite-pool`` chooses (``lifetime``: the default, ``no-lifetime``:
  None; ``asyncpg``: no replacement, the baseline), and fails any pool created around it;
- points asyncpg's test clusters (``asyncpg.cluster``) at the local PostgreSQL binaries and,
  when the run is root, runs their commands and servers as the ``postgres`` user (PostgreSQL
  refuses to run as root), with their data directories owned by it.
"""

from __future__ import annotations

import functools
import os
import pwd
import subprocess
import types
from typing import Any

import asyncpg
import asyncpg._testbase
import asyncpg.cluster
import asyncpg.pool
import pytest

import asyncpg_iam
from asyncpg_iam.testing import find_postgres_bin

POOL_CHOICES = ("lifetime", "no-lifetime", "asyncpg")
_ASYNCPG_POOL = asyncpg.pool.Pool
_SERVER_USER = "postgres"


class SuitePool(asyncpg_iam.Pool):
    """An ``asyncpg_iam.Pool(iam=False)`` built where asyncpg's tests build an asyncpg pool."""

    #: The ``max_lifetime`` every pool gets (None: no keyword, the pool's default).
    lifetime_kwargs: dict[str, Any] = {}  # noqa: RUF012 (set once per run, in pytest_configure)
    created = 0

    def __init__(self, dsn: str | None = None, **kwargs: Any) -> None:
        SuitePool.created += 1
        super().__init__(dsn, iam=False, **self.lifetime_kwargs, **kwargs)


def _guarded_init(init: Any) -> Any:
    """Return asyncpg's ``Pool.__init__``, refusing pools that are not an asyncpg_iam.Pool."""

    @functools.wraps(init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        if not isinstance(self, asyncpg_iam.Pool):
            raise AssertionError(
                f"asyncpg suite: a plain {type(self).__qualname__} was created; the plugin "
                "missed a way asyncpg's tests build pools"
            )
        init(self, *args, **kwargs)

    return __init__


def _suite_create_pool(create_pool: Any) -> Any:
    """Return asyncpg's test-base ``create_pool`` building `SuitePool` for asyncpg's Pool."""

    @functools.wraps(create_pool)
    def suite_create_pool(*args: Any, pool_class: type = _ASYNCPG_POOL, **kwargs: Any) -> Any:
        # The test base's default is asyncpg's class itself, bound when it was imported.
        if pool_class is _ASYNCPG_POOL:
            pool_class = SuitePool
        return create_pool(*args, pool_class=pool_class, **kwargs)

    return suite_create_pool


def _replace_pools(patch: pytest.MonkeyPatch, pool: str) -> None:
    SuitePool.lifetime_kwargs = {"max_lifetime": None} if pool == "no-lifetime" else {}
    patch.setattr(asyncpg.pool, "Pool", SuitePool)
    patch.setattr(asyncpg, "Pool", SuitePool)
    patch.setattr(
        asyncpg._testbase, "create_pool", _suite_create_pool(asyncpg._testbase.create_pool)
    )
    patch.setattr(_ASYNCPG_POOL, "__init__", _guarded_init(_ASYNCPG_POOL.__init__))


def _run_clusters_as(patch: pytest.MonkeyPatch, user: str) -> None:
    """Run asyncpg.cluster's commands (pg_ctl, initdb, postgres, ...) as `user`."""
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise pytest.UsageError(
            f"asyncpg suite: running as root needs a {user!r} user to run PostgreSQL "
            "(it refuses to run as root)"
        ) from None
    uid, gid = entry.pw_uid, entry.pw_gid

    def as_user(call: Any) -> Any:
        def run(*args: Any, **kwargs: Any) -> Any:
            kwargs.setdefault("cwd", "/")  # the caller's directory may be closed to `user`
            return call(*args, user=uid, group=gid, extra_groups=[], **kwargs)

        return run

    commands = types.SimpleNamespace(**vars(subprocess))
    commands.run = as_user(subprocess.run)
    commands.Popen = as_user(subprocess.Popen)
    patch.setattr(asyncpg.cluster, "subprocess", commands)

    make_data_dir = asyncpg.cluster._mkdtemp

    def mkdtemp(*args: Any, **kwargs: Any) -> str:
        path: str = make_data_dir(*args, **kwargs)
        os.chown(path, uid, gid)
        return path

    patch.setattr(asyncpg.cluster, "_mkdtemp", mkdtemp)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--suite-pool",
        choices=POOL_CHOICES,
        default="lifetime",
        help="the pool asyncpg's tests get: asyncpg_iam.Pool(iam=False) with the default "
        "max_lifetime (lifetime) or max_lifetime=None (no-lifetime), or asyncpg's own (asyncpg)",
    )


def pytest_configure(config: pytest.Config) -> None:
    if os.environ.get("PGHOST"):
        raise pytest.UsageError(
            "asyncpg suite: unset PGHOST (asyncpg's tests would use that server and skip the "
            "ones that manage their own clusters)"
        )
    # Never undone: asyncpg stops and removes its default cluster in an atexit hook, after
    # pytest has finished.
    clusters = pytest.MonkeyPatch()
    if not (os.environ.get("PGINSTALLATION") or os.environ.get("PGBIN")):
        clusters.setenv("PGINSTALLATION", str(find_postgres_bin()))
    if os.geteuid() == 0:
        _run_clusters_as(clusters, _SERVER_USER)
    patch = pytest.MonkeyPatch()
    config.add_cleanup(patch.undo)
    pool = config.getoption("suite_pool")
    if pool != "asyncpg":
        _replace_pools(patch, pool)


def pytest_report_header(config: pytest.Config) -> str:
    return f"asyncpg suite: asyncpg {asyncpg.__version__}, {_describe(config)}"


def pytest_sessionfinish(session: pytest.Session) -> None:
    pool = session.config.getoption("suite_pool")
    if pool != "asyncpg" and session.testscollected and SuitePool.created == 0:
        # The replacement did not take: the run proved nothing about our pool.
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    config = terminalreporter.config
    created = "" if config.getoption("suite_pool") == "asyncpg" else f": {SuitePool.created} pools"
    terminalreporter.write_line(f"asyncpg suite: {_describe(config)}{created}")


def _describe(config: pytest.Config) -> str:
    pool = config.getoption("suite_pool")
    if pool == "asyncpg":
        return "asyncpg's own Pool (baseline)"
    lifetime = "max_lifetime=None" if pool == "no-lifetime" else "the default max_lifetime"
    return f"asyncpg_iam.Pool(iam=False) with {lifetime}"
