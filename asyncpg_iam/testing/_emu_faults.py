"""The emulator's fault switches: what production does to a pool, on demand.

Login faults (reject, throttle, a per-second cap, latency, a shifted clock), a pause of new
connections, and the DSQL commit faults (fail a COMMIT with 40001, or drop the client while it
is in flight).
"""

from __future__ import annotations

import asyncio
from typing import Literal

from .._errors import ConfigurationError
from ._emu_verify import Verdict

__all__ = ["FaultSwitches"]


def _count(what: str, n: int) -> int:
    if n < 0:
        raise ConfigurationError(f"{what}() takes n >= 0")
    return n


class FaultSwitches:
    """The switches, settable at any time; the commit faults need DSQL mode."""

    def __init__(self, *, dsql: bool) -> None:
        self._dsql = dsql
        self.latency = 0.0
        self.clock_offset = 0.0
        self.max_logins_per_second: int | None = None
        self.accepting = asyncio.Event()
        self.accepting.set()
        self._reject_next = 0
        self._throttle_next = 0
        self._fail_commits = 0
        self._drop_commits = 0
        self.commits_failed = 0
        self.commits_dropped = 0

    def reject_next(self, n: int) -> None:
        """Reject the next `n` logins whatever their token."""
        self._reject_next += _count("reject_next", n)

    def throttle_next(self, n: int) -> None:
        """Refuse the next `n` logins as over the connection rate."""
        self._throttle_next += _count("throttle_next", n)

    def fail_next_commits(self, n: int) -> None:
        """Fail the next `n` COMMITs with 40001."""
        self._require_dsql("fail_next_commits")
        self._fail_commits += _count("fail_next_commits", n)

    def drop_next_commits(self, n: int) -> None:
        """Drop the client during the next `n` COMMITs."""
        self._require_dsql("drop_next_commits")
        self._drop_commits += _count("drop_next_commits", n)

    def _require_dsql(self, what: str) -> None:
        if not self._dsql:
            raise ConfigurationError(
                f"{what}() needs the emulator in DSQL mode: pass dsql=True or a DSQL endpoint"
            )

    def login_fault(self, attempts_this_second: int) -> Verdict | None:
        """Return the refusal a switch imposes on this login, or None to check the token."""
        if self._reject_next > 0:
            self._reject_next -= 1
            return Verdict(False, "fault_reject", "rejected by reject_next()")
        if self._throttle_next > 0:
            self._throttle_next -= 1
            return Verdict(False, "throttled", "throttled by throttle_next()")
        limit = self.max_logins_per_second
        if limit is not None and attempts_this_second > limit:
            return Verdict(False, "throttled", f"more than {limit} login attempts in one second")
        return None

    @property
    def commit_faults_armed(self) -> bool:
        """Whether a COMMIT fault is waiting for the next COMMIT."""
        return bool(self._fail_commits or self._drop_commits)

    def take_commit_fault(self) -> Literal["drop", "fail"]:
        """Use up one armed COMMIT fault (drops first) and say which."""
        if self._drop_commits:
            self._drop_commits -= 1
            self.commits_dropped += 1
            return "drop"
        self._fail_commits -= 1
        self.commits_failed += 1
        return "fail"
