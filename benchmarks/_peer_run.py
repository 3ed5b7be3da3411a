"""The failover case's DNS-lag scenario with AWS's Python wrapper, when it is installed.

The wrapper (``aws-advanced-python-wrapper``, async psycopg, plugins ``failover_v2,iam``) runs
in its own process (``ASYNCPG_IAM_PEER_PYTHON``; by default this interpreter when it has the
wrapper, as the ``bench`` extra installs it, else ``.peer-venv/bin/python`` at the project
root), as `_peer_wrapper.py`. It resolves names with the OS
resolver, and reaches each instance it finds in the topology at port 5432, so the run gives
every instance a forwarder of its own on a loopback address (``127.a.b.<n>``) at 5432 and
starts the wrapper in
a mount namespace of its own (``unshare --mount``, root) where a private ``/etc/hosts`` maps
the cluster's names to those loopback addresses: the machine's ``/etc/hosts`` is not touched,
and no traffic leaves loopback.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import importlib.util
import json
import os
import secrets
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from asyncpg_iam import Credentials
from asyncpg_iam.testing import AuroraCluster
from asyncpg_iam.testing._admin import admin
from asyncpg_iam.testing._failover import ClusterEndpoint

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = Path(__file__).resolve().parent / "_peer_wrapper.py"


def peer_python() -> Path | None:
    """An interpreter that has the wrapper (see the module doc); None if there is none."""
    chosen = os.environ.get("ASYNCPG_IAM_PEER_PYTHON")
    if chosen is None and importlib.util.find_spec("aws_advanced_python_wrapper") is not None:
        chosen = sys.executable
    python = Path(chosen or ROOT / ".peer-venv/bin/python")
    if not python.exists():
        return None
    site = python.parent.parent / "lib"
    if not any(site.glob("python3*/site-packages/aws_advanced_python_wrapper")):
        return None
    return python


def peer_version(python: Path) -> str:
    """The installed wrapper's version (from its distribution metadata)."""
    site = python.parent.parent / "lib"
    for info in site.glob("python3*/site-packages/aws_advanced_python_wrapper-*.dist-info"):
        return info.name.removesuffix(".dist-info").rsplit("-", 1)[1]
    return "unknown"


async def aurora_peer(
    python: Path, *, lag: float, warmup: float, writers: int, pool: int, credentials: Credentials
) -> dict[str, Any]:
    """One failover with a DNS lag of `lag` s under the wrapper's writers; what they saw."""
    if shutil.which("unshare") is None or os.geteuid() != 0:
        return {"kind": "peer", "skipped": "needs root and unshare (a private /etc/hosts)"}
    async with AuroraCluster(replicas=1, lag=lag) as cluster:
        cluster.register_key(credentials.access_key, credentials.secret_key)
        await admin(cluster.writer_instance.server, "CREATE TABLE ledger (at timestamptz)")
        forwarders: list[ClusterEndpoint] = []
        try:
            out, err, returncode, stopped_wall, promoted_wall = await _run(
                python, cluster, forwarders, lag=lag, warmup=warmup, writers=writers, pool=pool
            )
        except asyncio.TimeoutError:
            return {"kind": "peer", "skipped": "the wrapper did not answer within 120 s"}
        finally:
            for forwarder in forwarders:
                await forwarder.stop()
        lines = out.decode().strip().splitlines()
        if returncode != 0 or not lines or stopped_wall is None or promoted_wall is None:
            return {"kind": "peer", "skipped": _last_error(err)}
        seen = json.loads(lines[-1])
        after = [at for at in seen["acknowledged"] if at > promoted_wall]
        first = min(after) if after else None
        until = dt.datetime.fromtimestamp(first or time.time(), dt.timezone.utc)
        logins = sum(
            1
            for emulator in cluster.emulators
            for r in emulator.records
            if stopped_wall <= r.at <= until
        )
    return {
        "kind": "peer",
        "first_write_after_promotion_s": None if first is None else first - promoted_wall,
        "failed": len(seen["failed"]),
        "failed_after_promotion": sum(1 for at in seen["failed"] if at > promoted_wall),
        "errors": seen["errors"],
        "logins_stop_to_first_write": logins if first is not None else None,
        "acknowledged": len(seen["acknowledged"]),
        "stuck": seen["stuck"],
    }


async def _run(
    python: Path,
    cluster: AuroraCluster,
    forwarders: list[ClusterEndpoint],
    *,
    lag: float,
    warmup: float,
    writers: int,
    pool: int,
) -> tuple[bytes, bytes, int | None, dt.datetime | None, float | None]:
    """Start the forwarders and the wrapper, fail over under its writers, stop it.

    Returns its output, its exit status, and when the writer stopped and the replica was
    promoted (None for both if it never got ready).
    """
    loop = asyncio.get_running_loop()
    hosts = ["127.0.0.1 localhost", f"127.0.0.1 {cluster.endpoint}"]
    # A loopback network of this run's own (two runs at once do not meet).
    net = f"127.{os.getpid() % 200 + 20}.{secrets.randbelow(250) + 1}"
    for number, instance in enumerate(cluster.instances.values(), start=1):
        forwarder = ClusterEndpoint(instance.emulator, host=f"{net}.{number}", port=5432)
        await forwarder.start()
        forwarders.append(forwarder)
        hosts.append(f"{net}.{number} {instance.name}")
    config = {
        "host": cluster.endpoint,
        "port": cluster.writer.port,
        "user": cluster.user,
        "dbname": cluster.database,
        "region": "us-east-1",
        "writers": writers,
        "pool": pool,
    }
    with tempfile.TemporaryDirectory() as tmp:
        hosts_file = Path(tmp) / "hosts"
        hosts_file.write_text("\n".join(hosts) + "\n")
        process = await asyncio.create_subprocess_exec(
            "unshare",
            "--mount",
            "sh",
            "-c",
            'mount --bind "$1" /etc/hosts && exec "$2" "$3" "$4"',
            "sh",
            str(hosts_file),
            str(python),
            str(SCRIPT),
            json.dumps(config),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        assert process.stdout is not None
        try:
            ready = await asyncio.wait_for(process.stdout.readline(), 120)
            if ready.strip() != b"ready":
                out, err = await asyncio.wait_for(process.communicate(), 120)
                return out, err, process.returncode, None, None
            await asyncio.sleep(warmup)
            stopped_wall = dt.datetime.now(dt.timezone.utc)
            failover = asyncio.ensure_future(cluster.failover(old_writer="read_only"))
            promoted_wall: float | None = None
            deadline = loop.time() + lag + 15.0
            while loop.time() < deadline and not failover.done():
                if promoted_wall is None and cluster.writer_instance.id != "instance-1":
                    promoted_wall = time.time()
                await asyncio.sleep(0.01)
            await failover
            if promoted_wall is None:
                promoted_wall = time.time()
            await asyncio.sleep(max(0.0, promoted_wall + lag + 5.0 - time.time()))
            out, err = await asyncio.wait_for(process.communicate(b"stop\n"), 120)
            return out, err, process.returncode, stopped_wall, promoted_wall
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()


def _last_error(stderr: bytes) -> str:
    """The wrapper's last error line (its exception), for the table."""
    lines = [line for line in stderr.decode(errors="replace").splitlines() if line.strip()]
    return lines[-1][:300] if lines else "exited without output"


if __name__ == "__main__":  # a manual run: python -m benchmarks._peer_run [LAG]
    from ._shared import aws_keys

    _python = peer_python()
    if _python is None:
        sys.exit("aws-advanced-python-wrapper is not installed in the peer virtualenv")

    async def _main(python: Path) -> None:
        with aws_keys("AKIABENCHPEERWRAPPER1") as credentials:
            lag = float(sys.argv[1]) if sys.argv[1:] else 3.0
            seen = await aurora_peer(
                python, lag=lag, warmup=1.0, writers=16, pool=10, credentials=credentials
            )
        print(json.dumps(seen, indent=1))

    asyncio.run(_main(_python))
