"""What the multi-server test beds do to their servers directly, as the superuser.

`FailoverCluster`, `AuroraCluster` and `BlueGreenDeployment` start a primary and its standbys
with `start_server()`, put an emulator in front of each with `emulator_for()`, stop them with
`stop_servers()`, run SQL on one with `admin()` and make commits wait for a standby with
`set_synchronous_standbys()` and `wait_synchronous()`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping
from typing import Any

from ._emulator import RDSIAMEmulator
from ._postgres import PostgresCluster


async def start_server(
    servers: list[PostgresCluster],
    settings: Mapping[str, str],
    *,
    standby_of: PostgresCluster | None = None,
) -> PostgresCluster:
    """Start a server (a standby of `standby_of` if given), listed in `servers` first."""
    server = PostgresCluster(settings=dict(settings), standby_of=standby_of)
    servers.append(server)  # listed before it starts, so the bed's stop() removes a half start
    await asyncio.to_thread(server.start)
    return server


def emulator_for(
    server: PostgresCluster, keys: Iterable[tuple[str, str, str | None]] = (), **options: Any
) -> RDSIAMEmulator:
    """Return an emulator (not started) in front of `server` as its superuser, accepting `keys`.

    `options` are the other `RDSIAMEmulator` arguments (endpoint, CA, IAM users...).
    """
    emulator = RDSIAMEmulator(
        backend_host=server.host, backend_port=server.port, backend_user=server.user, **options
    )
    for key in keys:
        emulator.register_key(*key)
    return emulator


async def stop_servers(emulators: list[RDSIAMEmulator], servers: list[PostgresCluster]) -> None:
    """Stop the emulators, then the servers (removing their data), and empty both lists."""
    for emulator in emulators:
        await emulator.stop()
    emulators.clear()
    for server in servers:
        await asyncio.to_thread(server.stop)
    servers.clear()


async def admin(
    server: PostgresCluster, sql: str, *args: Any, synchronous_commit: str | None = None
) -> Any:
    """Run `sql` on `server` directly, read-write even on a read-only one.

    With `args` it returns the rows; without, `sql` may hold several statements.
    """
    import asyncpg

    settings = {"default_transaction_read_only": "off"}
    if synchronous_commit is not None:
        settings["synchronous_commit"] = synchronous_commit
    con = await asyncpg.connect(server.dsn, ssl=False, server_settings=settings)
    try:
        if args:
            return await con.fetch(sql, *args)
        return await con.execute(sql)
    finally:
        await con.close()


async def set_synchronous_standbys(server: PostgresCluster, names: str | None) -> None:
    """Set (None: reset) `server`'s ``synchronous_standby_names`` and reload its configuration."""
    if names is None:
        await admin(server, "ALTER SYSTEM RESET synchronous_standby_names")
    else:
        await admin(server, f"ALTER SYSTEM SET synchronous_standby_names = '{names}'")
    await admin(server, "SELECT pg_reload_conf()")


async def wait_synchronous(primary: PostgresCluster, standby: str = "the standby") -> None:
    """Wait up to 10 s until a standby streams from `primary` synchronously."""
    import asyncpg

    con = await asyncpg.connect(primary.dsn, ssl=False)
    try:
        for _ in range(500):
            state = await con.fetchval(
                "SELECT sync_state FROM pg_stat_replication WHERE state = 'streaming'"
            )
            if state == "sync":
                return
            await asyncio.sleep(0.02)
        raise RuntimeError(f"{standby} did not start streaming synchronously within 10 s")
    finally:
        await con.close()
