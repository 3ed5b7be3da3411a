"""The one connect path: a plan made once, one TLS decision, a token per host, one rate limit.

Every route that logs in goes through a `Connector`: the pool (creation, refill, ``min_size``,
`Pool.set_connect_args`), the SQLAlchemy engine, the Starlette lifespan (through the pool) and
the command line's ``psql``, ``token`` and ``doctor``. `plan_connect`, the one plan assembly
(every default applied there: Aurora DSQL's, TLS, the writer default), reads the arguments and
the environment once (DSN, host, port, user, database, ``PGSSLMODE``, ``PGSSLROOTCERT``, a
service file, ...) into a frozen `ConnectPlan`; every connect then passes asyncpg explicit
arguments, an `ssl.SSLContext` among them, and no DSN, so nothing read later (the environment,
a service file) can change where a token goes or how it is protected.

asyncpg calls a password callable without saying which host it dials, so with IAM each host
gets its own connect call with a token signed for it, at most one login per host per attempt.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import socket
import ssl
import urllib.parse
from collections import Counter
from collections.abc import Awaitable, Callable, Collection, Coroutine, Mapping
from typing import TYPE_CHECKING, Any, overload

import asyncpg
import asyncpg.connect_utils
from asyncpg.exceptions import (
    CannotConnectNowError,
    ClientConfigurationError,
    InvalidAuthorizationSpecificationError,
    TargetServerAttributeNotMatched,
)

from . import _options, _proxy
from ._asyncpg_pool import (
    PARSE_PARAMETERS,
    ParsedConnect,
    connect_parsed,
    parse_connect,
    parse_connect_arguments,
)
from ._auth import IAMAuth, SigningTarget, TokenProvider, TokenRecord, failure_context
from ._clock import SYSTEM_CLOCK, Clock
from ._dsn import DSN, parse_dsn
from ._dsql import connect_defaults
from ._errors import (
    ConfigurationError,
    ConnectError,
    ConnectTimeoutError,
    IAMAuthenticationError,
    IAMError,
    TLSVerificationError,
    is_iam_refusal,
    rank_auth_failure,
    without_traceback,
)
from ._lifetime import TokenBucket
from ._signing import is_writer_endpoint
from ._tls import SSL_REQUEST, TLS_KEYWORDS, TLS_PARAMETERS, TLSPolicy, decide_tls

if TYPE_CHECKING:
    from ._failover import FailoverGuard
    from ._topology import Router

__all__ = ["ConnectCounters", "ConnectPlan", "Connector", "plan_connect"]

logger = logging.getLogger("asyncpg_iam.connect")

# asyncpg.connect(dsn=None, *, ...)'s defaults, read without `inspect.signature` (a third of a
# millisecond of every cold start); tests/test_asyncpg_internals.py checks they agree.
_CONNECT_DEFAULTS = {"dsn": None, **(asyncpg.connect.__kwdefaults__ or {})}
# Settings the plan resolves itself; each connect passes the resolved values explicitly.
_RESOLVED = frozenset(
    {
        "dsn",
        "host",
        "port",
        "user",
        "password",
        "passfile",
        "database",
        "ssl",
        "direct_tls",
        "server_settings",
        "target_session_attrs",
        "krbsrvname",
        "gsslib",
        "service",
        "servicefile",
    }
)
_SESSION_ATTRS = tuple(a.value for a in asyncpg.connect_utils.SessionAttribute)
# asyncpg.connect's keywords that its argument parser does not take: read on each connect.
_PER_CONNECT = frozenset({"loop", "timeout", "connection_class", "record_class"})
_CONNECT_KEYWORDS = frozenset(PARSE_PARAMETERS) | _PER_CONNECT
# Endpoints (host, port, target_session_attrs) whose parsed arguments a connector keeps.
_MAX_PARSED = 64
# Keywords a plan takes besides asyncpg.connect's: libpq's TLS parameters (sslrootcert, ...)
# and RDS Proxy's.
_PLAN_KEYWORDS = TLS_KEYWORDS | {_proxy.KEYWORD}
# How long a failed connect's follow-up probe (which phase was reached) may take at most.
_PROBE_TIMEOUT = 3.0
# The part of a connect's timeout kept for that probe: a tenth, at most a second. A probe
# with less than _MIN_PROBE left is skipped.
_DIAGNOSIS_SHARE = 0.1
_DIAGNOSIS_RESERVE = 1.0
_MIN_PROBE = 0.02
# OpenSSL's X509_V_ERR_HOSTNAME_MISMATCH and X509_V_ERR_IP_ADDRESS_MISMATCH.
_NAME_MISMATCH = frozenset({62, 64})
# Errors after which the next host is tried (asyncpg's own rule for multi-host DSNs).
_NEXT_HOST_ERRORS = (OSError, asyncio.TimeoutError, CannotConnectNowError)


class ConnectPlan:
    """Where and how to connect, decided once from the arguments and the environment.

    `endpoints` are TCP (host, port) pairs, or a Unix socket path with port 0 (only without
    IAM). `connect_kwargs` are the remaining `asyncpg.connect` arguments, passed unchanged.
    `dsql` says whether the plan is for Aurora DSQL (its tokens, defaults and limits);
    `rds_proxy` that the endpoint is an RDS Proxy (connections are adopted so they never pin,
    `_proxy`); `password` is the static password of a plan without IAM (a string or a
    callable), never printed. A plain slotted class (as `_tls.TLSSetting` says why), never
    changed once made: `replace` makes a changed copy.
    """

    __slots__ = (
        "auth",
        "connect_kwargs",
        "database",
        "direct_tls",
        "dsql",
        "endpoints",
        "password",
        "rds_proxy",
        "server_settings",
        "target_session_attrs",
        "tls",
        "user",
    )

    def __init__(
        self,
        *,
        endpoints: tuple[tuple[str, int], ...],
        user: str,
        database: str,
        tls: TLSPolicy,
        target_session_attrs: str,
        server_settings: Mapping[str, str] | None,
        connect_kwargs: Mapping[str, Any],
        auth: IAMAuth | None,
        direct_tls: bool = False,
        dsql: bool = False,
        rds_proxy: bool = False,
        password: Any = None,
    ) -> None:
        self.endpoints = endpoints
        self.user = user
        self.database = database
        self.tls = tls
        self.target_session_attrs = target_session_attrs
        self.server_settings = server_settings
        self.connect_kwargs = connect_kwargs
        self.auth = auth
        self.direct_tls = direct_tls
        self.dsql = dsql
        self.rds_proxy = rds_proxy
        self.password = password

    def replace(self, **changes: Any) -> ConnectPlan:
        """Return a copy with `changes` applied."""
        fields = {name: getattr(self, name) for name in self.__slots__}
        return ConnectPlan(**{**fields, **changes})

    def asyncpg_kwargs(self) -> dict[str, Any]:
        """Return explicit `asyncpg.connect` arguments for every endpoint (no DSN, no env)."""
        kwargs = dict(self.connect_kwargs)
        kwargs.update(
            host=[host for host, _ in self.endpoints],
            port=[port or 5432 for _, port in self.endpoints],
            user=self.user,
            database=self.database,
            ssl=self.tls.asyncpg_ssl(),
            target_session_attrs=self.target_session_attrs,
            server_settings=dict(self.server_settings) if self.server_settings else None,
        )
        if "direct_tls" in _CONNECT_DEFAULTS:
            kwargs["direct_tls"] = self.direct_tls
        if self.auth is None:
            kwargs["password"] = self.password
        return kwargs


# Kerberos settings, which an IAM login (a password over TLS) has no use for.
_GSS_SETTINGS = ("krbsrvname", "gsslib")


def _check_gss(dsn: DSN, kwargs: Mapping[str, Any]) -> None:
    """Refuse Kerberos settings given for an IAM login (argument or DSN): they would be unused."""
    for name in _GSS_SETTINGS:
        source = f"{name}= in {dsn.name}" if name in dsn.query else None
        if kwargs.get(name) is not None:
            source = f"{name}={kwargs[name]!r}"
        if source is not None:
            raise ConfigurationError(
                f"{source} is a Kerberos (GSSAPI) setting, and an IAM login uses a token as "
                "its password, never Kerberos: drop it, or pass iam=False to log in with "
                "Kerberos"
            )


def _without_query(dsn: str | None, names: Collection[str]) -> str | None:
    """Return `dsn` without the query parameters `names`."""
    if not dsn:
        return dsn
    parts = urllib.parse.urlsplit(dsn)
    if not parts.query:
        return dsn
    kept = [
        (key, value)
        for key, value in urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
        if key not in names
    ]
    return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(kept)))


def _check_session_attrs(value: Any) -> None:
    if value is not None and str(getattr(value, "value", value)) not in _SESSION_ATTRS:
        raise ConfigurationError(
            f"target_session_attrs {value!r} is not supported by asyncpg "
            f"{asyncpg.__version__}: use one of {', '.join(_SESSION_ATTRS)}"
        )


def _parse_arguments(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Return what asyncpg.connect(**kwargs) passes its argument parser."""
    return {name: kwargs.get(name, _CONNECT_DEFAULTS.get(name)) for name in PARSE_PARAMETERS}


def _parse(dsn: str | None, kwargs: Mapping[str, Any]) -> tuple[Any, Any]:
    """Parse connection settings exactly as asyncpg will, without connecting."""
    arguments = _parse_arguments(kwargs)
    arguments["dsn"] = dsn
    try:
        addrs, params, _config = parse_connect_arguments(arguments)
    except (
        ClientConfigurationError,
        ValueError,
        TypeError,
        AttributeError,
        OverflowError,
    ) as exc:
        # asyncpg's parser fails on wrongly typed values with AttributeError (host=1) and
        # OverflowError (port=inf) too.
        text = str(exc)
        if "target_session_attrs" in text:
            found = re.search(r"got (.+)$", text)
            _check_session_attrs(found.group(1).strip("'\"") if found else "?")
        raise ConfigurationError(f"invalid connection settings: {exc}") from exc
    return addrs, params


def check_keywords(
    given: Collection[str], *, what: str, pool: Collection[str] = (), own: Collection[str] = ()
) -> None:
    """Raise `ConfigurationError` for a keyword that is not asyncpg.connect's, nor in `pool`
    (asyncpg.create_pool's) or `own` (the caller's), naming the closest valid one."""
    known = set(_CONNECT_DEFAULTS) | _PLAN_KEYWORDS
    unknown = sorted(name for name in given if name not in known)
    if not unknown:
        return
    name = unknown[0]
    import difflib  # on a failure path only

    close = difflib.get_close_matches(name, sorted(known | set(pool) | set(own)), n=1)
    valid = "asyncpg.connect's arguments" + (", asyncpg.create_pool's" if pool else "")
    if own:
        valid += f" and {', '.join(own)}"
    raise ConfigurationError(
        f"{what} got an unknown keyword argument {name!r}"
        + (f": did you mean {close[0]!r}?" if close else ".")
        + f" It takes {valid}"
    )


def _check_ports(port: Any) -> None:
    """Refuse a port argument (a number or a list of them) outside 1-65535 (asyncpg would
    read 0 as its default)."""
    for value in port if isinstance(port, (list, tuple)) else [port]:
        if isinstance(value, int):
            _options.port("port", value)


_IAM_PASSWORD = (
    "password cannot be combined with IAM authentication: the token is the "
    "password. Drop password=..., or pass iam=False for a static password"
)


def _endpoints(addrs: list[Any], *, iam: bool) -> tuple[tuple[str, int], ...]:
    """Return (host, port) pairs of asyncpg's parsed addresses; a Unix socket has port 0."""
    endpoints: list[tuple[str, int]] = []
    for addr in addrs:
        if isinstance(addr, str):
            if iam:
                raise ConfigurationError(
                    f"IAM authentication needs TLS over TCP, but {addr!r} is a Unix socket: "
                    "pass host='<endpoint>'"
                )
            endpoints.append((addr, 0))
        else:
            endpoints.append((_options.host("host", addr[0]), _options.port("port", addr[1])))
    return tuple(endpoints)


def plan_connect(
    dsn: str | None,
    connect_kwargs: Mapping[str, Any],
    *,
    auth: IAMAuth | None,
    environ: Mapping[str, str] | None = None,
    dsn_name: str = "the DSN",
) -> ConnectPlan:
    """Assemble the complete plan from `dsn` and `connect_kwargs` (`asyncpg.connect`'s).

    The one assembly every route makes (the pool, `Pool.set_connect_args`, the SQLAlchemy
    engine, the command line): the DSN parsed once, Aurora DSQL's defaults, the TLS policy and
    the writer default (``target_session_attrs="read-write"`` for IAM on one Aurora cluster
    endpoint when nothing chose the attributes). `environ` is the environment to read
    (default: ``os.environ``, read here once); `dsn_name` is what messages call the DSN
    (the engine's is "the URL"). Also takes libpq's TLS parameters
    (`TLS_KEYWORDS`: ``sslrootcert=`` (a CA file, or ``"system"``), ``sslcrl=``, ...) as
    keywords. Raises `ConfigurationError` for anything that could not connect, or that could
    send an IAM token in clear or to an unverified server. Callers check unknown keywords first
    (`check_keywords`), so that the message can name their own.
    """
    env = os.environ if environ is None else environ
    parsed = parse_dsn(dsn, name=dsn_name)
    dsql, kwargs = connect_defaults(parsed, connect_kwargs, auth=auth, environ=env)
    rds_proxy, kwargs = _proxy.proxy_defaults(parsed, kwargs, auth=auth, environ=env)
    plan = _resolve(dsn, parsed, kwargs, auth=auth, environ=env, rds_proxy=rds_proxy)
    attrs = _writer_default(plan, parsed, kwargs, env)
    if dsql or (attrs is not None and attrs != plan.target_session_attrs):
        plan = plan.replace(dsql=dsql, target_session_attrs=attrs or plan.target_session_attrs)
    return plan


def _writer_default(
    plan: ConnectPlan, dsn: DSN, kwargs: Mapping[str, Any], environ: Mapping[str, str]
) -> str | None:
    """Return ``"read-write"`` when an IAM plan on one cluster endpoint chose no attributes.

    Anything the caller chose (``target_session_attrs=``, the DSN's query, the
    ``PGTARGETSESSIONATTRS`` variable) wins; any other host keeps asyncpg's ``any``, since an
    instance name says nothing about whether it is a replica.
    """
    if plan.auth is None or kwargs.get("target_session_attrs") is not None:
        return None
    if environ.get("PGTARGETSESSIONATTRS") or "target_session_attrs" in dsn.query:
        return None
    hosts = [plan.auth.signing_host or host for host, _ in plan.endpoints]
    if len(hosts) == 1 and is_writer_endpoint(hosts[0]):
        return "read-write"
    return None


def _resolve(
    dsn: str | None,
    parsed: DSN,
    connect_kwargs: Mapping[str, Any],
    *,
    auth: IAMAuth | None,
    environ: Mapping[str, str],
    rds_proxy: bool,
) -> ConnectPlan:
    """Resolve the arguments into a plan as asyncpg would; validate them (TLS included)."""
    kwargs = dict(connect_kwargs)
    tls_arguments = {name: kwargs.pop(name) for name in TLS_KEYWORDS if name in kwargs}
    for name, value in tls_arguments.items():
        if value is not None and not isinstance(value, str):
            raise ConfigurationError(
                f"{name} must be a string (libpq's parameter), not {type(value).__name__}"
            )
    iam = auth is not None
    if iam and (kwargs.get("password") is not None or parsed.password is not None):
        raise ConfigurationError(_IAM_PASSWORD)
    if iam:
        _check_gss(parsed, kwargs)
    _check_ports(kwargs.get("port"))
    _options.timeout("timeout", kwargs.get("timeout"))
    _options.timeout("command_timeout", kwargs.get("command_timeout"))
    _check_session_attrs(kwargs.get("target_session_attrs"))
    tls = decide_tls(
        ssl_arg=kwargs.get("ssl"),
        dsn=parsed,
        kwargs=kwargs,
        iam=iam,
        allow_unverified=bool(auth is not None and auth.insecure_unverified_tls),
        arguments=tls_arguments,
        environ=environ,
    )
    if tls.context is not None:
        # The policy applied (or refused) the DSN's TLS parameters; asyncpg would pass the
        # ones it does not know to the server as settings.
        dsn = _without_query(dsn, TLS_PARAMETERS)
    addrs, params = _parse(dsn, {**kwargs, "ssl": tls.asyncpg_ssl()})
    if rds_proxy:
        _proxy.refuse_options(params.server_settings, dsn)
    tsa = getattr(params.target_session_attrs, "value", str(params.target_session_attrs))
    passthrough = {k: v for k, v in kwargs.items() if k not in _RESOLVED}
    if not iam:
        # Kerberos settings from any source go to asyncpg as resolved.
        for name in _GSS_SETTINGS:
            value = getattr(params, name, None)
            if value is not None and name in _CONNECT_DEFAULTS:
                passthrough[name] = value
    negotiation = getattr(params, "ssl_negotiation", None)
    return ConnectPlan(
        endpoints=_endpoints(addrs, iam=iam),
        user=str(params.user),
        database=str(params.database),
        tls=tls,
        target_session_attrs=str(tsa),
        server_settings=dict(params.server_settings) if params.server_settings else None,
        connect_kwargs=passthrough,
        auth=auth,
        direct_tls=tls.direct
        or bool(kwargs.get("direct_tls"))
        or getattr(negotiation, "value", negotiation) == "direct",
        rds_proxy=rds_proxy,
        password=None if iam else params.password,
    )


class _Budget:
    """The time one connect attempt may take, its failure diagnosis included (`timeout`)."""

    __slots__ = ("deadline", "timeout")

    def __init__(self, timeout: float | None, deadline: float | None) -> None:
        self.timeout = timeout
        self.deadline = deadline

    @classmethod
    def start(cls, timeout: float | None) -> _Budget:
        if timeout is None:
            return cls(None, None)
        return cls(timeout, asyncio.get_running_loop().time() + timeout)

    @classmethod
    def since(cls, began: float, timeout: float | None) -> _Budget:
        """The budget of an attempt that began at loop time `began`."""
        if timeout is None:
            return cls(None, None)
        return cls(timeout, began + timeout)

    def remaining(self) -> float | None:
        """Seconds left (None: no limit)."""
        if self.deadline is None:
            return None
        return max(self.deadline - asyncio.get_running_loop().time(), 0.0)

    def for_connect(self, *, reserve: bool) -> float | None:
        """The connect's own timeout: what is left, less a share kept for explaining a
        timeout (`reserve`) so that the explanation fits in the budget too."""
        remaining = self.remaining()
        if remaining is None or not reserve:
            return remaining
        return remaining - min(_DIAGNOSIS_RESERVE, remaining * _DIAGNOSIS_SHARE)


# asyncpg's default connect timeout (None: none).
_DEFAULT_TIMEOUT: float | None = _CONNECT_DEFAULTS.get("timeout")


def _login_budget(timeout: Any) -> tuple[float | None, float | None]:
    """Return a login's timeout (asyncpg's default for None) and the share of it its connect
    may spend (`_Budget.for_connect` with the reserve, before anything was awaited)."""
    timeout = _DEFAULT_TIMEOUT if timeout is None else float(timeout)
    if timeout is None:
        return None, None
    left = timeout if timeout > 0.0 else 0.0
    return timeout, left - min(_DIAGNOSIS_RESERVE, left * _DIAGNOSIS_SHARE)


class ConnectCounters:
    """What a connector has done (the pool's stats read them).

    `attempts`: calls to open a connection (each may try several hosts); `failures`: attempts
    that raised, refused logins included; `auth_failures`: logins the server refused;
    `rate_limited`: login attempts that waited for the connect rate limit;
    `auth_failures_by_cause`: refused logins by the most likely cause (`AUTH_CAUSES`).
    """

    __slots__ = ("attempts", "auth_failures", "auth_failures_by_cause", "failures", "rate_limited")

    def __init__(self) -> None:
        self.attempts = 0
        self.failures = 0
        self.auth_failures = 0
        self.rate_limited = 0
        self.auth_failures_by_cause: Counter[str] = Counter()


class _TokenPassword(TokenRecord):
    """The ``password`` callable of one login: a token for `target`, what was done noted in
    itself (a `TokenRecord`: one object per connect, not two). asyncpg keeps it on the
    connection for the connection's life: one small object (a partial of a bound method is
    three), whose record `forget` drops once the login succeeded. asyncpg keeps what it was
    given as ``password``, never what a callable returned (its query loggers get it too), so
    the token itself is never passed: this callable returns it without waiting when the
    credentials need no fetch (`TokenProvider.token_now`), and asyncpg then has nothing to
    await."""

    __slots__ = ("provider", "target")

    def __init__(self, provider: TokenProvider, target: SigningTarget) -> None:
        self.provider = provider
        self.target = target
        # `TokenRecord`'s fields, set here rather than in a call to its __init__.
        self.signed_at = self.credentials_expiry = None
        self.reused = False

    def __call__(self) -> str | Awaitable[str]:
        token = self.provider.token_now(self.target, self)
        if token is None:  # the credentials must be fetched first
            return self.provider.token(self.target, self)
        return token

    def forget(self) -> None:
        self.signed_at = self.credentials_expiry = None


class Connector:
    """Open connections as a plan says: a token per host tried, within the rate limit.

    `connect` is `asyncpg.connect` or a compatible callable (a pool's ``connect=``). `kind`
    and `name` say what connects in log lines (``"pool app@host:5432"``).
    `use_plan` swaps in a new plan (`Pool.set_connect_args`); the token provider, the rate
    limit and the counters stay.
    """

    def __init__(
        self,
        plan: ConnectPlan,
        *,
        provider: TokenProvider | None = None,
        max_connect_rate: float | None = None,
        name: str | None = None,
        kind: str = "pool",
        clock: Clock = SYSTEM_CLOCK,
        connect: Callable[..., Awaitable[Any]] = asyncpg.connect,
    ) -> None:
        if (plan.auth is None) != (provider is None):
            raise ConfigurationError("a plan with IAM needs a token provider, and only it")
        self._clock = clock
        self._now = clock.monotonic
        self._connect = connect
        # asyncpg.connect itself: a login then parses its arguments once per endpoint.
        self._direct = connect is asyncpg.connect
        self.provider = provider
        self.counters = ConnectCounters()
        self._bucket = (
            TokenBucket(max_connect_rate, clock=clock, stagger=True) if max_connect_rate else None
        )
        self.max_connect_rate = max_connect_rate or None
        first = plan.endpoints[0] if plan.endpoints else ("<none>", 0)
        self.name = name or f"{plan.user}@{first[0]}:{first[1]}"
        self._owner = f"{kind} {self.name}"
        self.plan = plan
        self.targets: tuple[SigningTarget, ...] = ()
        self.router: Router | None = None
        """Chooses an instance endpoint per connect from a cluster's topology (`_topology`);
        consulted by `open_planned`, so a blue/green `route` (which wins while set) and the
        `login_gate` (which holds a login to whatever host it picks) compose with it."""
        self._stopped = False
        # Tasks waiting for a slot of the rate limit: stop() wakes them.
        self._waiting: set[asyncio.Task[Any]] = set()
        # What stop() stops besides: the monitors that hang off the connects (blue/green, health).
        self._also_stop: list[Callable[[], None]] = []
        self.route: Callable[[dict[str, Any]], Coroutine[Any, Any, tuple[Any, float]]] | None = None
        """Set by a blue/green switchover while it holds or reroutes connects (else None)."""
        self.login_gate: Callable[[str, int], Awaitable[None] | None] | None = None
        """What a login to (host, port) waits for first, if anything (the pool's health
        check: a host that went silent)."""
        self.use_plan(plan)

    def stop(self) -> None:
        """Start no connect from now on: callers, those waiting for the rate limit included
        (woken at once), get asyncpg's "pool is closing"; the monitors given to `stop_with`
        stop too (the pool's close() and terminate() call it)."""
        self._stopped = True
        for task in self._waiting:
            task.cancel()
        for stop in self._also_stop:
            stop()

    def stop_with(self, stop: Callable[[], None]) -> None:
        """Call `stop` (idempotent) when the connector stops: a monitor of its connects."""
        self._also_stop.append(stop)

    def use_plan(self, plan: ConnectPlan) -> None:
        """Connect as `plan` says from now on; raise `ConfigurationError` and change nothing
        when its signing targets cannot be resolved."""
        if (plan.auth is None) != (self.provider is None):
            raise ConfigurationError(
                "set_connect_args cannot turn IAM on or off: create a new pool instead"
            )
        targets: tuple[SigningTarget, ...] = ()
        if self.provider is not None:
            targets = tuple(
                self.provider.target(host, port, plan.user) for host, port in plan.endpoints
            )
        if plan.auth is not None and not plan.tls.verified:
            logger.warning(
                "%s: TLS without certificate verification (sslmode %s from %s, allowed by "
                "IAMAuth(insecure_unverified_tls=True)): anyone in the path could present a "
                "certificate and receive the IAM token",
                self._owner,
                plan.tls.mode,
                plan.tls.mode_source,
            )
        self.plan, self.targets = plan, targets
        # The connect arguments every login starts from (asyncpg only reads them).
        self._kwargs = plan.asyncpg_kwargs()
        # asyncpg's parse of them, by (host, port, target_session_attrs); () where
        # asyncpg.connect must parse them itself (`_parse_endpoint`).
        self._parsed: dict[tuple[str, int, str | None], ParsedConnect | tuple[()]] = {}
        # The plan's connect timeout (None: asyncpg's default), read on every connect.
        self.plan_timeout: Any = plan.connect_kwargs.get("timeout")
        # (timeout, the connect's own share of it) of a login given no timeout of its own.
        self._plan_budget = _login_budget(self.plan_timeout)
        # A caller's context is used as given: each connect re-checks it (None: nothing to).
        self._recheck = plan.tls.check_unchanged if plan.tls.rechecked else None

    @property
    def auth(self) -> IAMAuth | None:
        """The IAM settings, or None for a plan without IAM."""
        return self.plan.auth

    # -- connecting ------------------------------------------------------------------------

    def open(self, **extra: Any) -> Coroutine[Any, Any, tuple[Any, float]]:
        """Open one connection; the awaitable returns it and the clock time its login began.

        `extra` are further `connect` arguments (the pool's ``loop``, ``connection_class``,
        ``record_class``; a ``timeout`` overrides the plan's).
        """
        return self.open_watched(extra, None)

    def open_watched(
        self, extra: dict[str, Any], guard: FailoverGuard | None
    ) -> Coroutine[Any, Any, Any]:
        """`open`, watched by the owner's failover `guard` when given (`FailoverGuard.open`):
        the awaitable then returns the connection alone, handed to the guard, and a failure a
        failover explains is retried."""
        # Runs for every new connection: it returns the coroutine that does the work rather
        # than awaiting it in one more, since every await inside a connect resumes each
        # coroutine of the chain. A login to the plan's one endpoint does the guard's part
        # itself, for the same reason.
        if self._stopped:
            raise asyncpg.InterfaceError("pool is closing")
        recheck = self._recheck
        if recheck is not None:
            recheck()  # refuse a caller's context that stopped verifying
        self.counters.attempts += 1
        route = self.route
        if route is not None:
            attempt = route(extra)
        elif self.router is None and len(self.targets) == 1:  # `open_planned`, one call less
            return self._login(self.targets[0], extra, self.plan.target_session_attrs, guard=guard)
        else:
            attempt = self.open_planned(extra)
        return attempt if guard is None else guard.first_attempt(attempt, extra)

    def open_planned(
        self, extra: Mapping[str, Any], attrs: str | None = None
    ) -> Coroutine[Any, Any, tuple[Any, float]]:
        """Open one connection where the plan says (`open` without a route); `attrs`
        overrides the plan's ``target_session_attrs``."""
        if self.provider is None:
            return self._open_without_iam(extra)
        router = self.router
        if router is not None and attrs is None:
            # The pool's connections go where the topology says; the library's own (an
            # `attrs` override) where the plan says.
            return self._login_routed(router, extra, self.plan.target_session_attrs)
        tsa = attrs or self.plan.target_session_attrs
        if len(self.targets) == 1:
            return self._login(self.targets[0], extra, tsa)
        return self._login_any(extra, tsa)

    async def _login_routed(
        self, router: Router, extra: Mapping[str, Any], tsa: str
    ) -> tuple[Any, float]:
        """Log in where the cluster's topology says (see `_topology.Router`)."""
        if not router.searching:
            target = router.route()
        else:
            timeout = extra.get("timeout", self.plan.connect_kwargs.get("timeout"))
            if timeout is None:
                timeout = _CONNECT_DEFAULTS.get("timeout")
            loop = asyncio.get_running_loop()
            began = loop.time()
            try:
                target = await router.wait(timeout)
            except BaseException:
                self.counters.failures += 1
                raise
            if timeout is not None:
                extra = {**extra, "timeout": max(timeout - (loop.time() - began), 0.001)}
        if target is None:
            return await self._login(self.targets[0], extra, tsa)
        try:
            opened = await self._login(target, extra, tsa)
        except _NEXT_HOST_ERRORS:
            # A reader that left: one more try on another (a writer has no other).
            other = router.failed(target)
            if other is None:
                raise
            target = other
            try:
                opened = await self._login(target, extra, tsa)
            except BaseException:
                router.settle(target)
                raise
        except BaseException:
            router.settle(target)
            raise
        router.settle(target, opened[0])
        return opened

    def open_to(
        self, target: SigningTarget | None, attrs: str, timeout: float
    ) -> Coroutine[Any, Any, tuple[Any, float]]:
        """Open a connection of the library's own to `target` (default: the plan's first
        endpoint) with `attrs` as ``target_session_attrs``; not counted as the pool's."""
        return self._login(target or self.targets[0], {"timeout": timeout}, attrs, one=False)

    def open_at(
        self, target: SigningTarget, extra: Mapping[str, Any], attrs: str | None = None
    ) -> Coroutine[Any, Any, tuple[Any, float]]:
        """Log in to `target` (dial its host and port, sign for its signing name)."""
        return self._login(target, extra, attrs or self.plan.target_session_attrs)

    async def _open_without_iam(self, extra: Mapping[str, Any]) -> tuple[Any, float]:
        try:
            budget = _Budget.start(self.connect_timeout(extra))
            if self._bucket is not None:
                await self._throttle(self._bucket, budget)
            kwargs = {**self._kwargs, **extra}
            endpoints = self.plan.endpoints
            explained = len(endpoints) == 1 and bool(endpoints[0][1])
            kwargs["timeout"] = budget.for_connect(reserve=explained)
            gate = self.login_gate
            if gate is not None and len(endpoints) == 1:
                waiting = gate(*endpoints[0])
                if waiting is not None:
                    await _wait_at_gate(waiting, *endpoints[0], budget, kwargs, reserve=explained)
            started = self._clock.monotonic()
            try:
                con = await self._connect(**kwargs)
            except (OSError, asyncio.TimeoutError) as exc:
                if not explained:
                    raise  # several hosts (asyncpg tried each), or a Unix socket
                error = await self._explain_connect(exc, *endpoints[0], budget)
                if error is None:
                    raise
                raise error from without_traceback(exc)
        except BaseException:
            self.counters.failures += 1
            raise
        if self.plan.rds_proxy:
            _proxy.adopt(con)
        return con, started

    async def sign(self, target: SigningTarget | None = None) -> str:
        """Return a token for `target` (default: the first endpoint), as a connect would."""
        if self.provider is None:
            raise ConfigurationError("this connection plan does not use IAM: there is no token")
        return await self.provider.token(target or self.targets[0])

    def connect_timeout(self, extra: Mapping[str, Any]) -> float | None:
        """The connect timeout of this attempt (seconds; None: none)."""
        timeout = extra.get("timeout", self.plan_timeout)
        return _DEFAULT_TIMEOUT if timeout is None else float(timeout)

    async def _throttle(self, bucket: TokenBucket, budget: _Budget) -> None:
        """Take a slot of the connect rate limit within the attempt's budget; every login
        attempt takes one.

        Callers check for a limit first: without one, no coroutine is made on a connect.
        """
        task = asyncio.current_task()
        if task is not None:
            self._waiting.add(task)
        try:
            waited = await asyncio.wait_for(bucket.acquire(), budget.remaining())
        except asyncio.CancelledError:
            if not self._stopped or task is None:
                raise
            if hasattr(task, "uncancel"):
                task.uncancel()  # the cancel was stop()'s, not the caller's
            raise asyncpg.InterfaceError("pool is closing") from None
        except asyncio.TimeoutError:
            self.counters.rate_limited += 1
            raise ConnectTimeoutError(
                f"no connect slot within {budget.timeout:g} s (max_connect_rate="
                f"{bucket.rate:g} per second)",
                host=self.name,
                port=0,
                phase="rate limit",
                hint="More connects are asked for than max_connect_rate allows: raise it, "
                "or the timeout, or lower the pool's demand for new connections",
                timeout=budget.timeout,
            ) from None
        finally:
            self._waiting.discard(task)
        if waited > 0:
            self.counters.rate_limited += 1
        if self._stopped:
            raise asyncpg.InterfaceError("pool is closing")

    @overload
    async def _login(
        self, target: SigningTarget, extra: Mapping[str, Any], attrs: str, *, one: bool = True
    ) -> tuple[Any, float]: ...

    @overload
    async def _login(
        self,
        target: SigningTarget,
        extra: dict[str, Any],
        attrs: str,
        *,
        guard: FailoverGuard | None,
    ) -> Any: ...

    async def _login(
        self,
        target: SigningTarget,
        extra: Any,
        attrs: str,
        *,
        one: bool = True,
        guard: FailoverGuard | None = None,
    ) -> Any:
        """Log in to one endpoint with a token signed for it; return the connection and the
        clock time the login began.

        `one`: this is the whole attempt (a failure counts), not one host of several.
        `guard`: the owner's failover guard, when this login is the first attempt of its
        `FailoverGuard.open`: the login does the guard's part (`first_opened`, `first_failed`)
        and returns the connection alone.
        """
        provider = self.provider
        assert provider is not None
        if guard is not None:
            epoch, recoveries = guard.epoch, guard.recoveries
        began = asyncio.get_running_loop().time()
        try:
            # Runs for every new connection: the budget's arithmetic is `_login_budget`'s (once
            # per plan), not `_Budget`'s methods, when nothing was awaited (no rate limit).
            # The attempt's `_Budget` is made only when something needs it (the rate limit,
            # a silent host, a failure's diagnosis).
            if "timeout" in extra:
                timeout, for_connect = _login_budget(extra["timeout"])
            else:  # worked out once per plan
                timeout, for_connect = self._plan_budget
            if self._bucket is not None:
                budget = _Budget.since(began, timeout)
                await self._throttle(self._bucket, budget)
                for_connect = budget.for_connect(reserve=True)
            password = _TokenPassword(provider, target)
            kwargs = {
                **self._kwargs,
                **extra,
                "host": target.host,
                "port": target.port,
                "target_session_attrs": attrs,
                "password": password,
                "timeout": for_connect,
            }
            gate = self.login_gate
            waiting = gate(target.host, target.port) if gate is not None else None
            if waiting is not None:
                budget = _Budget.since(began, timeout)
                await _wait_at_gate(waiting, target.host, target.port, budget, kwargs, reserve=True)
            started = self._now()
            try:
                parsed: ParsedConnect | tuple[()] | None = ()
                if self._direct and extra.keys() <= _PER_CONNECT:
                    parsed = self._parsed.get((target.host, target.port, attrs))
                    if parsed is None:
                        parsed = self._parse_endpoint(target, attrs)
                if parsed:
                    con = await connect_parsed(parsed, password, kwargs)
                else:
                    con = await self._connect(**kwargs)
                password.signed_at = password.credentials_expiry = None  # `forget`, inline
            except InvalidAuthorizationSpecificationError as exc:
                if isinstance(exc, IAMAuthenticationError) or not is_iam_refusal(exc):
                    raise
                self.counters.auth_failures += 1
                raise self.explain(exc, target, password) from without_traceback(exc)
            except (OSError, asyncio.TimeoutError) as exc:
                budget = _Budget.since(began, timeout)
                error = await self._explain_connect(exc, target.host, target.port, budget)
                if error is None:
                    raise
                raise error from without_traceback(exc)
        except Exception as exc:
            if one:
                self.counters.failures += 1
            if guard is None:
                raise
            failure = exc
        except BaseException:
            if one:
                self.counters.failures += 1
            raise
        else:
            if self.plan.rds_proxy:
                _proxy.adopt(con)
            if guard is None:
                return con, started
            return guard.first_opened(con, started, epoch)
        # Outside the handler: a retry's own failure does not chain this one.
        return await guard.first_failed(failure, epoch, recoveries, began, extra)

    def _parse_endpoint(
        self, target: SigningTarget, attrs: str | None
    ) -> ParsedConnect | tuple[()]:
        """Parse the arguments of a login to `target` as asyncpg.connect does on every call,
        once per plan, endpoint and `attrs`; () when asyncpg.connect must (an argument it
        refuses, which it then raises where it always did, or more than one address).

        Environment variables asyncpg reads for what the plan leaves unset are read here.
        """
        parsed: ParsedConnect | tuple[()] = ()
        if self._kwargs.keys() <= _CONNECT_KEYWORDS:
            arguments = _parse_arguments(self._kwargs)
            # The login's own; the password is each login's (`connect_parsed`), and one given
            # here keeps asyncpg from looking for another.
            arguments.update(host=target.host, port=target.port, target_session_attrs=attrs)
            arguments["password"] = ""
            try:
                parsed = parse_connect(arguments) or ()
            except Exception:  # asyncpg.connect raises it
                parsed = ()
        if len(self._parsed) >= _MAX_PARSED:
            self._parsed.clear()
        self._parsed[(target.host, target.port, attrs)] = parsed
        return parsed

    async def _login_any(self, extra: Mapping[str, Any], tsa: str) -> tuple[Any, float]:
        """Log in to the first endpoint that answers and has the wanted role (one attempt)."""
        try:
            return await self._login_first(extra, tsa)
        except BaseException:
            self.counters.failures += 1
            raise

    async def _login_first(self, extra: Mapping[str, Any], tsa: str) -> tuple[Any, float]:
        """Log in to the first endpoint that answers and has the wanted role.

        At most one login per endpoint: for ``prefer-standby`` the first primary that answers
        is kept open as the fallback while the others are tried, as asyncpg does.
        """
        loop = asyncio.get_running_loop()
        timeout = extra.get("timeout", self.plan.connect_kwargs.get("timeout"))
        if timeout is None:
            timeout = _CONNECT_DEFAULTS.get("timeout")
        deadline = None if timeout is None else loop.time() + float(timeout)
        attrs = "any" if tsa == "prefer-standby" else tsa
        fallback: tuple[Any, float] | None = None
        last_error: BaseException | None = None
        try:
            for target in self.targets:
                per_host = dict(extra)
                if deadline is not None:
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        raise asyncio.TimeoutError(
                            f"connect timed out after {timeout} s trying every host"
                        )
                    per_host["timeout"] = remaining
                try:
                    opened = await self._login(target, per_host, attrs, one=False)
                except (*_NEXT_HOST_ERRORS, TargetServerAttributeNotMatched) as exc:
                    last_error = exc
                    continue
                if tsa != "prefer-standby":
                    return opened
                from ._retry import in_recovery  # only prefer-standby asks

                if await in_recovery(opened[0]):
                    return opened
                if fallback is None:
                    fallback = opened
                else:
                    opened[0].terminate()
            if fallback is not None:
                chosen, fallback = fallback, None
                return chosen
        finally:
            if fallback is not None:
                fallback[0].terminate()
        assert last_error is not None
        raise last_error

    # -- explaining ------------------------------------------------------------------------

    def explain(
        self,
        exc: InvalidAuthorizationSpecificationError,
        target: SigningTarget,
        record: TokenRecord,
    ) -> IAMAuthenticationError:
        """Turn a refused login into an `IAMAuthenticationError` with ranked hints; log it."""
        provider = self.provider
        assert provider is not None
        context = failure_context(
            exc,
            target,
            record,
            credentials=provider.credentials,
            database=self.plan.database,
            now=self._clock.now(),
        )
        ranked = rank_auth_failure(context)
        cause = ranked[0][0]
        self.counters.auth_failures_by_cause[cause] += 1
        error = IAMAuthenticationError(context, [hint for _, hint in ranked], cause)
        # DEBUG: the error itself says all of this; a background refill logs it when it fails.
        logger.debug(
            "%s: IAM login refused for %s at %s:%s (region %s): %s",
            self._owner,
            target.user,
            target.host,
            target.port,
            target.region,
            error.hints[0],
        )
        return error

    async def _explain_connect(
        self, exc: BaseException, host: str, port: int, budget: _Budget
    ) -> ConnectError | None:
        """Return the library's error for a connect that failed before a login, or None."""
        if isinstance(exc, IAMError):
            return None
        if isinstance(exc, ssl.SSLCertVerificationError):
            return _certificate_error(exc, host, port, self.plan.tls)
        if isinstance(exc, asyncio.TimeoutError):
            return await _explain_timeout(host, port, budget)
        return _network_error(exc, host, port)

    async def reset(self) -> None:
        """Close the token provider's credential cache and start a fresh one."""
        old = self.provider
        if old is None:
            return
        self.provider = TokenProvider(old.auth, clock=self._clock)
        await old.aclose()

    async def aclose(self) -> None:
        """Release the credential cache's resources (idempotent)."""
        if self.provider is not None:
            await self.provider.aclose()


async def _wait_at_gate(
    waiting: Awaitable[None],
    host: str,
    port: int,
    budget: _Budget,
    kwargs: dict[str, Any],
    *,
    reserve: bool,
) -> None:
    """Wait for a silent host to answer, within the attempt's budget (what is left of it goes
    to the login, less the diagnosis share when `reserve`)."""
    try:
        await asyncio.wait_for(waiting, budget.for_connect(reserve=reserve))
    except asyncio.TimeoutError:
        timeout = budget.timeout
        raise ConnectTimeoutError(
            f"{host}:{port} went silent and answered no probe within the connect timeout "
            f"({timeout:g} s); no login was tried",
            host=host,
            port=port,
            phase="silent",
            hint="The host or the network path to it is down or hung (see the pool's WARNING "
            "that named it); it is probed every second and logins go ahead once it answers",
            timeout=timeout,
        ) from None
    left = budget.for_connect(reserve=reserve)
    if left is not None:
        kwargs["timeout"] = max(left, 0.001)


def _certificate_error(
    exc: ssl.SSLCertVerificationError, host: str, port: int, tls: TLSPolicy
) -> TLSVerificationError:
    """Explain a server certificate that did not verify (no password was sent)."""
    detail = exc.verify_message or str(exc)
    if exc.verify_code in _NAME_MISMATCH or "mismatch" in detail.lower():
        hint = (
            f"The certificate does not name {host!r}: connect by the name on the "
            "certificate (the RDS endpoint), or, through a tunnel, CNAME or IP address, "
            "pass ssl='verify-ca' with the RDS CA bundle (sslrootcert='<bundle>' or "
            "`asyncpg-iam ca-bundle`; never the system store, which trusts any public "
            "certificate) and IAMAuth(signing_host='<the RDS endpoint name>')"
        )
    else:
        hint = (
            "Run `asyncpg-iam ca-bundle` for the RDS CA bundle, or pass "
            "sslrootcert='<PEM file of the server's CA>' or an ssl.SSLContext that "
            "trusts it"
        )
    return TLSVerificationError(
        f"the TLS certificate of {host}:{port} did not verify against {tls.ca_source} "
        f"({detail}); no password was sent",
        host=host,
        port=port,
        hint=hint,
        ca=tls.ca_source,
    )


def _network_error(exc: BaseException, host: str, port: int) -> ConnectError | None:
    """Explain a connect that failed in DNS, TCP or the TLS request, or return None."""
    where = f"{host}:{port}"
    if isinstance(exc, socket.gaierror):
        return ConnectError(
            f"cannot resolve {host!r} ({exc.strerror or exc})",
            host=host,
            port=port,
            phase="dns",
            hint="Check the host name. RDS endpoint names resolve only where DNS can see "
            "them (a private instance: inside its VPC); try `getent hosts NAME` here",
        )
    if isinstance(exc, ConnectionRefusedError):
        return ConnectError(
            f"connection to {where} refused",
            host=host,
            port=port,
            phase="tcp",
            hint="Nothing listens there: check the port (the instance's, 5432 by default) "
            "and that the database is running",
        )
    if isinstance(exc, ConnectionError) and "rejected SSL upgrade" in str(exc):
        return ConnectError(
            f"{where} refused TLS (it answered 'N' to the TLS request)",
            host=host,
            port=port,
            phase="tls",
            hint="RDS always offers TLS, so this is not RDS itself: a local server, or a "
            "proxy or tunnel that terminates TLS. No password was sent",
        )
    if not isinstance(exc, ssl.SSLError) and exc.__class__ is OSError:
        return ConnectError(
            f"cannot connect to {where}: {exc.strerror or exc}",
            host=host,
            port=port,
            phase="tcp",
            hint="Check the network path to it: routes, security groups, firewalls",
        )
    return None


async def _explain_timeout(host: str, port: int, budget: _Budget) -> ConnectTimeoutError:
    """Find how far a timed-out connect gets (a short probe, on the failure path only),
    within what is left of the attempt's budget; skip it when nothing is left."""
    timeout = budget.timeout
    where, limit = f"{host}:{port}", f"{timeout:g} s" if timeout is not None else "the timeout"
    remaining = budget.remaining()
    probe = _PROBE_TIMEOUT if remaining is None else min(_PROBE_TIMEOUT, remaining)
    if probe < _MIN_PROBE:
        return ConnectTimeoutError(
            f"no answer from {where} within {limit}",
            host=host,
            port=port,
            phase="unknown",
            hint="The timeout left no time to find how far the connect got: check the "
            "host, the port and the network path, or raise timeout=...",
            timeout=timeout,
        )
    deadline = asyncio.get_running_loop().time() + probe

    def left() -> float:
        return max(deadline - asyncio.get_running_loop().time(), 0.0)

    phase = "login"
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), left())
    except (OSError, asyncio.TimeoutError):
        phase = "tcp"
    else:
        try:
            writer.write(SSL_REQUEST)
            await writer.drain()
            if not await asyncio.wait_for(reader.read(1), left()):
                phase = "startup"
        except (OSError, asyncio.TimeoutError):
            phase = "startup"
        finally:
            writer.close()
    messages = {
        "tcp": (
            f"no TCP connection to {where} within {limit}",
            "Packets are dropped on the way: check that the security group allows this host on "
            "that port, the network ACLs and routes, and that the instance is publicly "
            "accessible if you connect from outside its VPC",
        ),
        "startup": (
            f"{where} accepted a TCP connection but did not answer within {limit}",
            "Something that is not PostgreSQL listens there, or a proxy or load balancer holds "
            "the connection: check the host and port",
        ),
        "login": (
            f"{where} answered, but TLS and the login did not finish within {limit}",
            "The server or a proxy in front of it is slow or overloaded: check it, or raise "
            "timeout=...",
        ),
    }
    message, hint = messages[phase]
    return ConnectTimeoutError(
        message, host=host, port=port, phase=phase, hint=hint, timeout=timeout
    )
