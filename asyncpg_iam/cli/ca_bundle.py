"""``asyncpg-iam ca-bundle``: download the RDS global CA bundle into the cache directory.

Every hop of the download is https (a redirect to anything else is refused, so the bundle
always comes from a server whose certificate was verified). What is downloaded must be PEM
certificates (and nothing else) that OpenSSL loads; it is written to a temporary file, read
back and checked again, and only then replaces the cached file, atomically, so a captive
portal or a proxy's error page can never become the trust store.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import re
import ssl
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from .._errors import CABundleError, ConfigurationError
from .._tls import CA_BUNDLE_FILENAME, cache_dir
from ._options import EXIT_OK, Commands, positive

__all__ = [
    "DEFAULT_CA_BUNDLE_URL",
    "CABundleError",
    "Downloaded",
    "download_ca_bundle",
    "register",
    "run",
]

DEFAULT_CA_BUNDLE_URL = "https://truststore.pki.rds.amazonaws.com/global/global-bundle.pem"
#: Environment variable naming another URL to download the bundle from.
CA_BUNDLE_URL_ENV = "ASYNCPG_IAM_CA_BUNDLE_URL"
# The global bundle is ~160 KB; anything far larger is not it.
_MAX_BYTES = 4 * 1024 * 1024
_PEM_BLOCK = re.compile(
    rb"-----BEGIN CERTIFICATE-----\r?\n[A-Za-z0-9+/=\r\n]+?-----END CERTIFICATE-----"
)


def register(commands: Commands) -> None:
    """Add the ``ca-bundle`` command."""
    parser = commands.add_parser(
        "ca-bundle",
        help="download the RDS global CA bundle and print its path",
        description="Download the RDS global CA bundle, check that it is PEM certificates, "
        "store it (atomically) and print its path. The pool and `asyncpg-iam psql` use the "
        "cached bundle by default.",
    )
    parser.add_argument("--output", help="where to store it (default: the cache directory)")
    parser.add_argument(
        "--url",
        default=None,
        help="where to download it from (default: $ASYNCPG_IAM_CA_BUNDLE_URL or the RDS "
        "global bundle)",
    )
    parser.add_argument(
        "--cafile",
        help="CA certificates to verify the download server with (default: the system store)",
    )
    parser.add_argument("--timeout", type=positive, default=30.0, help="seconds (default 30)")
    parser.set_defaults(run=run)


def validate_pem_bundle(data: bytes) -> int:
    """Return how many certificates `data` holds; raise CABundleError unless only PEM certs."""
    blocks = _PEM_BLOCK.findall(data)
    if not blocks:
        raise CABundleError("the download holds no PEM certificate (-----BEGIN CERTIFICATE-----)")
    rest = _PEM_BLOCK.sub(b"", data)
    if rest.strip():
        raise CABundleError("the download holds something besides PEM certificates")
    try:
        context = ssl.create_default_context(cadata=data.decode("ascii"))
    except (ssl.SSLError, UnicodeDecodeError, ValueError) as exc:
        raise CABundleError(f"the certificates in the download do not load: {exc}") from exc
    del context
    return len(blocks)


class _HttpsRedirectsOnly(urllib.request.HTTPRedirectHandler):
    """Follow a redirect only to another https:// URL."""

    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: Any,
        code: int,
        msg: str,
        headers: Any,
        newurl: str,
    ) -> urllib.request.Request | None:
        if not _is_https(newurl):
            raise CABundleError(
                f"{req.full_url} redirected (HTTP {code}) to {newurl!r}, which is not https: "
                "a CA bundle must come from a server whose certificate was verified, on every "
                "hop. Pass --url with the https address it should come from"
            )
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _is_https(url: str) -> bool:
    return urllib.parse.urlsplit(url).scheme.lower() == "https"


def _fetch(url: str, *, cafile: str | None, timeout: float) -> tuple[bytes, str]:
    """Return the body at `url` and the https URL it finally came from."""
    if not _is_https(url):
        raise ConfigurationError(f"the CA bundle URL must be https://, not {url!r}")
    try:
        context = ssl.create_default_context(cafile=cafile)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigurationError(f"cannot load --cafile {cafile}: {exc}") from exc
    opener = urllib.request.build_opener(
        urllib.request.HTTPSHandler(context=context), _HttpsRedirectsOnly()
    )
    request = urllib.request.Request(url, headers={"User-Agent": "asyncpg-iam"})  # noqa: S310
    try:
        with opener.open(request, timeout=timeout) as response:
            final = str(response.geturl())
            data = response.read(_MAX_BYTES + 1)
    except urllib.error.HTTPError as exc:
        raise CABundleError(f"downloading {url} failed: HTTP {exc.code} {exc.reason}") from exc
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise CABundleError(
            f"downloading {url} failed: {reason}. Behind a proxy, set HTTPS_PROXY; to trust a "
            "TLS-inspecting proxy pass --cafile"
        ) from exc
    if not _is_https(final):
        raise CABundleError(f"the download from {url} ended at {final!r}, which is not https")
    if len(data) > _MAX_BYTES:
        raise CABundleError(f"the download from {url} is larger than {_MAX_BYTES} bytes")
    return bytes(data), final


@dataclasses.dataclass(frozen=True, slots=True)
class Downloaded:
    """What `download_ca_bundle` stored: how many certificates, from which https URL."""

    count: int
    url: str


def download_ca_bundle(
    output: Path, *, url: str, cafile: str | None = None, timeout: float = 30.0
) -> Downloaded:
    """Download the bundle at `url` to `output` (replaced only if what was stored is valid)."""
    data, final = _fetch(url, cafile=cafile, timeout=timeout)
    count = validate_pem_bundle(data)
    output.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".ca-bundle-", suffix=".pem", dir=output.parent)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
        os.chmod(tmp, 0o644)
        # Check what is stored, not what was meant to be: only it replaces the old bundle.
        stored = Path(tmp).read_bytes()
        if stored != data or validate_pem_bundle(stored) != count:
            raise CABundleError(f"the bundle written to {tmp} does not read back as downloaded")
        os.replace(tmp, output)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return Downloaded(count, final)


def run(args: argparse.Namespace) -> int:
    """Run ``asyncpg-iam ca-bundle``."""
    url = args.url or os.environ.get(CA_BUNDLE_URL_ENV) or DEFAULT_CA_BUNDLE_URL
    output = Path(args.output) if args.output else cache_dir() / CA_BUNDLE_FILENAME
    stored = download_ca_bundle(output, url=url, cafile=args.cafile, timeout=args.timeout)
    sys.stderr.write(f"{stored.count} certificates from {stored.url}\n")
    sys.stdout.write(f"{output.resolve()}\n")
    return EXIT_OK
