"""An AWS environment isolated from the host's: no credentials, profiles, proxies or metadata.

`isolated_aws_environment` hides every variable through which the default credential chain
could find the host's credentials (`AWS_CREDENTIAL_VARIABLES`), points the config and shared
credentials files at an empty directory, turns the instance metadata service off and sets a
region, for the duration of a block. The pytest fixtures do the same through ``monkeypatch``
(`aws_isolation_variables` is what both set).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

from ._aws import AWS_CREDENTIAL_VARIABLES
from ._keys import AccessKeyLike

__all__ = [
    "aws_isolation_variables",
    "isolated_aws_environment",
    "lambda_environment",
    "patched_environ",
]


def aws_isolation_variables(directory: Path, *, region: str) -> dict[str, str | None]:
    """Return the variables that isolate the AWS chain (None: remove one); files in `directory`."""
    variables: dict[str, str | None] = dict.fromkeys(AWS_CREDENTIAL_VARIABLES)
    variables.update(
        AWS_CONFIG_FILE=str(directory / "config"),
        AWS_SHARED_CREDENTIALS_FILE=str(directory / "credentials"),
        AWS_EC2_METADATA_DISABLED="true",
        AWS_REGION=region,
    )
    return variables


def lambda_environment(key: AccessKeyLike, *, region: str, home: Path) -> dict[str, str]:
    """Return a whole process environment as AWS Lambda sets it: `key` (with its session
    token), the region, a function name, ``PATH``; no config files, no metadata service."""
    return {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(home),
        "AWS_ACCESS_KEY_ID": key.access_key,
        "AWS_SECRET_ACCESS_KEY": key.secret_key,
        "AWS_SESSION_TOKEN": key.session_token or "",
        "AWS_REGION": region,
        "AWS_DEFAULT_REGION": region,
        "AWS_LAMBDA_FUNCTION_NAME": "app",
        "AWS_CONFIG_FILE": str(home / "missing-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(home / "missing-credentials"),
        "AWS_EC2_METADATA_DISABLED": "true",
    }


@contextlib.contextmanager
def patched_environ(values: Mapping[str, str | None]) -> Iterator[None]:
    """Set (or with None, remove) environment variables for the block, then restore them."""
    saved = {name: os.environ.get(name) for name in values}
    try:
        for name, value in values.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def isolated_aws_environment(
    *, region: str = "us-east-1", variables: Mapping[str, str | None] | None = None
) -> Iterator[Path]:
    """Hide the host's AWS credentials, config files, proxies and instance metadata in the block.

    Yields the empty directory the config (``config``) and shared credentials
    (``credentials``) files point into, for a test to write profiles there. `variables` are
    set on top (None removes one). Everything is restored on exit.
    """
    with tempfile.TemporaryDirectory(prefix="asyncpg-iam-aws-") as tmp:
        directory = Path(tmp)
        values = aws_isolation_variables(directory, region=region)
        values.update(variables or {})
        with patched_environ(values):
            yield directory
