"""Local AWS endpoints for tests: a container-credentials server and moto's STS in server mode.

`CredentialServer` speaks the protocol the default credential chain uses through
``AWS_CONTAINER_CREDENTIALS_FULL_URI``: a GET returns JSON with AccessKeyId, SecretAccessKey,
Token and Expiration. It issues random credentials that rotate on a schedule, tells every
registered emulator about each key it issues, counts requests, and has fault switches. It runs
in a thread so that aiobotocore in the test's event loop can reach it.

`MotoSTS` runs moto's ``ThreadedMotoServer`` on a free loopback port for AssumeRole and
GetCallerIdentity, with a switch that turns moto's IAM authorization on (moto then checks
signatures and policies, so AssumeRole can be denied for real).
"""

from __future__ import annotations

import datetime as dt
import http.server
import json
import secrets
import socket
import threading
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from .._clock import SYSTEM_CLOCK, Clock

if TYPE_CHECKING:
    from ._emulator import AccessKey

__all__ = ["AWS_CREDENTIAL_VARIABLES", "CredentialServer", "KeyRegistry", "MotoSTS"]


#: Variables through which the default chain could find credentials other than the ones served
#: here, and the proxies that could capture requests to the local endpoints.
AWS_CREDENTIAL_VARIABLES = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_ROLE_ARN",
    "AWS_ROLE_SESSION_NAME",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "http_proxy",
    "https_proxy",
)


class KeyRegistry(Protocol):
    """Anything that verifies signatures and so must learn about issued keys (an emulator)."""

    def register_key(self, access_key: str, secret_key: str, session_token: str | None) -> None:
        """Accept `access_key` with `secret_key` (and `session_token`, when given) from now on."""
        ...


IssueCallback = Callable[[str, str, "str | None"], None]


@dataclass(frozen=True, slots=True)
class _IssuedKey:
    """One key the server issued, and when (by the clock's monotonic time)."""

    access_key: str
    secret_key: str = field(repr=False)
    token: str = field(repr=False)
    expiry: dt.datetime
    issued_at: float

    @classmethod
    def new(cls, *, now: dt.datetime, monotonic: float, lifetime: float) -> _IssuedKey:
        """Make random credentials that live `lifetime` seconds from `now`."""
        # Expiration has whole seconds: round up, so a key never expires before its
        # lifetime is over (and the next key is out when half of it is).
        expiry = now + dt.timedelta(seconds=lifetime)
        if expiry.microsecond:
            expiry = expiry.replace(microsecond=0) + dt.timedelta(seconds=1)
        return cls(
            access_key="ASIA" + secrets.token_hex(8).upper(),
            secret_key=secrets.token_urlsafe(30),
            token=secrets.token_urlsafe(96),
            expiry=expiry,
            issued_at=monotonic,
        )

    def announce(self, listeners: list[IssueCallback]) -> None:
        """Tell each listener about this key."""
        for listener in listeners:
            listener(self.access_key, self.secret_key, self.token)


class _HttpThread:
    """An HTTP server on a free port of 127.0.0.1, serving GETs from a thread."""

    def __init__(self, on_get: Callable[[http.server.BaseHTTPRequestHandler], None]) -> None:
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                on_get(self)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._handler = Handler
        self.httpd: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self, name: str) -> None:
        """Start serving in a daemon thread called `name`."""
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler)
        self.httpd.daemon_threads = True
        self._thread = threading.Thread(target=self.httpd.serve_forever, name=name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and wait (up to 5 s) for the thread."""
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)


class CredentialServer:
    """A container-credentials endpoint on 127.0.0.1 that issues rotating credentials.

    A key is issued with `lifetime` seconds to live and served until `rotate_every` seconds
    later (default: half the lifetime, as ECS and EC2 make new credentials available well before
    the old ones expire). Use as a context manager, or call `start()` and `stop()`.

    Fault switches, settable at any time: `fail_status` (answer with that HTTP status),
    `drop` (close the connection without answering), `hang` (hold requests until cleared or
    the server stops), `delay` (seconds to wait before answering).
    """

    def __init__(
        self,
        *,
        lifetime: float = 3600.0,
        rotate_every: float | None = None,
        clock: Clock = SYSTEM_CLOCK,
        emulators: list[KeyRegistry] | None = None,
        on_issue: IssueCallback | None = None,
        path: str = "/creds",
        expired: bool = False,
    ) -> None:
        if lifetime <= 0:
            raise ValueError("lifetime must be > 0 seconds")
        self.lifetime = lifetime
        self.rotate_every = lifetime / 2 if rotate_every is None else rotate_every
        self.clock = clock
        self.path = path
        self.requests = 0
        self.issued: list[str] = []
        self.fail_status: int | None = None
        self.drop = False
        self.delay = 0.0
        #: Serve credentials that already expired (an endpoint with a broken clock).
        self.expired = expired
        self._hang = threading.Event()
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._listeners: list[IssueCallback] = []
        self._current: _IssuedKey | None = None
        for emulator in emulators or ():
            self.add_emulator(emulator)
        if on_issue is not None:
            self._listeners.append(on_issue)
        self._http = _HttpThread(self._handle)

    # -- configuration -------------------------------------------------------------------

    def add_emulator(self, emulator: KeyRegistry) -> None:
        """Register every key issued from now on (and the current one) with `emulator`."""
        self.add_listener(emulator.register_key)

    def add_listener(self, callback: IssueCallback) -> None:
        """Call `callback(access_key, secret_key, token)` for the current and each new key."""
        with self._lock:
            self._listeners.append(callback)
            current = self._current
        if current is not None:
            current.announce([callback])

    @property
    def hang(self) -> bool:
        """Whether requests are held without an answer."""
        return self._hang.is_set()

    @hang.setter
    def hang(self, value: bool) -> None:
        if value:
            self._hang.set()
        else:
            self._hang.clear()

    @property
    def url(self) -> str:
        """The full URI to put in AWS_CONTAINER_CREDENTIALS_FULL_URI."""
        if self._http.httpd is None:
            raise RuntimeError("CredentialServer is not started")
        return f"http://127.0.0.1:{self._http.httpd.server_address[1]}{self.path}"

    def env(self) -> dict[str, str]:
        """Return the environment variables that point the default chain at this server."""
        return {"AWS_CONTAINER_CREDENTIALS_FULL_URI": self.url}

    # -- issuing -------------------------------------------------------------------------

    def current_credentials(self) -> dict[str, str]:
        """Return the credentials a request would get now (issuing new ones when due)."""
        now = self.clock.now()
        mono = self.clock.monotonic()
        with self._lock:
            current = self._current
            listeners = []
            if current is None or mono - current.issued_at >= self.rotate_every:
                current = _IssuedKey.new(now=now, monotonic=mono, lifetime=self.lifetime)
                self._current = current
                self.issued.append(current.access_key)
                listeners = list(self._listeners)
        current.announce(listeners)
        expiry = now - dt.timedelta(seconds=60) if self.expired else current.expiry
        return {
            "AccessKeyId": current.access_key,
            "SecretAccessKey": current.secret_key,
            "Token": current.token,
            "Expiration": expiry.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        }

    # -- serving -------------------------------------------------------------------------

    def start(self) -> CredentialServer:
        """Start serving on a free port of 127.0.0.1."""
        self._stopping.clear()
        self._http.start("CredentialServer")
        return self

    def stop(self) -> None:
        """Stop serving; later requests are refused."""
        self._stopping.set()
        self._http.stop()

    def __enter__(self) -> CredentialServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _handle(self, request: http.server.BaseHTTPRequestHandler) -> None:
        with self._lock:
            self.requests += 1
        while self._hang.is_set() and not self._stopping.is_set():
            self._stopping.wait(0.05)
        if self.delay > 0:
            self._stopping.wait(self.delay)
        if self.drop:
            request.close_connection = True
            request.connection.shutdown(socket.SHUT_RDWR)
            return
        if request.path.split("?")[0] != self.path:
            self._reply(request, 404, {"message": "not found"})
        elif self.fail_status is not None:
            self._reply(request, self.fail_status, {"message": "injected failure"})
        else:
            self._reply(request, 200, self.current_credentials())

    @staticmethod
    def _reply(request: http.server.BaseHTTPRequestHandler, status: int, body: object) -> None:
        data = json.dumps(body).encode()
        request.send_response(status)
        request.send_header("Content-Type", "application/json")
        request.send_header("Content-Length", str(len(data)))
        request.end_headers()
        request.wfile.write(data)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class MotoSTS:
    """moto's server (STS, IAM and the rest) on a free loopback port, in a thread."""

    def __init__(self) -> None:
        self._server: Any = None
        self.port = 0

    @property
    def endpoint_url(self) -> str:
        """The URL to send STS (and IAM) requests to."""
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        """Return the variables that send aiobotocore's STS and IAM clients to this server."""
        return {
            "AWS_ENDPOINT_URL_STS": self.endpoint_url,
            "AWS_ENDPOINT_URL_IAM": self.endpoint_url,
        }

    def issued_key(self, access_key: str) -> AccessKey | None:
        """Return the assumed-role key moto's STS issued as `access_key`, if it did.

        Pass it to `RDSIAMEmulator.add_key_source` so that an emulator accepts tokens signed
        with roles assumed through this server (by another process too).
        """
        from moto.sts.models import sts_backends

        from ._emulator import AccessKey

        for backends in list(sts_backends.values()):
            for backend in list(backends.values()):
                role = backend.get_assumed_role_from_access_key(access_key)
                if role is not None:
                    return AccessKey(role.access_key_id, role.secret_access_key, role.session_token)
        return None

    def start(self) -> MotoSTS:
        """Start moto's ThreadedMotoServer."""
        from moto.server import ThreadedMotoServer

        self.port = _free_port()
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()
        return self

    def stop(self) -> None:
        """Stop the server."""
        if self._server is not None:
            self._server.stop()
            self._server = None

    def __enter__(self) -> MotoSTS:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _post(self, path: str, data: bytes = b"") -> bytes:
        # Loopback http only: the URL is built from our own port.
        req = urllib.request.Request(  # noqa: S310
            self.endpoint_url + path,
            data=data,
            method="POST",
            headers={"Content-Type": "text/plain"},  # a form body would hide the data from moto
        )
        with urllib.request.urlopen(req, timeout=10) as response:  # noqa: S310
            return bytes(response.read())

    def reset(self) -> None:
        """Forget every user, role and key moto knows."""
        self._post("/moto-api/reset")

    @contextmanager
    def authorization(self) -> Iterator[None]:
        """Within the block, moto verifies signatures and IAM policies of every request."""
        self._post("/moto-api/reset-auth", b"0")
        try:
            yield
        finally:
            self._post("/moto-api/reset-auth", b"inf")

    def _iam(self) -> Any:
        import botocore.session

        # Sent while authorization is off (moto's default), so any key signs these.
        return botocore.session.get_session().create_client(
            "iam",
            endpoint_url=self.endpoint_url,
            region_name="us-east-1",
            aws_access_key_id="AKIAMOTOBOOTSTRAP",
            aws_secret_access_key="bootstrap",
        )

    def create_user(self, name: str, policy: dict[str, Any] | None = None) -> tuple[str, str, str]:
        """Create an IAM user with an inline `policy`; return (user ARN, access key, secret)."""
        iam = self._iam()
        arn = iam.create_user(UserName=name)["User"]["Arn"]
        if policy is not None:
            iam.put_user_policy(
                UserName=name, PolicyName=f"{name}-policy", PolicyDocument=json.dumps(policy)
            )
        key = iam.create_access_key(UserName=name)["AccessKey"]
        return str(arn), str(key["AccessKeyId"]), str(key["SecretAccessKey"])

    def create_role(self, name: str, trusted: str = "*") -> str:
        """Create an IAM role that `trusted` (an AWS principal ARN or ``*``) may assume."""
        iam = self._iam()
        trust = {
            "Version": "2012-10-17",
            "Statement": [
                {"Effect": "Allow", "Principal": {"AWS": trusted}, "Action": "sts:AssumeRole"}
            ],
        }
        role = iam.create_role(RoleName=name, AssumeRolePolicyDocument=json.dumps(trust))
        return str(role["Role"]["Arn"])
