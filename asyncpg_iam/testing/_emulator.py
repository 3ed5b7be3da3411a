"""A local stand-in for Amazon RDS with IAM database authentication.

`RDSIAMEmulator` is an asyncio PostgreSQL-protocol front in front of a real PostgreSQL. It
behaves as RDS does for IAM users: TLS is required (a plaintext startup gets the `pg_hba.conf`
rejection), the password is asked for in cleartext and must be a valid IAM token for the
endpoint, port, region and user (verified independently of the library's signer, by its own
shiftable clock), and every failure gets RDS's opaque `PAM authentication failed` message while
the real reason is recorded for tests. Accepted logins are relayed byte for byte to the backend.

Fault switches (reject logins, drop connections, latency, pause, clock shift, throttle) let
tests reproduce what production does to a pool.

In DSQL mode (an endpoint ``<id>.dsql.<region>.on.aws``, or ``dsql=True``) it stands in for
Aurora DSQL instead: tokens are checked as DSQL tokens (service ``dsql``, no port,
``DbConnectAdmin`` for the role ``admin`` and ``DbConnect`` for the others), throttled logins
get SQLSTATE 53400, and the client's queries are read message by message so that faults can
fail a ``COMMIT`` with SQLSTATE 40001 (optimistic-concurrency conflict) or drop the connection
while a ``COMMIT`` is in flight.

In RDS Proxy mode (an endpoint ``<name>.proxy-<id>.<region>.rds.amazonaws.com``, or
``proxy=True`` or a `PinRules`) it applies RDS Proxy's pinning conditions for PostgreSQL to
the messages it relays and counts pinned sessions by reason and cause (`proxy_report()`), and
refuses a startup that carries ``options`` with the proxy's message (`_proxy.py`).

`RDSIAMEmulator` is the facade over pieces with one concern each: `StreamListener` (accepting
connections, `_streams.py`), `Frontend` (the protocol of one connection, `_emu_frontend.py`),
`LoginChecker` (keys, IAM users and verdicts, `_emu_login.py`, over the independent SigV4
verifier in `_emu_verify.py` and the backend's roles in `_emu_roles.py`), `FaultSwitches`
(`_emu_faults.py`) and `LoginLog` (records and counters, `_emu_records.py`).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import ssl
import tempfile
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from .._auth import IAMAuth
from .._clock import SYSTEM_CLOCK, Clock
from .._errors import ConfigurationError
from .._proxy import is_proxy_host
from ._emu_faults import FaultSwitches
from ._emu_frontend import Frontend, FrontendSettings
from ._emu_login import LoginChecker
from ._emu_records import LoginLog, LoginRecord, RelayedConnection
from ._emu_roles import RoleDirectory
from ._emu_verify import RegisteredKey
from ._proxy import PinEvent, PinRules, ProxyLog, ProxyReport
from ._service import AsyncService
from ._streams import StreamListener

__all__ = [
    "DEFAULT_DSQL_ENDPOINT",
    "DEFAULT_ENDPOINT",
    "DEFAULT_PROXY_ENDPOINT",
    "AccessKey",
    "LoginRecord",
    "RDSIAMEmulator",
    "RelayedConnection",
]

logger = logging.getLogger("asyncpg_iam.testing.emulator")

DEFAULT_ENDPOINT = "mydb.abcdefghijkl.us-east-1.rds.amazonaws.com"
DEFAULT_DSQL_ENDPOINT = "abcdefghijklmnopqrstuvwxyz.dsql.us-east-1.on.aws"
DEFAULT_PROXY_ENDPOINT = "myproxy.proxy-abcdefghijkl.us-east-1.rds.amazonaws.com"


@dataclass(frozen=True, slots=True)
class AccessKey:
    """An AWS access key for signing test tokens (the secret parts stay out of its repr)."""

    access_key: str
    secret_key: str = field(repr=False)
    session_token: str | None = field(default=None, repr=False)


def _is_dsql_endpoint(labels: list[str]) -> bool:
    # <id>.dsql[-suffix].<region>.on.aws
    dsql_label = labels[1] == "dsql" or labels[1].startswith("dsql-") if len(labels) > 1 else False
    return len(labels) == 5 and dsql_label and labels[3:] == ["on", "aws"]


def region_from_endpoint(endpoint: str) -> str | None:
    """Return the region named in an RDS or DSQL endpoint.

    RDS: ``*.<region>.rds.amazonaws.com[.cn]``; DSQL: ``<id>.dsql.<region>.on.aws``.
    """
    labels = endpoint.lower().rstrip(".").split(".")
    if _is_dsql_endpoint(labels):
        return labels[2]
    for index in range(1, len(labels) - 2):
        if labels[index + 1 : index + 4] in (["rds", "amazonaws", "com"],) and labels[
            index + 4 :
        ] in ([], ["cn"]):
            return labels[index]
    return None


class RDSIAMEmulator(AsyncService):
    """An RDS endpoint with IAM authentication, in front of a real PostgreSQL.

    Tokens must be signed for `endpoint`:`endpoint_port` (the listening port by default) in
    `region` (parsed from the endpoint by default) with a key given to `register_key()`, for a
    user given to `enable_iam_user()` or `iam_users`, or granted ``rds_iam`` in the backend
    (``CREATE USER x; GRANT rds_iam TO x;``, as on RDS: the emulator creates the NOLOGIN role
    ``rds_iam`` at start). Any other user logs in with its ordinary password, checked against
    the backend, and is refused a token login. Clients connect to `host`:`port` with TLS,
    trusting `ca_path`. The backend is reached over plain TCP as the client's own user; with
    `backend_password` it answers password, MD5 and SCRAM requests of the backend.
    `backend_user` names the administrative role used by `ensure_role()`.

    With `accept_any_password`, tokens are not checked (static-password mode for benchmarks)
    but TLS is still required. `dsql` stands in for Aurora DSQL instead of RDS (None: when
    `endpoint` is a DSQL name); the role ``admin`` is then enabled for IAM without being named.
    `aliases` are further host names whose tokens it accepts (an Aurora instance is also
    reached through the cluster and reader endpoints); its certificate names them too.
    `proxy` stands in for an RDS Proxy endpoint (None: when `endpoint` is a proxy name; a
    `PinRules` chooses the rules where AWS's documentation is silent).
    Start it with `await start()` or `async with`.
    """

    def __init__(
        self,
        *,
        backend_host: str,
        backend_port: int,
        backend_user: str = "postgres",
        backend_password: str | None = None,
        endpoint: str = DEFAULT_ENDPOINT,
        region: str | None = None,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
        endpoint_port: int | None = None,
        server_ssl_context: ssl.SSLContext | None = None,
        ca: Any = None,
        clock: Clock | None = None,
        accept_any_password: bool = False,
        iam_users: Iterable[str] = (),
        max_clock_skew: float = 300.0,
        max_password_length: int = 8192,
        login_timeout: float = 60.0,
        dsql: bool | None = None,
        aliases: Iterable[str] = (),
        proxy: bool | PinRules | None = None,
    ) -> None:
        region = _check_settings(
            endpoint, region, max_password_length, login_timeout, max_clock_skew
        )
        if dsql is None:
            dsql = _is_dsql_endpoint(endpoint.lower().rstrip(".").split("."))
        if proxy is None:
            proxy = is_proxy_host(endpoint)
        rules = proxy if isinstance(proxy, PinRules) else PinRules() if proxy else None
        self._proxy = ProxyLog(rules) if rules is not None else None
        self._endpoint = endpoint
        self._aliases = tuple(aliases)
        self._region = region
        self._endpoint_port = endpoint_port
        self._dsql = dsql
        self._accept_any_password = accept_any_password
        self._backend_user = backend_user
        self._clock: Clock = clock or SYSTEM_CLOCK
        self._ca_pem, server_ssl_context = _tls_setup(
            (endpoint, *self._aliases), server_ssl_context, ca
        )
        self._ca_path: str | None = None
        self._backend = FrontendSettings(
            backend_host=backend_host,
            backend_port=backend_port,
            backend_password=backend_password,
            ssl_context=server_ssl_context,
            login_timeout=login_timeout,
            max_password_length=max_password_length,
            dsql=dsql,
        )
        self._assemble(listen_host, listen_port, iam_users, max_clock_skew)

    def _assemble(
        self, listen_host: str, listen_port: int, iam_users: Iterable[str], max_clock_skew: float
    ) -> None:
        """Build the collaborators: role directory, checker, faults, log, front, listener."""
        backend = self._backend
        self._roles = RoleDirectory(
            host=backend.backend_host,
            port=backend.backend_port,
            user=self._backend_user,
            password=backend.backend_password,
        )
        self._checker = LoginChecker(
            endpoint=self._endpoint,
            aliases=self._aliases,
            region=self._region,
            endpoint_port=lambda: self.endpoint_port,
            dsql=self._dsql,
            accept_any_password=self._accept_any_password,
            max_clock_skew=max_clock_skew,
            iam_users=iam_users,
            roles=self._roles,
        )
        self._faults = FaultSwitches(dsql=self._dsql)
        self._log = LoginLog(self._clock)
        self._frontend = Frontend(
            backend,
            checker=self._checker,
            faults=self._faults,
            log=self._log,
            clock=self._clock,
            proxy=self._proxy,
        )
        self._listener = StreamListener(
            self._frontend.handle, host=listen_host, port=listen_port, name="emulator"
        )

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Start listening."""
        await self._listener.start()
        if not self._accept_any_password and not self._dsql:
            await self._roles.setup()
        if self._dsql and not self._accept_any_password:
            # A DSQL cluster comes with the role admin, which may create tables.
            await self._roles.ensure_dsql_admin(password=self._backend.backend_password)
        logger.info(
            "RDS IAM emulator for %s listening on %s:%s, backend %s:%s",
            self._endpoint,
            self._listener.host,
            self._listener.port,
            self.backend_host,
            self.backend_port,
        )

    async def stop(self) -> None:
        """Stop listening, drop every connection and wait for the handlers to finish."""
        if not await self._listener.stop(cut=self._cut):
            return
        await self._roles.aclose()
        if self._ca_path is not None:
            _unlink_quietly(self._ca_path)
            self._ca_path = None
        logger.info("RDS IAM emulator for %s stopped", self._endpoint)

    def _cut(self) -> None:
        self._faults.accepting.set()
        self.drop_all_connections()

    def __repr__(self) -> str:
        port = self._listener.bound_port
        listening = f"{self._listener.host}:{port}" if port else "not started"
        return (
            f"RDSIAMEmulator(endpoint={self._endpoint!r}, region={self._region!r}, "
            f"listening={listening}, backend={self.backend_host}:{self.backend_port})"
        )

    # -- where it is and how to trust it ------------------------------------------------------

    @property
    def host(self) -> str:
        """The address it listens on."""
        return self._listener.host

    @property
    def port(self) -> int:
        """The port it listens on (known once started)."""
        return self._listener.port

    @property
    def endpoint(self) -> str:
        """The RDS (or DSQL) host name tokens must be signed for."""
        return self._endpoint

    def rename(self, endpoint: str) -> None:
        """Answer to `endpoint` from now on: only tokens signed for it are accepted (as RDS
        renames endpoints at a blue/green switchover). The certificate is not changed."""
        _check_settings(endpoint, self._region, 1, 1.0, 0.0)
        self._endpoint = endpoint
        self._checker.rename(endpoint)
        logger.info("RDS IAM emulator now answers to %s", endpoint)

    @property
    def dsql(self) -> bool:
        """Whether it stands in for Aurora DSQL rather than RDS."""
        return self._dsql

    @property
    def proxy(self) -> bool:
        """Whether it stands in for an RDS Proxy endpoint (see `proxy_report`)."""
        return self._proxy is not None

    def proxy_report(self) -> ProxyReport:
        """Return the sessions, pinned sessions (by cause and rule) and refused startups."""
        if self._proxy is None:
            raise RuntimeError("the emulator is not in RDS Proxy mode: pass proxy=True")
        return self._proxy.report()

    @property
    def on_pin(self) -> Callable[[PinEvent], None] | None:
        """Called with each pinned session's `PinEvent` (`emulate --proxy` prints them)."""
        return self._proxy.on_pin if self._proxy is not None else None

    @on_pin.setter
    def on_pin(self, callback: Callable[[PinEvent], None] | None) -> None:
        if self._proxy is None:
            raise RuntimeError("the emulator is not in RDS Proxy mode: pass proxy=True")
        self._proxy.on_pin = callback

    def reset_proxy_counts(self) -> None:
        """Forget the RDS Proxy mode's counts (between the runs of a benchmark)."""
        if self._proxy is not None:
            self._proxy.reset()

    @property
    def endpoint_port(self) -> int:
        """The port tokens must be signed for."""
        return self._endpoint_port if self._endpoint_port is not None else self.port

    @property
    def region(self) -> str:
        """The region tokens must be signed for."""
        return self._region

    @property
    def backend_host(self) -> str:
        """The backend PostgreSQL's host."""
        return self._backend.backend_host

    @property
    def backend_port(self) -> int:
        """The backend PostgreSQL's port."""
        return self._backend.backend_port

    @property
    def ca_pem(self) -> str:
        """The PEM of the CA that signed the emulator's certificate."""
        if self._ca_pem is None:
            raise RuntimeError(
                "the emulator was given server_ssl_context without ca: its CA is unknown"
            )
        return self._ca_pem

    @property
    def ca_path(self) -> str:
        """A PEM file of the CA that signed the emulator's certificate (removed on stop)."""
        if self._ca_path is None:
            pem = self.ca_pem
            fd, path = tempfile.mkstemp(prefix="asyncpg-iam-emulator-ca-", suffix=".pem")
            with os.fdopen(fd, "w") as file:
                file.write(pem)
            self._ca_path = path
            weakref.finalize(self, _unlink_quietly, path)
        return self._ca_path

    def client_ssl_context(self) -> ssl.SSLContext:
        """Return a client context that trusts the emulator's CA and checks its host name."""
        return ssl.create_default_context(cadata=self.ca_pem)

    def connect_kwargs(self, *, user: str, database: str | None = None) -> dict[str, Any]:
        """Return `asyncpg.connect()` arguments (host, port, user, database, ssl) for it."""
        return {
            "host": self.host,
            "port": self.port,
            "user": user,
            "database": database or ("postgres" if self._dsql else user),
            "ssl": self.client_ssl_context(),
        }

    def pool_kwargs(
        self, *, user: str, database: str | None = None, **overrides: Any
    ) -> dict[str, Any]:
        """Return `asyncpg_iam.create_pool()` arguments that dial it and sign for its endpoint.

        These are `connect_kwargs()` plus an `IAMAuth` that signs for `endpoint` (and for
        `endpoint_port` and `region` when they differ from what the client would infer);
        `overrides` (any create_pool argument, e.g. ``min_size`` or your own ``iam``) replace
        or extend them.
        """
        kwargs = self.connect_kwargs(user=user, database=database)
        if "iam" not in overrides:
            signing: dict[str, Any] = {"signing_host": self._endpoint}
            if self._endpoint_port is not None:
                signing["signing_port"] = self._endpoint_port
            if region_from_endpoint(self._endpoint) != self._region:
                signing["region"] = self._region
            kwargs["iam"] = IAMAuth(**signing)
        kwargs.update(overrides)
        return kwargs

    # -- what it accepts ----------------------------------------------------------------------

    def register_key(
        self,
        access_key: str,
        secret_key: str,
        session_token: str | None = None,
        *,
        expiration: dt.datetime | None = None,
    ) -> None:
        """Accept tokens signed with this key; with `expiration`, only until then."""
        self._checker.register_key(RegisteredKey(access_key, secret_key, session_token, expiration))
        logger.debug("registered access key %s", access_key)

    def add_key_source(self, lookup: Callable[[str], AccessKey | None]) -> None:
        """Also accept tokens signed with keys `lookup` knows (it returns None for others).

        For keys issued elsewhere while the emulator runs, such as assumed-role keys from
        moto's STS (`MotoSTS.issued_key`).
        """
        self._checker.add_key_source(lookup)

    def unregister_key(self, access_key: str) -> None:
        """Stop accepting tokens signed with this key."""
        self._checker.unregister_key(access_key)

    def enable_iam_user(self, user: str) -> None:
        """Let `user` log in with IAM tokens, and `GRANT rds_iam` to its backend role.

        The grant is made before the next login that asks the backend (or by `ensure_role()`
        if the role does not exist yet), and revoked when the emulator stops.
        """
        self._checker.enable_iam_user(user)

    def disable_iam_user(self, user: str) -> None:
        """Stop `user` from logging in with IAM tokens (`REVOKE rds_iam` from it too)."""
        self._checker.disable_iam_user(user)

    @property
    def iam_users(self) -> frozenset[str]:
        """The users enabled for IAM from Python (members of ``rds_iam`` count as well)."""
        return frozenset(self._checker.iam_users)

    async def ensure_role(self, user: str) -> None:
        """Create a LOGIN role `user` on the backend unless it exists (as `backend_user`).

        With `backend_password` the role gets that password too, since the relay answers the
        backend's password requests with it for every user.
        """
        await self._roles.create_login_role(user, password=self._backend.backend_password)
        if user in self._checker.iam_users and not self._dsql:
            self._roles.queue_grant(user)
            await self._roles.apply()

    # -- counters -----------------------------------------------------------------------------

    @property
    def logins_accepted(self) -> int:
        """Logins that passed verification and reached the backend."""
        return self._log.logins_accepted

    @property
    def logins_rejected(self) -> int:
        """Logins refused for any reason (each has a record)."""
        return self._log.logins_rejected

    @property
    def password_messages(self) -> int:
        """Password messages received at all: 0 proves no token left a client."""
        return self._log.password_messages

    @property
    def open_connections(self) -> int:
        """Client connections open now, at any stage."""
        return self._frontend.open_connections

    @property
    def connections_total(self) -> int:
        """Client connections accepted since start."""
        return self._log.connections_total

    @property
    def backend_connections_total(self) -> int:
        """Connections opened to the backend (logins and cancel requests)."""
        return self._log.backend_connections_total

    def relayed_connections(self) -> list[RelayedConnection]:
        """The connections being relayed now, oldest first."""
        return self._frontend.relayed_connections()

    @property
    def login_attempts_per_second(self) -> dict[int, int]:
        """Login attempts (password messages) by clock second (Unix time)."""
        return dict(sorted(self._log.attempts.items()))

    @property
    def max_login_attempts_in_one_second(self) -> int:
        """The most login attempts seen in any one clock second."""
        return max(self._log.attempts.values(), default=0)

    # -- faults -------------------------------------------------------------------------------

    def reject_next(self, n: int = 1) -> None:
        """Reject the next `n` logins whatever their token (reason ``"fault_reject"``)."""
        self._faults.reject_next(n)

    def throttle_next(self, n: int = 1) -> None:
        """Refuse the next `n` logins as over the connection rate (reason ``"throttled"``).

        In DSQL mode the refusal is SQLSTATE 53400; for RDS it is the PAM failure.
        """
        self._faults.throttle_next(n)

    def fail_next_commits(self, n: int = 1) -> None:
        """Fail the next `n` COMMITs with SQLSTATE 40001, rolling them back (DSQL mode only).

        This is what DSQL answers when a transaction conflicts with another one.
        """
        self._faults.fail_next_commits(n)

    def drop_next_commits(self, n: int = 1) -> None:
        """Pass the next `n` COMMITs to the backend, then drop the client (DSQL mode only).

        The transaction commits but the client never hears so: its outcome is unknown to it.
        """
        self._faults.drop_next_commits(n)

    @property
    def commits_failed(self) -> int:
        """COMMITs failed with 40001 by `fail_next_commits`."""
        return self._faults.commits_failed

    @property
    def commits_dropped(self) -> int:
        """COMMITs during which `drop_next_commits` dropped the client."""
        return self._faults.commits_dropped

    def drop_all_connections(self) -> int:
        """Abort every open client connection (and its backend); return how many."""
        return self._frontend.drop_all_connections()

    def silence_all_connections(self) -> int:
        """Stop relaying on every open connection without closing it (no FIN, no RST), as
        after a NAT's idle drop; return how many. They close when the emulator stops."""
        return self._frontend.silence_all_connections()

    def pause_accepting(self) -> None:
        """Hold new connections unanswered (as a saturated server does) until resumed."""
        self._faults.accepting.clear()

    def resume_accepting(self) -> None:
        """Serve held and new connections again."""
        self._faults.accepting.set()

    @property
    def accepting(self) -> bool:
        """Whether new connections are served."""
        return self._faults.accepting.is_set()

    # -- records and the tunable faults -------------------------------------------------------

    @property
    def records(self) -> list[LoginRecord]:
        """Every login attempt, oldest first."""
        return self._log.records

    @property
    def on_login(self) -> Callable[[LoginRecord], None] | None:
        """Called with each login record as it is made (`emulate` prints rejections with it)."""
        return self._log.on_login

    @on_login.setter
    def on_login(self, callback: Callable[[LoginRecord], None] | None) -> None:
        self._log.on_login = callback

    @property
    def latency(self) -> float:
        """Seconds (by the emulator's clock) added before a login is answered."""
        return self._faults.latency

    @latency.setter
    def latency(self, seconds: float) -> None:
        self._faults.latency = seconds

    @property
    def clock_offset(self) -> float:
        """Seconds added to the clock when checking token dates (simulates skew)."""
        return self._faults.clock_offset

    @clock_offset.setter
    def clock_offset(self, seconds: float) -> None:
        self._faults.clock_offset = seconds

    @property
    def max_logins_per_second(self) -> int | None:
        """Cap on login attempts in one clock second; excess logins are rejected as throttled."""
        return self._faults.max_logins_per_second

    @max_logins_per_second.setter
    def max_logins_per_second(self, limit: int | None) -> None:
        self._faults.max_logins_per_second = limit


def _check_settings(
    endpoint: str,
    region: str | None,
    max_password_length: int,
    login_timeout: float,
    max_clock_skew: float,
) -> str:
    """Validate the emulator's settings; return the region tokens must be signed for."""
    if ":" in endpoint or "/" in endpoint or not endpoint:
        raise ConfigurationError(
            f"endpoint must be a bare host name without port or path, got {endpoint!r}"
        )
    resolved_region = region or region_from_endpoint(endpoint)
    if resolved_region is None:
        raise ConfigurationError(
            f"cannot tell the region from endpoint {endpoint!r}: pass region='us-east-1' "
            "(or whichever region the tokens are signed for)"
        )
    if max_password_length < 1 or login_timeout <= 0 or max_clock_skew < 0:
        raise ConfigurationError(
            "max_password_length and login_timeout must be positive, max_clock_skew >= 0"
        )
    return resolved_region


def _tls_setup(
    names: tuple[str, ...], server_ssl_context: ssl.SSLContext | None, ca: Any
) -> tuple[str | None, ssl.SSLContext]:
    """Return the CA's PEM (when known) and the server context (a trustme one by default)."""
    if server_ssl_context is None:
        import trustme

        ca = ca if ca is not None else trustme.CA()
        cert = ca.issue_cert("127.0.0.1", "localhost", "::1", *names)
        server_ssl_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        cert.configure_cert(server_ssl_context)
    ca_pem = ca.cert_pem.bytes().decode("ascii") if ca is not None else None
    return ca_pem, server_ssl_context


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)
