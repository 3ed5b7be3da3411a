"""AWS's Python wrapper (async psycopg, failover v2 and IAM plugins) as writers through a failover.

Run by ``case_failover`` in a separate virtualenv that has ``aws-advanced-python-wrapper`` and
``psycopg[binary]`` (never in the project's own), as
``python _peer_wrapper.py CONFIG_JSON``; AWS keys come from the environment (boto3 reads them).
It opens `pool` wrapper connections to the cluster endpoint, runs `writers` tasks that take a
connection, ``INSERT`` and commit, and prints ``ready`` once every connection is open. On a
line ``stop`` on stdin it stops and prints one JSON line: the wall-clock times of acknowledged
and failed writes, and the errors by name. The case moves the cluster meanwhile.

Standalone on purpose: it imports neither asyncpg nor this project.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from collections import Counter
from typing import Any

import psycopg  # type: ignore[import-not-found,import-untyped,unused-ignore]
from aws_advanced_python_wrapper.aio import (  # type: ignore[import-not-found,import-untyped,unused-ignore]
    AsyncAwsWrapperConnection,
    release_resources_async,
)


async def _connect(config: dict[str, Any]) -> Any:
    return await AsyncAwsWrapperConnection.connect(
        psycopg.AsyncConnection.connect,
        host=config["host"],
        port=config["port"],
        user=config["user"],
        dbname=config["dbname"],
        sslmode="require",
        plugins=config.get("plugins", "failover_v2,iam"),
        iam_region=config["region"],
        iam_default_port=5432,
        connect_timeout=10,
        **config.get("properties", {}),
    )


async def main(config: dict[str, Any]) -> None:
    """Open the connections, run the writers until ``stop``, print what they saw."""
    connections: asyncio.Queue[Any] = asyncio.Queue()
    for _ in range(config["pool"]):
        con = await _connect(config)
        await con.set_autocommit(True)
        connections.put_nowait(con)
    acknowledged: list[float] = []
    failed: list[float] = []
    errors: Counter[str] = Counter()
    stop = asyncio.Event()

    async def writer() -> None:
        while not stop.is_set():
            con = await connections.get()
            try:
                cursor = con.cursor()
                await cursor.execute("INSERT INTO ledger VALUES (now())")
            except Exception as exc:  # every failure is a failed write here
                failed.append(time.time())
                errors[type(exc).__name__] += 1
            else:
                acknowledged.append(time.time())
                continue
            finally:
                connections.put_nowait(con)
            await asyncio.sleep(0.01)  # after a failure, as the pools' writers do

    tasks = [asyncio.ensure_future(writer()) for _ in range(config["writers"])]
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    stop.set()
    # A write still hanging 5 s after the stop is cut (and counted as stuck).
    _, pending = await asyncio.wait(tasks, timeout=5.0)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    while not connections.empty():
        con = connections.get_nowait()
        with contextlib.suppress(Exception):  # closing after the run: nothing to report
            await asyncio.wait_for(con.close(), 5.0)
    print(
        json.dumps(
            {
                "acknowledged": acknowledged,
                "failed": failed,
                "errors": dict(errors),
                "stuck": len(pending),
            }
        ),
        flush=True,
    )
    await release_resources_async()


if __name__ == "__main__":
    asyncio.run(main(json.loads(sys.argv[1])))
