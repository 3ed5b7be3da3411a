"""What a pool reports about itself: `PoolStats` (its counters) and `PoolSettings` (what it
decided at creation).

Apart from `_pool` so that creating a pool does not build these classes (a frozen dataclass
costs about half a millisecond at import, `PoolStats` several): `Pool.stats()` and
`Pool.settings` import this module on their first call.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._auth import SigningTarget

__all__ = ["PoolSettings", "PoolStats"]


@dataclasses.dataclass(frozen=True, slots=True)
class PoolStats:
    """A snapshot of what a pool has done since it was created.

    `connections_closed` counts closes by reason: ``"max_lifetime"`` (retired by the
    recycler, idle or on release), ``"discarded_on_acquire"`` (due when it was about to be
    handed out), ``"failover"`` (retired when the pool detected a failover or restart),
    ``"silent_host"`` (on a host that stopped answering, not the writer) and ``"other"``
    (errors, asyncpg's idle timeout, ``max_queries``, pool close).
    """

    connections_opened: int
    """Connections opened and added to the pool."""
    connections_closed: Mapping[str, int]
    """Connections closed, by reason."""
    connect_attempts: int
    """Calls to open a connection (each may try several hosts)."""
    connect_failures: int
    """Connection attempts that raised, authentication failures included."""
    auth_failures: int
    """Logins the server refused (each raised as `IAMAuthenticationError`)."""
    tokens_signed: int
    """Tokens signed."""
    token_reuses: int
    """Connects that presented a recently signed token again (``token_reuse``)."""
    credential_fetches: int
    """Fetches from the AWS credential source (successful or not)."""
    connects_rate_limited: int
    """Login attempts that waited for ``max_connect_rate``."""
    handed_out_due: int
    """Connections that came due during their own acquire (connect, init and setup took longer
    than their lifetime): handed out once and closed on release."""
    open_connections: int
    """Connections open when the snapshot was taken."""
    failover_events: int = 0
    """Failovers or server restarts the pool detected (see README, "Failover")."""
    failover_retired: int = 0
    """Connections retired because of them (idle ones at once, in-use ones on release)."""
    read_only_retries: int = 0
    """New connections that landed on a read-only server and were retried."""
    connect_retries: int = 0
    """Connect attempts retried while recovering from a failover (read-only ones included)."""
    auth_failures_by_cause: Mapping[str, int] = dataclasses.field(default_factory=dict)
    """Refused logins by their most likely cause (``IAMAuthenticationError.cause``)."""
    credential_fetch_failures: int = 0
    """Fetches from the AWS credential source that failed."""
    credentials_expiry: datetime.datetime | None = None
    """When the cached AWS credentials expire (None: none cached, or they never expire)."""
    acquire_timeouts: int = 0
    """Acquires that timed out (their ``timeout`` ran out)."""
    waiting_acquires: int = 0
    """Acquires waiting for a free connection when the snapshot was taken."""
    silent_hosts: int = 0
    """Hosts declared silent (no answer to the health check's probes), see `HealthCheck`."""
    health_probes: int = 0
    """Health-check probes sent (a TCP connection each; no login, no token)."""
    topology_refreshes: int = 0
    """Aurora topology queries answered (0 when the pool connects through DNS only)."""
    connections_by_instance: Mapping[str, int] = dataclasses.field(default_factory=dict)
    """Open connections per cluster instance the topology routed them to (by identifier)."""
    blue_green_phase: str | None = None
    """The blue/green phase the pool saw last (``"not_created"``, ``"created"``,
    ``"preparation"``, ``"in_progress"``, ``"post"``, ``"completed"``); None when the pool does
    not follow switchovers or the database has no blue/green metadata."""
    blue_green_holds: int = 0
    """Switchovers that held new connects and acquires (holds begun)."""
    blue_green_hold_timeouts: int = 0
    """Holds ended by their bound (``BlueGreenSettings.hold``) before the switch ended."""
    blue_green_reroutes: int = 0
    """New connections sent to green's address after a switchover."""
    blue_green_fallback_refusals: int = 0
    """Logins green refused while the pool found the name it accepts (at most one a
    switchover)."""


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class PoolSettings:
    """What a pool decided when it was created (or at its last `set_connect_args`).

    Where it connects, how the login is protected, what each token is signed for and the
    pool's limits, as the pool uses them: log it at start-up to see the effective
    configuration. Holds no secret.
    """

    endpoints: tuple[tuple[str, int], ...]
    """The (host, port) pairs dialled, in order (port 0: a Unix socket path)."""
    user: str
    database: str
    tls_mode: str
    """The libpq sslmode every login uses (``"verify-full"`` by default)."""
    tls_mode_source: str
    """Where `tls_mode` came from (``"the default"``, ``"PGSSLMODE=... in the environment"``)."""
    ca_source: str
    """Which certificates verify the server."""
    target_session_attrs: str
    signing_targets: tuple[SigningTarget, ...]
    """Per endpoint, what its tokens are signed for (name, port, region and its source);
    empty without IAM."""
    max_lifetime: float | None
    """Seconds a connection lives at most (None: unlimited)."""
    max_connect_rate: float | None
    """New logins a second at most (None: unlimited)."""


# A pool returns these before anyone may have read them from the package root (whose lazy
# `__getattr__` sets the same): they report the public path from the start.
PoolStats.__module__ = PoolSettings.__module__ = "asyncpg_iam"
