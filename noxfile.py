"""Development sessions: tests, lint, typecheck, bench, and the asyncpg version matrix."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess

import nox

nox.options.sessions = ["tests", "lint", "typecheck"]
nox.options.reuse_existing_virtualenvs = True

PYTHON = "3.11"
PYENV_310 = os.path.expanduser("~/.pyenv/versions/3.10*/bin/python3.10")


def _oldest_python() -> str:
    """Return Python 3.10 (the oldest supported) if this machine has one, else PYTHON."""
    for candidate in [shutil.which("python3.10"), *sorted(glob.glob(PYENV_310))]:
        if candidate and subprocess.run([candidate, "-V"], capture_output=True).returncode == 0:
            return candidate
    return PYTHON


# Every asyncpg minor version the pool supports (asyncpg_iam/_asyncpg_pool.py SUPPORTED_ASYNCPG).
ASYNCPG_VERSIONS = ["0.30", "0.31", "0.32"]
# The tests that exercise the pool's use of asyncpg internals.
POOL_TESTS = [
    "tests/test_pool.py",
    "tests/test_pool_lifecycle.py",
    "tests/test_lifetime.py",
    "tests/test_asyncpg_internals.py",
    "tests/test_config.py",
]


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """Run the whole test suite (local PostgreSQL binaries, the emulator, moto)."""
    session.install("-e", ".[test]")
    session.run("pytest", *session.posargs)


@nox.session
@nox.parametrize(
    ("python", "asyncpg"),
    # The oldest asyncpg runs on the oldest Python the package supports.
    [(_oldest_python(), "0.30"), (PYTHON, "0.31"), (PYTHON, "0.32")],
    ids=ASYNCPG_VERSIONS,
)
def pool(session: nox.Session, asyncpg: str) -> None:
    """Run the pool's tests against one asyncpg minor version (0.30 on the oldest Python)."""
    session.install("-e", ".[test]", f"asyncpg=={asyncpg}.*")
    session.run("pytest", *POOL_TESTS, *session.posargs)


@nox.session(python=PYTHON)
def uvloop(session: nox.Session) -> None:
    """Run the pool's tests with every test on a uvloop event loop (asyncpg recommends it)."""
    session.install("-e", ".[test]")
    session.run("pytest", "-p", "tests._uvloop", *POOL_TESTS, *session.posargs)


@nox.session(name="asyncpg_suite", python=PYTHON)
def asyncpg_suite(session: nox.Session) -> None:
    """Run asyncpg's own tests/test_pool.py on asyncpg_iam.Pool(iam=False) (.ci/asyncpg-suite).

    Both variants (the default max_lifetime and None); ASYNCPG_SUITE_POOLS chooses others.
    """
    session.install("-e", ".[test]")
    python = os.path.join(session.bin, "python")
    session.run(
        "bash", ".ci/asyncpg-suite", *session.posargs, env={"PYTHON": python}, external=True
    )


# The integration tests the container lane runs (those present), and its own proof test.
CONTAINER_TESTS = [
    "tests/test_container_backend.py",
    "tests/test_emulator*.py",
    "tests/test_pool.py",
    "tests/test_starlette.py",
    "tests/test_sqlalchemy.py",
]


@nox.session(python=PYTHON)
def containers(session: nox.Session) -> None:
    """Run the integration tests against testcontainers' PostgreSQL.

    The engine comes from the environment (DOCKER_HOST and TESTCONTAINERS_* as testcontainers
    reads them; ASYNCPG_IAM_TEST_PG_IMAGE picks the image). Without an engine the tests fail.
    """
    session.install("-e", ".[test]")
    paths = sorted({path for pattern in CONTAINER_TESTS for path in glob.glob(pattern)})
    session.run("pytest", *paths, *session.posargs, env={"ASYNCPG_IAM_TEST_BACKEND": "container"})


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """Check style with ruff."""
    session.install("ruff>=0.6")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session(python=PYTHON)
def typecheck(session: nox.Session) -> None:
    """Type-check the package with mypy --strict."""
    session.install("-e", ".[test]", "mypy>=1.11")
    session.run("mypy")


@nox.session(python=PYTHON)
def docs(session: nox.Session) -> None:
    """Build the documentation site with --strict: a broken link or reference fails."""
    session.install("-e", ".[docs]")
    session.run("mkdocs", "build", "--strict", env={"NO_MKDOCS_2_WARNING": "1"})


@nox.session(python=PYTHON)
def bench(session: nox.Session) -> None:
    """Run the benchmarks; figures go to benchmarks/results/."""
    session.install("-e", ".[bench]")
    session.run("python", "-m", "benchmarks", *session.posargs)
