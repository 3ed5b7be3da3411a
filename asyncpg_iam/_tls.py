"""The TLS policy: where the RDS CA bundle lives, and the one decision of how to protect a login.

An IAM token is a bearer credential valid for 15 minutes: it may only travel over TLS to a
server whose certificate was verified. `decide_tls` reads every libpq TLS parameter
(`TLS_PARAMETERS`) from every place it can come from, once: a keyword argument (``ssl=`` for
the sslmode), the DSN, a ``pg_service.conf`` service, the environment (``PGSSLMODE``,
``PGSSLCRL``, ...). Each is applied to an explicit `ssl.SSLContext` or refused with a
`ConfigurationError` naming it and its source; none is dropped. Every connect then hands
asyncpg that context, so nothing in the environment can weaken TLS afterwards.

With IAM, ``verify-full`` (the default) is accepted, and ``verify-ca`` with a CA file (the
system store trusts any public certificate for any name: libpq 16+ refuses verify-ca with
``sslrootcert=system``, and so does this policy, whether the system store is named or used for
want of a bundle); ``disable``, ``allow`` and ``prefer`` are refused (they can fall back to
plaintext); ``require`` (and a context that does not verify certificates) is refused unless
the caller opts in with ``IAMAuth(insecure_unverified_tls=True)``, since it hands the token to
anyone in the path. A caller's context is used as given, so `TLSPolicy.check_unchanged`
re-reads its ``verify_mode`` and ``check_hostname`` before each connect.
"""

from __future__ import annotations

import configparser
import os
import ssl
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ._dsn import DSN
from ._errors import ConfigurationError

__all__ = [
    "SSL_REQUEST",
    "TLS_KEYWORDS",
    "TLS_PARAMETERS",
    "TLSPolicy",
    "TLSSetting",
    "ca_bundle_path",
    "decide_tls",
    "default_ssl_context",
]

#: PostgreSQL's SSLRequest: the first message of a connection that asks for TLS.
SSL_REQUEST = struct.pack("!ii", 8, 80877103)

#: Environment variable naming a CA bundle to use instead of the cached RDS bundle.
CA_BUNDLE_ENV = "ASYNCPG_IAM_CA_BUNDLE"
CA_BUNDLE_FILENAME = "rds-global-bundle.pem"

SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
VERIFIED_MODES = frozenset({"verify-ca", "verify-full"})
# Modes in which asyncpg may send the password without TLS.
PLAINTEXT_MODES = frozenset({"disable", "allow", "prefer"})
# The opt-in that lets an IAM login use TLS without certificate verification.
UNVERIFIED_OPT_IN = "IAMAuth(insecure_unverified_tls=True)"

#: Every TLS parameter libpq knows, and the environment variable libpq reads it from.
TLS_PARAMETERS: Mapping[str, str | None] = {
    "sslmode": "PGSSLMODE",
    "sslrootcert": "PGSSLROOTCERT",
    "sslcert": "PGSSLCERT",
    "sslkey": "PGSSLKEY",
    "sslpassword": None,
    "sslcrl": "PGSSLCRL",
    "sslcrldir": "PGSSLCRLDIR",
    "sslsni": "PGSSLSNI",
    "ssl_min_protocol_version": "PGSSLMINPROTOCOLVERSION",
    "ssl_max_protocol_version": "PGSSLMAXPROTOCOLVERSION",
    "sslnegotiation": "PGSSLNEGOTIATION",
    "sslcertmode": "PGSSLCERTMODE",
}
#: The TLS parameters a pool also takes as keyword arguments (sslmode is ``ssl=``).
TLS_KEYWORDS = frozenset(TLS_PARAMETERS) - {"sslmode"}
# Parameters whose value is a secret: named, never shown.
_SECRET = frozenset({"sslpassword"})
# Parameters that would have to change a caller's ssl.SSLContext.
_CONTEXT_PARAMETERS = (
    "sslrootcert",
    "sslcert",
    "sslkey",
    "sslpassword",
    "sslcrl",
    "sslcrldir",
    "ssl_min_protocol_version",
    "ssl_max_protocol_version",
    "sslcertmode",
)
_PROTOCOLS = {
    "TLSv1": ssl.TLSVersion.TLSv1,
    "TLSv1.1": ssl.TLSVersion.TLSv1_1,
    "TLSv1.2": ssl.TLSVersion.TLSv1_2,
    "TLSv1.3": ssl.TLSVersion.TLSv1_3,
}


def cache_dir() -> Path:
    """Return the directory where asyncpg-iam caches downloads (XDG cache convention)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "asyncpg-iam"


def ca_bundle_path() -> Path | None:
    """Return the CA bundle to verify RDS servers with, or None when there is none.

    ``$ASYNCPG_IAM_CA_BUNDLE`` wins; otherwise the bundle that ``asyncpg-iam ca-bundle``
    downloaded into the cache directory, if it exists.
    """
    explicit = os.environ.get(CA_BUNDLE_ENV)
    if explicit:
        return Path(explicit)
    cached = cache_dir() / CA_BUNDLE_FILENAME
    return cached if cached.is_file() else None


def default_ssl_context() -> ssl.SSLContext:
    """Return a verify-full client context: the RDS CA bundle if known, else the system store."""
    bundle = ca_bundle_path()
    context = ssl.create_default_context(cafile=str(bundle) if bundle is not None else None)
    context.check_hostname = True
    context.verify_mode = ssl.CERT_REQUIRED
    return context


class TLSSetting:
    """One libpq TLS parameter the policy applied: its value and where it came from.

    Internal records on every pool's start are plain slotted classes, not dataclasses (whose
    class creation costs a cold start about half a millisecond each); none is ever changed
    after it is made.
    """

    __slots__ = ("name", "source", "value")

    def __init__(self, name: str, value: str, source: str) -> None:
        self.name = name
        self.value = value
        self.source = source


class TLSPolicy:
    """How every login of one plan is protected, decided once.

    `mode` is a libpq sslmode name and `mode_source` says where it came from (``"the
    default"``, ``"PGSSLMODE=verify-ca in the environment"``, ...). `context` is the context
    every connect passes to asyncpg (None only without IAM, for the plaintext-capable modes,
    which asyncpg then negotiates itself). `ca_file` is the CA file that verifies the server
    (None: the system store, or a context the caller built), `ca_source` describes it.
    `settings` are the other libpq TLS parameters applied (`TLS_PARAMETERS`), `direct` says
    whether TLS starts at once (``sslnegotiation=direct``).
    """

    __slots__ = (
        "_checked",
        "ca_file",
        "ca_source",
        "cert_file",
        "context",
        "direct",
        "key_file",
        "mode",
        "mode_source",
        "settings",
    )

    def __init__(
        self,
        mode: str,
        mode_source: str,
        context: ssl.SSLContext | None,
        ca_file: str | None,
        ca_source: str,
        cert_file: str | None = None,
        key_file: str | None = None,
        *,
        settings: tuple[TLSSetting, ...] = (),
        direct: bool = False,
        checked: tuple[ssl.VerifyMode, bool] | None = None,
    ) -> None:
        self.mode = mode
        self.mode_source = mode_source
        self.context = context
        self.ca_file = ca_file
        self.ca_source = ca_source
        self.cert_file = cert_file
        self.key_file = key_file
        self.settings = settings
        self.direct = direct
        # What the decision rests on, read from the context when it was made (verify_mode,
        # check_hostname); `check_unchanged` compares them before each connect.
        self._checked = checked

    @property
    def verified(self) -> bool:
        """Whether the server's certificate is verified (verify-ca or verify-full)."""
        return self.mode in VERIFIED_MODES

    def asyncpg_ssl(self) -> ssl.SSLContext | str | bool:
        """Return the ``ssl`` argument for `asyncpg.connect`."""
        if self.context is not None:
            return self.context
        return False if self.mode == "disable" else self.mode

    def setting(self, name: str) -> TLSSetting | None:
        """Return the applied libpq parameter `name`, or None."""
        return next((s for s in self.settings if s.name == name), None)

    @property
    def rechecked(self) -> bool:
        """Whether each connect calls `check_unchanged` (a caller's context)."""
        return self._checked is not None

    def check_unchanged(self) -> None:
        """Raise `ConfigurationError` when the context's verify_mode or check_hostname changed
        since the decision (a caller's context is not copied: it could be changed later)."""
        context, checked = self.context, self._checked
        if checked is None or context is None:
            return
        # Runs on every connect: the C attribute's int, not the ssl module's property (which
        # makes a VerifyMode enum of it, three Python calls).
        if (
            super(ssl.SSLContext, context).verify_mode != checked[0]
            or context.check_hostname != checked[1]
        ):
            raise ConfigurationError(
                f"the ssl.SSLContext changed after the TLS decision (verify_mode "
                f"{checked[0].name} -> {context.verify_mode.name}, check_hostname "
                f"{checked[1]} -> {context.check_hostname}): no connect is made with it. "
                "Build a new context and pass it to set_connect_args(), or create a new pool"
            )


class _Setting:
    __slots__ = ("origin", "source", "value")

    def __init__(self, value: Any, source: str, origin: str = "") -> None:
        self.value = value
        self.source = source
        self.origin = origin
        """Where from: ``"argument"``, ``"dsn"``, ``"service"`` or ``"environment"``."""


def _mode_name(value: Any) -> str | None:
    """Return the sslmode name of an ssl argument value (str or asyncpg's SSLMode), or None."""
    name = getattr(value, "name", None) if not isinstance(value, str) else value
    if not isinstance(name, str):
        return None
    name = name.replace("_", "-").lower()
    return name if name in SSLMODES else None


def _context_mode(context: ssl.SSLContext) -> str:
    if context.verify_mode == ssl.CERT_NONE:
        return "require"
    return "verify-full" if context.check_hostname else "verify-ca"


def _service_settings(
    query: Mapping[str, str], kwargs: Mapping[str, Any], environ: Mapping[str, str]
) -> tuple[str | None, dict[str, str]]:
    """Return the pg_service.conf service named for this connection and its settings."""
    service = kwargs.get("service") or query.get("service") or environ.get("PGSERVICE")
    if not service:
        return None, {}
    path = kwargs.get("servicefile") or environ.get("PGSERVICEFILE")
    if path is None:
        path = os.path.join(os.path.expanduser("~"), ".pg_service.conf")
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read(path)
    except configparser.Error as exc:
        raise ConfigurationError(f"cannot read the service file {path}: {exc}") from exc
    if not parser.has_section(str(service)):
        return str(service), {}
    return str(service), dict(parser[str(service)])


def _first(*settings: _Setting | None) -> _Setting | None:
    return next((s for s in settings if s is not None and s.value not in (None, "")), None)


def _from(mapping: Mapping[str, Any], key: str, source: str, origin: str) -> _Setting | None:
    value = mapping.get(key)
    if value is None or value == "":
        return None
    shown = "<hidden>" if key in _SECRET else value
    return _Setting(value, source.format(key=key, value=shown), origin)


def decide_tls(
    *,
    ssl_arg: Any,
    dsn: DSN,
    kwargs: Mapping[str, Any],
    iam: bool,
    allow_unverified: bool = False,
    arguments: Mapping[str, Any] | None = None,
    environ: Mapping[str, str],
) -> TLSPolicy:
    """Decide, once, how logins are protected; raise `ConfigurationError` for a refused setting.

    `arguments` are libpq TLS parameters given as keyword arguments (`TLS_KEYWORDS`, e.g.
    ``sslrootcert=`` or ``--ca``): they outrank the DSN, the service and the environment.
    Every parameter of `TLS_PARAMETERS` found anywhere is applied or refused, naming it and
    its source. Without IAM the caller's choice is kept (asyncpg's ``prefer`` when there is
    none), only frozen.
    """
    query = dsn.query
    service, service_settings = _service_settings(query, kwargs, environ)
    sources = _Sources(
        dict(arguments or {}),
        query,
        service_settings,
        environ,
        f"{{key}}={{value}} in service {service!r}",
        f"{{key}}={{value}} in {dsn.name}",
    )
    mode_setting: _Setting | None
    caller_context: ssl.SSLContext | None
    if ssl_arg is not None:
        mode_setting, caller_context = _mode_from_argument(ssl_arg)
    else:
        mode_setting, caller_context = _mode_from_settings(sources), None
    found = {name: sources.find(name) for name in TLS_KEYWORDS}
    root = found["sslrootcert"]
    if mode_setting is None:
        # libpq 16+: sslrootcert=system makes verify-full the default.
        upgrade = iam or (root is not None and root.value == "system")
        mode_setting = _Setting("verify-full" if upgrade else "prefer", "the default")
    mode, mode_source = str(mode_setting.value), mode_setting.source

    if iam:
        _check_iam_mode(mode, mode_source, allow_unverified=allow_unverified)
    _check_sni(found["sslsni"])
    direct = _negotiation(found["sslnegotiation"])
    if caller_context is not None:
        _refuse_beside_context(found)
        checked = (caller_context.verify_mode, caller_context.check_hostname)
        return TLSPolicy(
            mode,
            mode_source,
            caller_context,
            None,
            "the caller's ssl.SSLContext",
            settings=_applied(found, ("sslsni", "sslnegotiation")),
            direct=direct,
            checked=checked,
        )
    if mode in PLAINTEXT_MODES and not iam:
        # asyncpg negotiates these modes itself, reading the DSN's, the service's and the
        # environment's settings; it takes none of them as a keyword.
        for setting in found.values():
            if setting is not None and setting.origin == "argument":
                raise ConfigurationError(
                    f"{setting.source} needs TLS that this library sets up: with sslmode "
                    f"{mode!r} ({mode_source}) asyncpg negotiates TLS itself and would not "
                    "apply it. Pass ssl='verify-full' (or 'require'), or put it in the DSN"
                )
        return TLSPolicy(mode, mode_source, None, None, "none", direct=direct)

    ca_file, ca_source = _ca_for(root, environ)
    if mode == "verify-ca" and ca_file is None:
        _refuse_public_verify_ca(mode_source, ca_source, iam=iam, explicit=root is not None)
    context = _build_context(mode, ca_file, ca_source)
    _apply_revocation(context, found["sslcrl"], found["sslcrldir"])
    _apply_protocols(context, found["ssl_min_protocol_version"], found["ssl_max_protocol_version"])
    cert_file, key_file = _load_client_cert(
        context, found["sslcert"], found["sslkey"], found["sslpassword"], found["sslcertmode"]
    )
    return TLSPolicy(
        mode,
        mode_source,
        context,
        ca_file,
        ca_source,
        cert_file,
        key_file,
        settings=_applied(found, tuple(TLS_KEYWORDS)),
        direct=direct,
        checked=(context.verify_mode, context.check_hostname),
    )


def _applied(
    found: Mapping[str, _Setting | None], names: tuple[str, ...]
) -> tuple[TLSSetting, ...]:
    return tuple(
        TLSSetting(name, str(setting.value), setting.source)
        for name in sorted(names)
        if (setting := found.get(name)) is not None
    )


class _Sources:
    """Where libpq settings come from, in libpq's order: keyword arguments, the DSN, the
    service, the environment."""

    __slots__ = ("arguments", "env", "in_dsn", "in_service", "query", "service")

    def __init__(
        self,
        arguments: Mapping[str, Any],
        query: Mapping[str, str],
        service: Mapping[str, str],
        env: Mapping[str, str],
        in_service: str,
        in_dsn: str = "{key}={value} in the DSN",
    ) -> None:
        self.arguments = arguments
        self.query = query
        self.service = service
        self.env = env
        self.in_service = in_service
        self.in_dsn = in_dsn

    def find(self, keyword: str) -> _Setting | None:
        """Return the first of the argument `keyword`, the DSN's, the service's, and its
        environment variable."""
        variable = TLS_PARAMETERS[keyword]
        return _first(
            _from(self.arguments, keyword, "{key}={value!r}", "argument"),
            _from(self.query, keyword, self.in_dsn, "dsn"),
            _from(self.service, keyword, self.in_service, "service"),
            _from(self.env, variable, "{key}={value} in the environment", "environment")
            if variable
            else None,
        )


def _refuse_beside_context(found: Mapping[str, _Setting | None]) -> None:
    """Refuse settings given for this connection that would have to change a caller's
    context (it is used as given). A service's and the environment's are outranked by the
    context, as libpq's explicit settings outrank them."""
    for name in _CONTEXT_PARAMETERS:
        setting = found.get(name)
        if setting is not None and setting.origin in ("argument", "dsn"):
            raise ConfigurationError(
                f"{setting.source} cannot be applied to the ssl.SSLContext passed as ssl= "
                f"(it is used as given, never changed): set {name} on the context yourself "
                "and drop it here, or pass ssl='verify-full' instead of a context"
                + _unset_hint(setting.source)
            )


def _check_sni(setting: _Setting | None) -> None:
    """Accept sslsni=1 (asyncpg always sends the server name); refuse anything else."""
    if setting is None or str(setting.value) == "1":
        return
    raise ConfigurationError(
        f"{setting.source} is not supported: asyncpg always sends the server name (SNI) in "
        "the TLS handshake. Drop it (or set it to 1)" + _unset_hint(setting.source)
    )


def _negotiation(setting: _Setting | None) -> bool:
    """Return whether TLS starts without PostgreSQL's SSLRequest (sslnegotiation=direct)."""
    if setting is None or str(setting.value) == "postgres":
        return False
    if str(setting.value) == "direct":
        return True
    raise ConfigurationError(
        f"{setting.source} is not an sslnegotiation: use 'postgres' or 'direct'"
        + _unset_hint(setting.source)
    )


def _refuse_public_verify_ca(
    mode_source: str, ca_source: str, *, iam: bool, explicit: bool
) -> None:
    """Refuse verify-ca against the system store, which trusts any public certificate."""
    if not (iam or explicit):
        return
    where = "" if mode_source == "the default" else f" (from {mode_source})"
    raise ConfigurationError(
        f"sslmode 'verify-ca'{where} with {ca_source} would accept any publicly trusted "
        "certificate for any name, so the server would not be verified (libpq 16+ refuses "
        "verify-ca with sslrootcert=system). Use 'verify-full', or 'verify-ca' with a "
        "private CA file: run `asyncpg-iam ca-bundle` for the RDS CA bundle, or pass "
        "sslrootcert='<PEM file>'" + _unset_hint(mode_source)
    )


def _apply_revocation(
    context: ssl.SSLContext, crl: _Setting | None, crl_dir: _Setting | None
) -> None:
    """Load certificate revocation lists and check the chain against them, as libpq does."""
    for setting, is_dir in ((crl, False), (crl_dir, True)):
        if setting is None:
            continue
        path = str(setting.value)
        exists = os.path.isdir(path) if is_dir else os.path.isfile(path)
        if not exists:
            kind = "directory" if is_dir else "file"
            raise ConfigurationError(
                f"the revocation list {kind} {path} ({setting.source}) does not exist: "
                "point it at a PEM CRL (a hashed directory for sslcrldir), or drop it"
                + _unset_hint(setting.source)
            )
        try:
            if is_dir:
                context.load_verify_locations(capath=path)
            else:
                context.load_verify_locations(cafile=path)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigurationError(
                f"cannot load the revocation list ({setting.source}): "
                f"{exc.__class__.__name__}: {exc}"
            ) from exc
        context.verify_flags |= ssl.VERIFY_CRL_CHECK_CHAIN


def _apply_protocols(
    context: ssl.SSLContext, lowest: _Setting | None, highest: _Setting | None
) -> None:
    """Set the lowest and highest TLS versions; never below libpq's default TLSv1.2 floor
    unless asked."""
    for setting, attribute in ((lowest, "minimum_version"), (highest, "maximum_version")):
        if setting is None:
            continue
        version = _PROTOCOLS.get(str(setting.value))
        if version is None:
            raise ConfigurationError(
                f"{setting.source} is not a TLS version: use one of {', '.join(_PROTOCOLS)}"
                + _unset_hint(setting.source)
            )
        try:
            setattr(context, attribute, version)
        except (ValueError, ssl.SSLError) as exc:
            raise ConfigurationError(
                f"{setting.source} cannot be used here ({exc}): use one of "
                f"{', '.join(_PROTOCOLS)}" + _unset_hint(setting.source)
            ) from exc
    if context.minimum_version > context.maximum_version != ssl.TLSVersion.MAXIMUM_SUPPORTED:
        raise ConfigurationError(
            "ssl_min_protocol_version is above ssl_max_protocol_version: no TLS version is left"
        )


def _mode_from_argument(ssl_arg: Any) -> tuple[_Setting, ssl.SSLContext | None]:
    """The sslmode the ``ssl=`` argument asks for, and the caller's context if it is one."""
    if isinstance(ssl_arg, ssl.SSLContext):
        return _Setting(_context_mode(ssl_arg), "ssl=<ssl.SSLContext>"), ssl_arg
    if ssl_arg is True:
        return _Setting("verify-full", "ssl=True"), None
    if ssl_arg is False:
        return _Setting("disable", "ssl=False"), None
    name = _mode_name(ssl_arg)
    if name is None:
        raise ConfigurationError(
            f"ssl={ssl_arg!r} is not an sslmode: pass one of {', '.join(SSLMODES)}, "
            "True, False or an ssl.SSLContext"
        )
    return _Setting(name, f"ssl={name!r}"), None


def _mode_from_settings(sources: _Sources) -> _Setting | None:
    """The sslmode the DSN, the service or PGSSLMODE names (None: none does)."""
    setting = sources.find("sslmode")
    if setting is None:
        return None
    name = _mode_name(str(setting.value))
    if name is None:
        raise ConfigurationError(
            f"{setting.source} is not an sslmode: use one of {', '.join(SSLMODES)}"
        )
    return _Setting(name, setting.source)


def _load_client_cert(
    context: ssl.SSLContext,
    cert: _Setting | None,
    key: _Setting | None,
    password: _Setting | None,
    certmode: _Setting | None,
) -> tuple[str | None, str | None]:
    """Load the client certificate (its key, the key's password) into `context`; return
    the files. ``sslcertmode=disable`` sends none; ``require`` is refused."""
    mode = "allow" if certmode is None else str(certmode.value)
    if certmode is not None and mode not in ("disable", "allow"):
        raise ConfigurationError(
            f"{certmode.source} is not supported: use 'allow' (the default: the certificate "
            "is sent when the server asks) or 'disable'" + _unset_hint(certmode.source)
        )
    if mode == "disable":
        return None, None
    if cert is None:
        for setting, what in ((key, "sslkey"), (password, "sslpassword")):
            if setting is not None:
                raise ConfigurationError(
                    f"{setting.source} without sslcert: {what} belongs to a client "
                    "certificate; pass sslcert=... too, or drop it" + _unset_hint(setting.source)
                )
        return None, None
    cert_file = str(cert.value)
    key_file = str(key.value) if key is not None else None
    secret = str(password.value) if password is not None else None
    try:
        context.load_cert_chain(cert_file, keyfile=key_file, password=secret)
    except (OSError, ssl.SSLError) as exc:
        # The message of a wrong key password never carries the password itself.
        raise ConfigurationError(
            f"cannot load the client certificate ({cert.source}): {exc.__class__.__name__}: {exc}"
        ) from None
    return cert_file, key_file


def _check_iam_mode(mode: str, source: str, *, allow_unverified: bool) -> None:
    where = "" if source == "the default" else f" (from {source})"
    if mode in PLAINTEXT_MODES:
        raise ConfigurationError(
            f"sslmode {mode!r}{where} could send the IAM token over an unencrypted connection, "
            "where anyone on the path could use it for 15 minutes. Use 'verify-full' (the "
            "default when nothing is set) or 'verify-ca', or an ssl.SSLContext that verifies "
            "the server" + _unset_hint(source)
        )
    if mode == "require" and not allow_unverified:
        raise ConfigurationError(
            f"sslmode 'require'{where} encrypts but does not verify the server's certificate: "
            "anyone in the path could present a certificate and receive the IAM token, valid "
            "for 15 minutes. Use 'verify-full' (the default when nothing is set), or for a "
            "CNAME, tunnel or IP address 'verify-ca' with the RDS CA bundle (never the system "
            "store) and IAMAuth(signing_host=...); run `asyncpg-iam ca-bundle` for the "
            "bundle. To accept the risk, pass "
            f"{UNVERIFIED_OPT_IN}" + _unset_hint(source)
        )


def _unset_hint(source: str) -> str:
    if "in the environment" in source:
        return f". {source.split('=')[0]} is read from the environment: unset it or change it"
    return ""


def _ca_for(root: _Setting | None, env: Mapping[str, str]) -> tuple[str | None, str]:
    """Return the CA file that verifies the server (None: the system store) and its source."""
    if root is not None:
        value = str(root.value)
        if value == "system":
            return None, f"the system store ({root.source})"
        if not os.path.isfile(value):
            raise ConfigurationError(
                f"the root certificate file {value} ({root.source}) does not exist: run "
                "`asyncpg-iam ca-bundle` for the RDS CA bundle, or point it at a PEM file"
            )
        return value, root.source
    bundle = ca_bundle_path()
    if bundle is None:
        return None, "the system store (no RDS bundle cached)"
    if env.get(CA_BUNDLE_ENV):
        return str(bundle), f"${CA_BUNDLE_ENV} {bundle}"
    return str(bundle), f"the cached RDS bundle {bundle}"


def _build_context(mode: str, ca_file: str | None, ca_source: str) -> ssl.SSLContext:
    try:
        context = ssl.create_default_context(cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigurationError(
            f"cannot load the CA bundle {ca_source} ({exc.__class__.__name__}: {exc}): run "
            "`asyncpg-iam ca-bundle`, pass sslrootcert=<PEM file>, or ssl=<ssl.SSLContext>"
        ) from exc
    if mode == "require":
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    else:
        context.verify_mode = ssl.CERT_REQUIRED
        context.check_hostname = mode == "verify-full"
    return context
