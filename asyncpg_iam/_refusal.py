"""`AuthFailureContext`: what the library knew about a refused login, for its diagnosis.

Apart from `_errors` (which ranks the causes and raises `IAMAuthenticationError` with it) so
that only a refused login builds this class: `_auth.failure_context` imports it then.
"""

from __future__ import annotations

import dataclasses
import datetime as dt

__all__ = ["AuthFailureContext"]


@dataclasses.dataclass(frozen=True, slots=True)
class AuthFailureContext:
    """What the library knew about a refused login; no secrets."""

    host: str
    port: int
    user: str
    database: str | None
    signing_host: str
    signing_port: int
    region: str
    region_source: str
    endpoint_region: str | None
    credential_source: str
    credentials_expiry: dt.datetime | None
    signed_at: dt.datetime | None
    token_reused: bool
    now: dt.datetime
    server_message: str
    clock_skew: float | None = None
    """Seconds this host's clock is ahead of AWS's (negative: behind), when it was measured."""
    service: str = "rds"
    """``"rds"`` (RDS, Aurora, RDS Proxy) or ``"dsql"`` (Aurora DSQL)."""

    @property
    def token_age(self) -> float | None:
        """Seconds between signing the token and the refusal, if a token was signed."""
        if self.signed_at is None:
            return None
        return (self.now - self.signed_at).total_seconds()
