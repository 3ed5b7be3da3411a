"""Measuring helpers several cases use: timed connects, timed batches, latency CDF plots,
fresh AWS keys and "ours vs plain" figures."""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import asyncpg

from asyncpg_iam import Credentials, build_auth_token
from asyncpg_iam.testing._isolation import patched_environ

from ._harness import isolated_aws, new_figure, now, save_figure

__all__ = [
    "aws_keys",
    "per_await",
    "per_call",
    "plot_cdfs",
    "signer",
    "timed_connect",
    "timed_pool_connect",
    "versus",
]


@contextlib.contextmanager
def aws_keys(access_key: str) -> Iterator[Credentials]:
    """Hide the host's AWS configuration and put fresh keys for `access_key` in the environment."""
    credentials = Credentials(access_key, secrets.token_urlsafe(30))
    with (
        isolated_aws(),
        patched_environ(
            {
                "AWS_ACCESS_KEY_ID": credentials.access_key,
                "AWS_SECRET_ACCESS_KEY": credentials.secret_key,
            }
        ),
    ):
        yield credentials


def signer(host: str, port: int, user: str, credentials: Credentials) -> Callable[[], str]:
    """Return a password callable for plain asyncpg: a new token for `host` (us-east-1) a call."""

    def password() -> str:
        return build_auth_token(
            host=host, port=port, user=user, region="us-east-1", credentials=credentials
        )

    return password


def versus(ours: Mapping[str, Any], plain: Mapping[str, Any], key: str, fmt: str = "{}") -> str:
    """Format ``ours[key] vs plain[key]`` (``none`` for a missing value)."""

    def one(value: Any) -> str:
        return "none" if value is None else fmt.format(value)

    return f"{one(ours[key])} vs {one(plain[key])}"


async def timed_connect(kwargs: Mapping[str, Any]) -> float:
    """Open one connection with ``asyncpg.connect(**kwargs)``; return the seconds it took."""
    start = now()
    con = await asyncpg.connect(**kwargs)
    elapsed = now() - start
    await con.close()
    return elapsed


async def timed_pool_connect(pool: Any) -> float:
    """Acquire a new connection from `pool` (max_size 1, min_size 0); return the seconds.

    Expiring the connection before release makes asyncpg close it, so the next acquire opens
    a new one; the close is not timed.
    """
    start = now()
    proxy = await pool.acquire()
    elapsed = now() - start
    await pool.expire_connections()
    await pool.release(proxy)
    return elapsed


def per_call(fn: Callable[[], object], batch: int) -> Callable[[], Awaitable[float]]:
    """Return a sample function: seconds per call of `fn`, over a batch of `batch` calls."""

    async def measure() -> float:
        start = now()
        for _ in range(batch):
            fn()
        return (now() - start) / batch

    return measure


def per_await(fn: Callable[[], Awaitable[object]], batch: int) -> Callable[[], Awaitable[float]]:
    """Return a sample function: seconds per ``await fn()``, over a batch of `batch`."""

    async def measure() -> float:
        start = now()
        for _ in range(batch):
            await fn()
        return (now() - start) / batch

    return measure


def plot_cdfs(
    samples: Mapping[str, Sequence[float]], labels: Mapping[str, str], *, title: str, path: Path
) -> str:
    """Plot the empirical CDF of each variant's connect latencies (ms); return the file name."""
    figure, axes = new_figure(9, 5)
    for name, values in samples.items():
        ordered = sorted(values)
        count = len(ordered)
        axes.plot(ordered, [(i + 1) / count for i in range(count)], label=labels[name])
    axes.set_xscale("log")
    axes.set_xlabel("connect latency (ms, log scale)")
    axes.set_ylabel("fraction of connects")
    axes.set_title(title)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=7, loc="lower right")
    return save_figure(figure, path)
