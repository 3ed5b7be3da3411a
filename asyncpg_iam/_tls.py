"""The TLS policy: where the RDS CA bundle lives, and the one decision of how to protect a login.

An IAM token is a bearer credential valid for 15 minutes: it may only travel over TLS to a
server whose certificate was verified. `decide_tls` reads every place a TLS setting can come
from, once (the ``ssl`` argument, the DSN's ``sslmode``/``sslrootcert``/``sslcert``/``sslkey``,
a ``pg_service.conf`` service, ``PGSSLMODE``, ``PGSSLROOTCERT``, ``PGSSLCERT``, ``PGSSLKEY``),
and returns a `TLSPolicy` holding an explicit `ssl.SSLContext`. Every connect then hands asyncpg
that context, so nothing in the environment can weaken TLS afterwards.

With IAM, ``verify-full`` (the default) and ``verify-ca`` are accepted; ``disable``, ``allow``
and ``prefer`` are refused (they can fall back to plaintext); ``require`` (and a context that
does not verify certificates) is refused unless the caller opts in with
``IAMAuth(insecure_unverified_tls=True)``, since it hands the token to anyone in the path.
"""

from __future__ import annotations

import configparser
import dataclasses
import os
import ssl
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ._dsn import DSN
from ._errors import ConfigurationError

__all__ = ["SSL_REQUEST", "TLSPolicy", "ca_bundle_path", "decide_tls", "default_ssl_context"]

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


@dataclasses.dataclass(frozen=True, slots=True)
class TLSPolicy:
    """How every login of one plan is protected, decided once.

    `mode` is a libpq sslmode name and `mode_source` says where it came from (``"the
    default"``, ``"PGSSLMODE=verify-ca in the environment"``, ...). `context` is the context
    every connect passes to asyncpg (None only without IAM, for the plaintext-capable modes,
    which asyncpg then negotiates itself). `ca_file` is the CA file that verifies the server
    (None: the system store, or a context the caller built), `ca_source` describes it.
    """

    mode: str
    mode_source: str
    context: ssl.SSLContext | None
    ca_file: str | None
    ca_source: str
    cert_file: str | None = None
    key_file: str | None = None

    @property
    def verified(self) -> bool:
        """Whether the server's certificate is verified (verify-ca or verify-full)."""
        return self.mode in VERIFIED_MODES

    def asyncpg_ssl(self) -> ssl.SSLContext | str | bool:
        """Return the ``ssl`` argument for `asyncpg.connect`."""
        if self.context is not None:
            return self.context
        return False if self.mode == "disable" else self.mode


@dataclasses.dataclass(frozen=True, slots=True)
class _Setting:
    value: Any
    source: str


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


def _from(mapping: Mapping[str, Any], key: str, source: str) -> _Setting | None:
    value = mapping.get(key)
    if value is None or value == "":
        return None
    return _Setting(value, source.format(key=key, value=value))


def decide_tls(
    *,
    ssl_arg: Any,
    dsn: DSN,
    kwargs: Mapping[str, Any],
    iam: bool,
    allow_unverified: bool = False,
    sslrootcert: str | None = None,
    environ: Mapping[str, str],
) -> TLSPolicy:
    """Decide, once, how logins are protected; raise `ConfigurationError` for a refused mode.

    `sslrootcert` (the ``sslrootcert=`` keyword, or ``--ca``) outranks every other root
    certificate setting. Without IAM the caller's choice is kept (asyncpg's ``prefer`` when
    there is none), only frozen.
    """
    query = dsn.query
    service, service_settings = _service_settings(query, kwargs, environ)
    sources = _Sources(
        query, service_settings, environ, f"{{key}}={{value}} in service {service!r}"
    )
    mode_setting: _Setting | None
    caller_context: ssl.SSLContext | None
    if ssl_arg is not None:
        mode_setting, caller_context = _mode_from_argument(ssl_arg)
    else:
        mode_setting, caller_context = _mode_from_settings(sources), None
    if mode_setting is None:
        mode_setting = _Setting("verify-full" if iam else "prefer", "the default")
    mode, mode_source = str(mode_setting.value), mode_setting.source

    if iam:
        _check_iam_mode(mode, mode_source, allow_unverified=allow_unverified)
    if caller_context is not None:
        return TLSPolicy(mode, mode_source, caller_context, None, "the caller's ssl.SSLContext")
    if mode in PLAINTEXT_MODES:
        return TLSPolicy(mode, mode_source, None, None, "none")

    root = _first(
        _Setting(sslrootcert, f"sslrootcert={sslrootcert}") if sslrootcert else None,
        sources.find("sslrootcert", "PGSSLROOTCERT"),
    )
    ca_file, ca_source = _ca_for(root, environ)
    context = _build_context(mode, ca_file, ca_source)
    cert_file, key_file = _load_client_cert(
        context, sources.find("sslcert", "PGSSLCERT"), sources.find("sslkey", "PGSSLKEY")
    )
    return TLSPolicy(mode, mode_source, context, ca_file, ca_source, cert_file, key_file)


@dataclasses.dataclass(frozen=True, slots=True)
class _Sources:
    """Where libpq settings come from, in libpq's order: the DSN, the service, the environment."""

    query: Mapping[str, str]
    service: Mapping[str, str]
    env: Mapping[str, str]
    in_service: str

    def find(self, keyword: str, variable: str) -> _Setting | None:
        """Return the first of the DSN's `keyword`, the service's, and `variable`."""
        return _first(
            _from(self.query, keyword, "{key}={value} in the DSN"),
            _from(self.service, keyword, self.in_service),
            _from(self.env, variable, "{key}={value} in the environment"),
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
    setting = sources.find("sslmode", "PGSSLMODE")
    if setting is None:
        return None
    name = _mode_name(str(setting.value))
    if name is None:
        raise ConfigurationError(
            f"{setting.source} is not an sslmode: use one of {', '.join(SSLMODES)}"
        )
    return _Setting(name, setting.source)


def _load_client_cert(
    context: ssl.SSLContext, cert: _Setting | None, key: _Setting | None
) -> tuple[str | None, str | None]:
    """Load the client certificate (and key) into `context`; return their files."""
    if cert is None:
        return None, None
    cert_file = str(cert.value)
    key_file = str(key.value) if key is not None else None
    try:
        context.load_cert_chain(cert_file, keyfile=key_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigurationError(
            f"cannot load the client certificate ({cert.source}): {exc.__class__.__name__}: {exc}"
        ) from exc
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
            "for 15 minutes. Use 'verify-full' (the default when nothing is set), or "
            "'verify-ca' with IAMAuth(signing_host=...) for a CNAME, tunnel or IP address; "
            f"run `asyncpg-iam ca-bundle` for the RDS CA bundle. To accept the risk, pass "
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
