"""The exceptions of asyncpg-iam.

    IAMError                                  base: catch this for anything the library raises
    ├── ConfigurationError (also ValueError)  bad arguments; raised at creation, before any I/O
    ├── CredentialsError                      no valid AWS credentials could be obtained
    └── IAMAuthenticationError                the database refused an IAM login; also an
                                              asyncpg InvalidAuthorizationSpecificationError

Messages say what went wrong and what to do, and never carry a token, a secret key or a
session token.
"""

from __future__ import annotations

from asyncpg.exceptions import InvalidAuthorizationSpecificationError

__all__ = [
    "ConfigurationError",
    "CredentialsError",
    "IAMAuthenticationError",
    "IAMError",
]


class IAMError(Exception):
    """Base class of every error asyncpg-iam raises."""


class ConfigurationError(IAMError, ValueError):
    """An argument is invalid; the message names it and says what is allowed."""


class CredentialsError(IAMError):
    """AWS credentials could not be obtained or have expired.

    `source` names the credential source that failed (for example ``"default chain"`` or
    ``"assume-role arn:aws:iam::123456789012:role/app"``).
    """

    def __init__(self, message: str, *, source: str | None = None) -> None:
        super().__init__(message)
        self.source = source


class IAMAuthenticationError(IAMError, InvalidAuthorizationSpecificationError):  # type: ignore[misc]
    """The database refused an IAM login ("PAM authentication failed").

    Chained to asyncpg's error. Carries what the library could see about the attempt and
    `hints`, the likely causes ranked most likely first, each with its fix.
    """
