"""What the test beds take as an AWS access key: a leaf module, imported by the emulator's login
checks and by the environment isolation alike (neither imports the other)."""

from __future__ import annotations

from typing import Protocol

__all__ = ["AccessKeyLike"]


class AccessKeyLike(Protocol):
    """An access key with its secret and session token (`AccessKey`)."""

    @property
    def access_key(self) -> str: ...
    @property
    def secret_key(self) -> str: ...
    @property
    def session_token(self) -> str | None: ...
