"""A throwaway PostgreSQL server from the local binaries, and the description of a test backend.

`PostgresCluster` runs `initdb` and `pg_ctl` in a temporary directory: a free loopback port,
`fsync=off`, TLS on with a `trustme` certificate, trust authentication. With `standby_of` it is
a streaming standby cloned from another cluster with `pg_basebackup -R` instead; `promote()`,
`stop_server()` and `start_server()` let a test play a failover. As root it runs the
server as the `postgres` user (PostgreSQL refuses root). Everything is stopped and removed on
`stop()`, on leaving the `with` block (also when a test fails), at interpreter exit and on
SIGTERM (best effort).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pwd
import re
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any
from urllib.parse import quote

__all__ = ["PostgresCluster", "PostgresNotFoundError", "PostgresServer", "find_postgres_bin"]

_INSTALL_HINT = "install the PostgreSQL server binaries: apt-get install -y postgresql"


class PostgresNotFoundError(RuntimeError):
    """No PostgreSQL server binaries (initdb, pg_ctl) were found."""


@dataclass(frozen=True, slots=True)
class PostgresServer:
    """A PostgreSQL server the tests can use: where it is and how to log in.

    `kind` names the backend that provides it (``"local"``, ``"dsn"``, ``"container"``).
    The server must accept plain TCP logins of `user` (trust, or `password`).
    """

    host: str
    port: int
    user: str
    database: str
    kind: str
    password: str | None = None
    ca_path: str | None = None

    @property
    def dsn(self) -> str:
        """A libpq-style URL for it (with the password, if any)."""
        auth = quote(self.user, safe="")
        if self.password is not None:
            auth += ":" + quote(self.password, safe="")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"postgresql://{auth}@{host}:{self.port}/{quote(self.database, safe='')}"

    def __repr__(self) -> str:
        password = ", password=***" if self.password is not None else ""
        return (
            f"PostgresServer(kind={self.kind!r}, host={self.host!r}, port={self.port}, "
            f"user={self.user!r}, database={self.database!r}{password})"
        )


def _version_key(path: Path) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", path.parent.name) or ["0"])


def find_postgres_bin(*, search_root: str | os.PathLike[str] = "/usr/lib/postgresql") -> Path:
    """Return the directory of `initdb` and `pg_ctl`: PATH first, else the newest under
    `search_root` (Debian's ``/usr/lib/postgresql/NN/bin``)."""
    found = shutil.which("initdb")
    if found is not None:
        directory = Path(found).resolve().parent
        if (directory / "pg_ctl").exists():
            return directory
    candidates = sorted(
        (path for path in Path(search_root).glob("*/bin/initdb") if path.is_file()),
        key=_version_key,
    )
    if candidates:
        return candidates[-1].parent
    raise PostgresNotFoundError(f"no initdb on PATH or in {search_root}/*/bin: {_INSTALL_HINT}")


def postmaster_pid(data_dir: Path) -> int:
    """The process id of the postmaster running on `data_dir` (from its ``postmaster.pid``)."""
    return int((data_dir / "postmaster.pid").read_text().splitlines()[0])


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


_live: set[PostgresCluster] = set()
_live_lock = threading.Lock()
_previous_sigterm: Any = None
_hooks_installed = False


def _stop_all() -> None:
    with _live_lock:
        clusters = list(_live)
    for cluster in clusters:
        with contextlib.suppress(Exception):
            cluster.stop()


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    _stop_all()
    previous = _previous_sigterm
    if callable(previous):
        previous(signum, frame)
        return
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)


def _install_exit_hooks() -> None:
    global _hooks_installed, _previous_sigterm
    if _hooks_installed:
        return
    _hooks_installed = True
    atexit.register(_stop_all)
    if threading.current_thread() is threading.main_thread():
        with contextlib.suppress(ValueError, OSError):
            previous = signal.getsignal(signal.SIGTERM)
            if previous in (signal.SIG_DFL, None) or callable(previous):
                _previous_sigterm = previous
                signal.signal(signal.SIGTERM, _on_sigterm)


class PostgresCluster:
    """A throwaway PostgreSQL server with TLS, on a free loopback port.

    Use it as a context manager, or call `start()` and `stop()`. `bin_dir` defaults to
    `find_postgres_bin()`. Connections over TCP from loopback are trusted; TLS is offered
    (`client_ssl_context()` trusts its CA) but not required. With `standby_of` (a running
    cluster) it starts as a hot standby streaming from that one, with the same user and database.
    """

    def __init__(
        self,
        *,
        bin_dir: str | os.PathLike[str] | None = None,
        host: str = "127.0.0.1",
        user: str = "postgres",
        database: str = "postgres",
        settings: dict[str, str] | None = None,
        start_timeout: float = 60.0,
        standby_of: PostgresCluster | None = None,
    ) -> None:
        if standby_of is not None and not standby_of.running:
            raise RuntimeError("standby_of must be a running PostgresCluster")
        self._standby_of = standby_of
        if standby_of is not None:
            user, database = standby_of.user, standby_of.database
        self._bin_dir = Path(bin_dir) if bin_dir is not None else None
        self._host = host
        self._user = user
        self._database = database
        self._settings = dict(settings or {})
        self._start_timeout = start_timeout
        self._port: int | None = None
        self._tmp: Path | None = None
        self._running = False
        self._ca_pem: str | None = None
        self._lock = threading.Lock()

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> PostgresCluster:
        """Create the cluster and start the server; return self."""
        with self._lock:
            if self._tmp is not None:
                raise RuntimeError("the cluster is already started")
            bin_dir = self._bin_dir or find_postgres_bin()
            self._tmp = Path(tempfile.mkdtemp(prefix="asyncpg-iam-pg-"))
            with _live_lock:
                _live.add(self)
            _install_exit_hooks()
        try:
            self._create(bin_dir)
            self._launch(bin_dir)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop the server (immediately) and remove its directory; safe to call twice."""
        with self._lock:
            tmp, self._tmp = self._tmp, None
            running, self._running = self._running, False
            self._port = None
        if tmp is None:
            return
        try:
            data = tmp / "data"
            if running:
                bin_dir = self._bin_dir or find_postgres_bin()
                result = self._run(
                    [str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
                    check=False,
                )
                if result.returncode != 0:
                    self._kill_postmaster(data)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            with _live_lock:
                _live.discard(self)

    def promote(self, *, timeout: float = 60.0) -> None:
        """Promote this standby to a primary (``pg_ctl promote``); wait until it takes writes."""
        bin_dir = self._bin_dir or find_postgres_bin()
        self._run(
            [
                str(bin_dir / "pg_ctl"),
                "-D",
                str(self.data_dir),
                "-w",
                "-t",
                str(int(timeout)),
                "promote",
            ]
        )

    def stop_server(self, *, mode: str = "immediate") -> None:
        """Stop the server, keeping its data (``pg_ctl stop -m mode``); see `start_server()`.

        ``immediate`` is a crash: every backend is ended at once, as when a host goes away.
        """
        if mode not in ("smart", "fast", "immediate"):
            raise ValueError(f"mode must be 'smart', 'fast' or 'immediate', not {mode!r}")
        with self._lock:
            if not self._running:
                return
            self._running = False
        bin_dir = self._bin_dir or find_postgres_bin()
        result = self._run(
            [str(bin_dir / "pg_ctl"), "-D", str(self.data_dir), "-m", mode, "-w", "stop"],
            check=False,
        )
        if result.returncode != 0:
            self._kill_postmaster(self.data_dir)

    def start_server(self, *, settings: dict[str, str] | None = None) -> None:
        """Start a server stopped with `stop_server()` on the same port, with extra `settings`.

        ``settings={"default_transaction_read_only": "on"}`` brings it back read-only, as an
        Aurora writer comes back as a reader after a failover.
        """
        if self._running:
            raise RuntimeError("the server is already running")
        bin_dir = self._bin_dir or find_postgres_bin()
        self._launch(bin_dir, settings=settings, retry_port=False)

    def __enter__(self) -> PostgresCluster:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"{self._host}:{self._port}" if self._running else "stopped"
        return f"PostgresCluster({state})"

    # -- where it is --------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """Whether the server is up."""
        return self._running

    @property
    def host(self) -> str:
        """The loopback address it listens on."""
        return self._host

    @property
    def port(self) -> int:
        """Its port (known once started)."""
        if self._port is None:
            raise RuntimeError("the cluster is not started: call start() first")
        return self._port

    @property
    def user(self) -> str:
        """The superuser created by initdb."""
        return self._user

    @property
    def database(self) -> str:
        """The database to connect to."""
        return self._database

    @property
    def dsn(self) -> str:
        """A libpq-style URL for it."""
        return self.server.dsn

    @property
    def server(self) -> PostgresServer:
        """Describe it as a test backend."""
        return PostgresServer(
            host=self._host,
            port=self.port,
            user=self._user,
            database=self._database,
            kind="local",
            ca_path=self.ca_path,
        )

    @property
    def data_dir(self) -> Path:
        """Its data directory."""
        if self._tmp is None:
            raise RuntimeError("the cluster is not started: call start() first")
        return self._tmp / "data"

    @property
    def ca_pem(self) -> str:
        """The PEM of the CA that signed its server certificate."""
        if self._ca_pem is None:
            raise RuntimeError("the cluster is not started: call start() first")
        return self._ca_pem

    @property
    def ca_path(self) -> str:
        """A PEM file of the CA that signed its server certificate."""
        if self._tmp is None:
            raise RuntimeError("the cluster is not started: call start() first")
        return str(self._tmp / "tls" / "ca.pem")

    def client_ssl_context(self) -> ssl.SSLContext:
        """Return a client context that trusts its CA and checks the host name."""
        return ssl.create_default_context(cadata=self.ca_pem)

    # -- internals ----------------------------------------------------------------------------

    def _as_postgres(self) -> bool:
        return os.geteuid() == 0

    def _run(self, argv: list[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
        program = Path(argv[0]).name
        if self._as_postgres():
            argv = ["runuser", "-u", "postgres", "--", *argv]
        result = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=self._start_timeout,
            check=False,
            cwd="/",
        )
        if check and result.returncode != 0:
            raise RuntimeError(
                f"{program} failed (exit {result.returncode}): "
                f"{(result.stderr or result.stdout).strip()[-2000:]}"
            )
        return result

    def _create(self, bin_dir: Path) -> None:
        assert self._tmp is not None
        owner = self._server_owner()
        tls = self._tmp / "tls"
        tls.mkdir()
        tls_files = self._write_tls(tls)
        (self._tmp / "sock").mkdir()
        if owner is not None:
            for path in (self._tmp, tls, *tls_files, self._tmp / "sock"):
                os.chown(path, *owner)
        self._tmp.chmod(0o755)  # readable by clients for ca.pem; data dir itself stays 0700
        if self._standby_of is not None:
            self._clone(bin_dir)
        else:
            self._initdb(bin_dir)
        self._port = _free_port(self._host)
        self._write_conf(tls)

    def _server_owner(self) -> tuple[int, int] | None:
        """Return the uid and gid the server runs as when we are root, else None."""
        if not self._as_postgres():
            return None
        try:
            entry = pwd.getpwnam("postgres")
        except KeyError:
            raise PostgresNotFoundError(
                "running as root needs a 'postgres' user to run the server: " + _INSTALL_HINT
            ) from None
        return (entry.pw_uid, entry.pw_gid)

    def _write_tls(self, tls: Path) -> tuple[Path, Path, Path]:
        """Write a fresh CA and a server certificate and key for loopback into `tls`."""
        import trustme

        ca = trustme.CA()
        cert = ca.issue_cert("127.0.0.1", "localhost", "::1")
        self._ca_pem = ca.cert_pem.bytes().decode("ascii")
        (tls / "ca.pem").write_text(self._ca_pem)
        cert.cert_chain_pems[0].write_to_path(str(tls / "server.crt"))
        key_path = tls / "server.key"
        cert.private_key_pem.write_to_path(str(key_path))
        key_path.chmod(0o600)
        return tls / "ca.pem", tls / "server.crt", key_path

    def _write_conf(self, tls: Path) -> None:
        assert self._tmp is not None
        settings = {
            "listen_addresses": f"'{self._host}'",
            "port": str(self._port),
            "unix_socket_directories": f"'{self._tmp / 'sock'}'",
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "ssl": "on",
            "ssl_cert_file": f"'{tls / 'server.crt'}'",
            "ssl_key_file": f"'{tls / 'server.key'}'",
            "ssl_ca_file": f"'{tls / 'ca.pem'}'",
            "max_connections": "300",
            "shared_buffers": "32MB",
            "logging_collector": "off",
        }
        settings.update(self._settings)
        conf = "".join(f"{name} = {value}\n" for name, value in settings.items())
        with open(self._tmp / "data" / "postgresql.conf", "a") as file:
            file.write("\n# asyncpg-iam PostgresCluster\n" + conf)

    def _initdb(self, bin_dir: Path) -> None:
        assert self._tmp is not None
        self._run(
            [
                str(bin_dir / "initdb"),
                "-D",
                str(self._tmp / "data"),
                "-U",
                self._user,
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ]
        )

    def _clone(self, bin_dir: Path) -> None:
        """Copy the primary with ``pg_basebackup -R``: a standby that streams from it."""
        assert self._tmp is not None
        assert self._standby_of is not None
        primary = self._standby_of
        self._run(
            [
                str(bin_dir / "pg_basebackup"),
                "-D",
                str(self._tmp / "data"),
                "-h",
                primary.host,
                "-p",
                str(primary.port),
                "-U",
                primary.user,
                "-X",
                "stream",
                "-R",
                "--no-sync",
                "-c",
                "fast",
            ]
        )

    def _launch(
        self, bin_dir: Path, *, settings: dict[str, str] | None = None, retry_port: bool = True
    ) -> None:
        assert self._tmp is not None
        log = self._tmp / "postgres.log"
        if self._as_postgres():
            log.touch()
            entry = pwd.getpwnam("postgres")
            os.chown(log, entry.pw_uid, entry.pw_gid)
        # The port was free a moment ago; retry on a fresh one if someone took it meanwhile.
        for attempt in range(3):
            result = self._pg_ctl_start(bin_dir, log, settings)
            if result.returncode == 0:
                self._running = True
                break
            text = log.read_text(errors="replace") if log.exists() else ""
            if "could not bind" in text and attempt < 2 and retry_port:
                self._port = _free_port(self._host)
                continue
            raise RuntimeError(
                f"pg_ctl start failed (exit {result.returncode}): "
                f"{(result.stderr or result.stdout).strip()[-1000:]}\n{text[-2000:]}"
            )
        if self._database != "postgres" and retry_port and self._standby_of is None:
            self._run(
                [
                    str(bin_dir / "createdb"),
                    "-h",
                    self._host,
                    "-p",
                    str(self._port),
                    "-U",
                    self._user,
                    self._database,
                ]
            )

    def _pg_ctl_start(
        self, bin_dir: Path, log: Path, settings: dict[str, str] | None
    ) -> subprocess.CompletedProcess[str]:
        assert self._tmp is not None
        options = f"-p {self._port}" + "".join(
            f" -c {name}={value}" for name, value in (settings or {}).items()
        )
        return self._run(
            [
                str(bin_dir / "pg_ctl"),
                "-D",
                str(self._tmp / "data"),
                "-l",
                str(log),
                "-w",
                "-t",
                str(int(self._start_timeout)),
                "-o",
                options,
                "start",
            ],
            check=False,
        )

    def _kill_postmaster(self, data: Path) -> None:
        with contextlib.suppress(OSError, ValueError, IndexError):
            pid = postmaster_pid(data)
            os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    return
                time.sleep(0.05)
