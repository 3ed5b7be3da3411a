"""A pytest plugin that fails any test in which a token, secret key or session token leaks.

Enable it next to the fixtures plugin::

    pytest_plugins = ["asyncpg_iam.testing.pytest_plugin", "asyncpg_iam.testing._leak_guard"]

For the whole session it hooks every place that issues or receives a secret, and remembers it:
`Credentials` (secret key and session token), the token signer (``build_auth_token`` in
``_signing`` and the reference ``_auth`` holds), the emulator (registered keys and every token
it verifies), `CredentialServer` issues and `AccessKey`. For every test it records all log
records at DEBUG on the root logger and the library objects created during the test (pools,
credential caches, IAM settings, emulators and their login records, and every `IAMError`), and
at teardown fails the test if a known secret appears in a log message or its traceback, in a
repr, or in an exception's text (with its chained causes). Captured stdout/stderr and the
failure report of each phase are scanned too: a leak there turns the report into a failure.

Secrets shorter than `MIN_SECRET_LENGTH` characters are not tracked (unit tests use short
placeholder keys such as ``"secret"`` that occur in ordinary text). Tokens are recognised by
their signature, so a truncated token still counts as a leak.

botocore's and aiobotocore's own DEBUG output prints raw request headers and response bodies
(so the session token it signs STS requests with, and AssumeRole's answer) by design; those
loggers are scanned but their hits are only counted (`LeakGuard.upstream_hits`), not failed:
the library does not control them, and they are silent unless an application turns botocore
DEBUG logging on.
"""

from __future__ import annotations

import functools
import logging
import re
import traceback
import urllib.parse
from collections.abc import Callable, Iterator
from typing import Any

import pytest

__all__ = ["MIN_SECRET_LENGTH", "LeakGuard", "SecretRegistry", "secret_leak_guard"]

#: Secrets shorter than this are not tracked (placeholders like "secret" in unit tests).
MIN_SECRET_LENGTH = 16
#: Loggers whose DEBUG output prints signed requests by upstream design: counted, not failed.
UPSTREAM_LOGGERS = ("botocore", "aiobotocore")

_SIGNATURE = re.compile(r"(?<![0-9a-f])[0-9a-f]{64}(?![0-9a-f])")
_TOKEN_SIGNATURE = re.compile(r"X-Amz-Signature=([0-9a-f]{64})")
_TOKEN_SESSION = re.compile(r"X-Amz-Security-Token=([^&\s]+)")


class SecretRegistry:
    """Every secret seen this session: secret keys, session tokens and token signatures."""

    def __init__(self) -> None:
        self._secrets: dict[str, str] = {}
        self._signatures: set[str] = set()

    def __len__(self) -> int:
        return len(self._secrets) + len(self._signatures)

    def add(self, value: object, kind: str) -> None:
        """Remember `value` (a secret key or session token) if it is long enough to matter."""
        if not isinstance(value, str) or len(value) < MIN_SECRET_LENGTH:
            return
        self._secrets.setdefault(value, kind)
        quoted = urllib.parse.quote(value, safe="")
        if quoted != value:
            self._secrets.setdefault(quoted, f"{kind} (URL-encoded)")

    def add_token(self, token: object) -> None:
        """Remember an IAM token by its signature (and its session token, if it carries one)."""
        if not isinstance(token, str):
            return
        match = _TOKEN_SIGNATURE.search(token)
        if match is not None:
            self._signatures.add(match.group(1))
        session = _TOKEN_SESSION.search(token)
        if session is not None:
            self.add(urllib.parse.unquote(session.group(1)), "session token")

    def add_credentials(self, credentials: Any) -> None:
        """Remember the secret parts of a `Credentials` or `AccessKey`-like object."""
        self.add(getattr(credentials, "secret_key", None), "secret key")
        self.add(getattr(credentials, "token", None), "session token")
        self.add(getattr(credentials, "session_token", None), "session token")

    def redact(self, text: str) -> str:
        """Return `text` with every known secret replaced by a marker naming its kind."""
        text = _SIGNATURE.sub(
            lambda m: "[token signature]" if m.group(0) in self._signatures else m.group(0), text
        )
        for secret, kind in sorted(self._secrets.items(), key=lambda item: -len(item[0])):
            text = text.replace(secret, f"[{kind}]")
        return text

    def find(self, text: str) -> list[str]:
        """Return what kinds of secret occur in `text` (never the secrets themselves)."""
        if not text:
            return []
        found = ["token signature" for sig in _SIGNATURE.findall(text) if sig in self._signatures][
            :1
        ]
        found += [kind for secret, kind in self._secrets.items() if secret in text]
        return sorted(set(found))


REGISTRY = SecretRegistry()
"""The session's secrets; the hooks feed it from the moment the plugin is configured."""


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _exception_text(exc: BaseException) -> str:
    try:
        return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    except Exception as error:  # a broken __str__ must not hide the rest of the scan
        return f"<unformattable {type(exc).__name__}: {type(error).__name__}>"


def _safe_repr(obj: object) -> str:
    try:
        return repr(obj)
    except Exception as error:
        return f"<unrepresentable {type(obj).__name__}: {type(error).__name__}>"


class LeakGuard:
    """What one test logged and created, checked for secrets at its teardown."""

    def __init__(self, registry: SecretRegistry) -> None:
        self.registry = registry
        self.handler = _Records()
        self.objects: list[object] = []
        self.exceptions: list[BaseException] = []
        self.texts: list[tuple[str, str]] = []
        self.upstream_hits = 0

    def watch(self, obj: object, where: str | None = None) -> None:
        """Scan `obj` at teardown: text as is, exceptions with their chain, anything by repr."""
        if isinstance(obj, str):
            self.texts.append((where or "text", obj))
        elif isinstance(obj, BaseException):
            self.exceptions.append(obj)
        else:
            self.objects.append(obj)

    def forget(self, obj: object) -> None:
        """Stop watching `obj` (scanning its repr now), so a test can check it is collected."""
        self.texts.append((f"repr of {type(obj).__name__}", _safe_repr(obj)))
        self.objects = [watched for watched in self.objects if watched is not obj]

    def forget_logs(self) -> None:
        """Drop the log records so far (for tests that leak on purpose to test the guard)."""
        self.handler.records.clear()

    def _scan_logs(self) -> Iterator[tuple[str, list[str]]]:
        formatter = logging.Formatter()
        for record in self.handler.records:
            try:
                text = record.getMessage()
            except Exception:
                text = f"{record.msg!r} {record.args!r}"
            if record.exc_info and record.exc_info[1] is not None:
                text += "\n" + formatter.formatException(record.exc_info)
            text += "\n" + (record.exc_text or "") + (record.stack_info or "")
            kinds = self.registry.find(text)
            if not kinds:
                continue
            if record.name.split(".")[0] in UPSTREAM_LOGGERS:
                self.upstream_hits += 1
                continue
            yield f"log record of {record.name!r} at {record.levelname}", kinds

    def find_leaks(self) -> list[str]:
        """Return one line per leak: where, and what kind of secret (never the secret)."""
        found: list[tuple[str, list[str]]] = list(self._scan_logs())
        for exc in self.exceptions:
            found.append(
                (f"exception {type(exc).__name__}", self.registry.find(_exception_text(exc)))
            )
        for obj in self.objects:
            texts = [_safe_repr(obj)]
            texts += [_safe_repr(record) for record in getattr(obj, "records", ()) or ()]
            found.append((f"repr of {type(obj).__name__}", self.registry.find("\n".join(texts))))
        for where, text in self.texts:
            found.append((where, self.registry.find(text)))
        return [f"{where}: {', '.join(kinds)}" for where, kinds in found if kinds]


_current: LeakGuard | None = None
_patches = pytest.MonkeyPatch()


def _track(obj: object) -> None:
    if _current is not None:
        _current.watch(obj)


def _wrap_init(cls: type, after: Callable[[Any], None], name: str = "__init__") -> None:
    original = cls.__dict__.get(name) or getattr(cls, name)

    @functools.wraps(original)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        after(self)

    _patches.setattr(cls, name, wrapper)


def _install() -> None:
    """Hook every place that issues or receives a secret (once per session)."""
    _hook_constructors()
    _hook_signer()
    _hook_emulator()
    _hook_credential_server()


def _hook_constructors() -> None:
    """Watch the objects that hold secrets, and learn the credentials they are made with."""
    from .. import _auth, _credentials, _errors, _pool, _signing
    from . import _aws, _emulator

    def on_credentials(credentials: Any) -> None:
        REGISTRY.add_credentials(credentials)
        _track(credentials)

    _wrap_init(_signing.Credentials, on_credentials)
    _wrap_init(_auth.IAMAuth, _track)
    _wrap_init(_emulator.AccessKey, REGISTRY.add_credentials)
    _wrap_init(_pool.Pool, _track)
    _wrap_init(_credentials.CredentialCache, _track)
    _wrap_init(_emulator.RDSIAMEmulator, _track)
    _wrap_init(_aws.CredentialServer, _track)

    def on_error(self: Any, *args: Any, **kwargs: Any) -> None:
        super(_errors.IAMError, self).__init__(*args, **kwargs)
        _track(self)

    _patches.setattr(_errors.IAMError, "__init__", on_error)


def _hook_signer() -> None:
    """Learn every token the library signs, and the credentials it signs with."""
    import asyncpg_iam

    from .. import _auth, _signing

    signer = _signing.build_auth_token

    @functools.wraps(signer)
    def build_auth_token(**kwargs: Any) -> str:
        token = signer(**kwargs)
        REGISTRY.add_token(token)
        REGISTRY.add_credentials(kwargs.get("credentials"))
        return token

    _patches.setattr(asyncpg_iam, "build_auth_token", build_auth_token)
    _patches.setattr(_signing, "build_auth_token", build_auth_token)
    _patches.setattr(_auth, "build_auth_token", build_auth_token)


def _hook_emulator() -> None:
    """Learn every token the emulator verifies and every key registered with it."""
    from . import _emu_login, _emu_verify, _emulator

    verify = _emu_verify.verify_token

    @functools.wraps(verify)
    def verify_token(token: str, **kwargs: Any) -> Any:
        REGISTRY.add_token(token)
        return verify(token, **kwargs)

    _patches.setattr(_emu_login, "verify_token", verify_token)

    original_register = _emulator.RDSIAMEmulator.register_key

    @functools.wraps(original_register)
    def register_key(
        self: Any, access_key: str, secret_key: str, session_token: str | None = None, **kw: Any
    ) -> None:
        REGISTRY.add(secret_key, "secret key")
        REGISTRY.add(session_token, "session token")
        original_register(self, access_key, secret_key, session_token, **kw)

    _patches.setattr(_emulator.RDSIAMEmulator, "register_key", register_key)


def _hook_credential_server() -> None:
    """Learn every secret the local credential endpoint issues."""
    from . import _aws

    issue = _aws.CredentialServer.current_credentials

    @functools.wraps(issue)
    def current_credentials(self: Any) -> dict[str, str]:
        issued = issue(self)
        REGISTRY.add(issued.get("SecretAccessKey"), "secret key")
        REGISTRY.add(issued.get("Token"), "session token")
        return issued

    _patches.setattr(_aws.CredentialServer, "current_credentials", current_credentials)


def pytest_configure(config: pytest.Config) -> None:
    """Install the hooks before any fixture or test module can issue a secret."""
    _install()


def pytest_unconfigure(config: pytest.Config) -> None:
    """Remove the hooks."""
    _patches.undo()


@pytest.fixture(autouse=True)
def secret_leak_guard() -> Iterator[LeakGuard]:
    """Record everything a test logs at DEBUG and creates; fail it if a secret shows up."""
    global _current
    guard = LeakGuard(REGISTRY)
    root = logging.getLogger()
    level = root.level
    root.addHandler(guard.handler)
    root.setLevel(logging.DEBUG)
    _current = guard
    try:
        yield guard
    finally:
        _current = None
        root.removeHandler(guard.handler)
        root.setLevel(level)
    leaks = guard.find_leaks()
    guard.handler.records.clear()
    guard.objects.clear()
    guard.exceptions.clear()
    if leaks:
        pytest.fail("secrets leaked:\n  " + "\n  ".join(leaks), pytrace=False)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[Any]:
    """Fail a phase whose captured output or failure report shows a secret.

    The captured-log section is not scanned here: it holds the same records the fixture scans,
    where upstream loggers can be told apart.
    """
    outcome: Any = yield
    report: pytest.TestReport = outcome.get_result()
    places = {
        "captured stdout": report.capstdout,
        "captured stderr": report.capstderr,
        "failure report": report.longreprtext,
    }
    leaks = [
        f"{where}: {', '.join(kinds)}"
        for where, text in places.items()
        if (kinds := REGISTRY.find(text))
    ]
    if leaks:
        original = REGISTRY.redact(report.longreprtext)
        report.outcome = "failed"
        # The original report holds the secret: show it redacted, and drop the captured output.
        report.longrepr = "secrets leaked in test output:\n  " + "\n  ".join(leaks)
        if original:
            report.longrepr += "\n\nthe report, with the secrets redacted:\n" + original
        report.sections = []
