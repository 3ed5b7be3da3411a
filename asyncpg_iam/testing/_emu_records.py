"""What the emulator remembers: a record of every login attempt, and the counters tests read.

The records and counters never hold a secret: a record's detail is the verifier's human text,
which names reasons, never the token or a key's secret.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from .._clock import Clock
from ._emu_verify import Verdict

__all__ = ["LoginLog", "LoginRecord", "RelayedConnection"]

logger = logging.getLogger("asyncpg_iam.testing.emulator")


@dataclass(frozen=True, slots=True)
class LoginRecord:
    """One login attempt and why it was accepted or rejected.

    `reason` is ``"ok"`` or a stable code (``"signature_mismatch"``, ``"expired"``,
    ``"plaintext"``, ``"throttled"``...); `detail` is human text and never holds a secret.
    `token_age` is the token's age in seconds by the emulator's (shifted) clock.
    """

    at: dt.datetime
    user: str | None
    database: str | None
    accepted: bool
    reason: str
    detail: str
    token_age: float | None = None
    access_key: str | None = None
    backend_pid: int | None = None
    peer_port: int | None = None


@dataclass(frozen=True, slots=True)
class RelayedConnection:
    """An open client connection that is relayed to a backend process."""

    user: str
    database: str
    backend_pid: int | None
    opened_at: dt.datetime
    peer_port: int | None


def refusal(verdict: Verdict, reason: str, detail: str) -> Verdict:
    """Return `verdict` turned into a refusal for `reason` (keeping its key and token age)."""
    return dataclasses.replace(verdict, accepted=False, reason=reason, detail=detail)


class LoginLog:
    """The login records, the `on_login` hook, and the emulator's counters."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self.records: list[LoginRecord] = []
        self.on_login: Callable[[LoginRecord], None] | None = None
        self.logins_accepted = 0
        self.logins_rejected = 0
        self.password_messages = 0
        self.connections_total = 0
        self.backend_connections_total = 0
        self.attempts: Counter[int] = Counter()

    def count_attempt(self) -> int:
        """Count a login attempt in this clock second; return the second's count so far."""
        second = int(self._clock.now().timestamp())
        self.attempts[second] += 1
        return self.attempts[second]

    def record(
        self,
        user: str | None,
        database: str | None,
        verdict: Verdict,
        *,
        peer_port: int | None,
        backend_pid: int | None = None,
    ) -> None:
        """Record the outcome of a login, tell `on_login`, and count it."""
        record = LoginRecord(
            at=self._clock.now(),
            user=user,
            database=database,
            accepted=verdict.accepted,
            reason=verdict.reason,
            detail=verdict.detail,
            token_age=verdict.token_age,
            access_key=verdict.access_key,
            backend_pid=backend_pid,
            peer_port=peer_port,
        )
        self.records.append(record)
        if self.on_login is not None:
            try:
                self.on_login(record)
            except Exception:
                logger.warning("the emulator's on_login callback failed", exc_info=True)
        if verdict.accepted:
            self.logins_accepted += 1
        else:
            self.logins_rejected += 1
        logger.debug(
            "login user=%s database=%s accepted=%s reason=%s detail=%s",
            user,
            database,
            verdict.accepted,
            verdict.reason,
            verdict.detail,
        )
