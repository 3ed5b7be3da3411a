"""`AsyncService`: ``async with`` for the test servers that have ``start()`` and ``stop()``."""

from __future__ import annotations

from types import TracebackType
from typing import TypeVar

__all__ = ["AsyncService"]

_S = TypeVar("_S", bound="AsyncService")


class AsyncService:
    """Start on entering an ``async with`` block, stop on leaving it."""

    async def start(self) -> None:
        """Start serving."""
        raise NotImplementedError

    async def stop(self) -> None:
        """Stop serving and release everything."""
        raise NotImplementedError

    async def __aenter__(self: _S) -> _S:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
