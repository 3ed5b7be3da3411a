"""The hooks a pool calls when something watches it (metrics); none are called otherwise.

A `Pool` holds an optional observer (None by default). When it is None the acquire path
pays one attribute check, and nothing else runs; `asyncpg_iam.otel` installs one.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from ._errors import IAMAuthenticationError

__all__ = ["PoolObserver"]


class PoolObserver(Protocol):
    """What a pool reports to whoever watches it."""

    def acquire(
        self, acquire: Callable[[float | None], Awaitable[Any]], timeout: float | None
    ) -> Awaitable[Any]:
        """Run ``acquire(timeout)`` (the pool's own acquire), timing it and counting waiters."""
        ...

    def released(self, connection: Any) -> None:
        """Note that `connection` (a pool proxy) is being handed back."""
        ...

    def connection_created(self, seconds: float) -> None:
        """Note a new connection that took `seconds` from the login's start to joining."""
        ...

    def auth_failed(self, error: IAMAuthenticationError) -> None:
        """Note a refused IAM login (already diagnosed)."""
        ...
