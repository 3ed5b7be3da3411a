"""Aurora DSQL, a pool and conflicts retried: ``python examples/dsql_transfer.py``.

Against Aurora DSQL, set ``ASYNCPG_IAM_EXAMPLE_DSQL_HOST=<cluster-id>.dsql.<region>.on.aws``
(credentials come from the default AWS chain; the example logs in as ``admin`` and creates,
then drops, a table ``example_accounts``). Without it the example starts a throwaway PostgreSQL
and the emulator in DSQL mode in front of it (``asyncpg_iam.testing``; needs the PostgreSQL
server binaries and the ``testing`` extra), which fails the first two COMMITs with SQLSTATE
40001, as DSQL does when a concurrent transaction wins, so you can watch the retries.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets

import asyncpg_iam


async def transfer(conn):
    await conn.execute("UPDATE example_accounts SET balance = balance - 10 WHERE id = 1")
    await conn.execute("UPDATE example_accounts SET balance = balance + 10 WHERE id = 2")


async def run(pool: asyncpg_iam.Pool) -> None:
    """Move 10 twice, once through the pool and once on one connection; print the balances."""
    await pool.execute(
        "CREATE TABLE IF NOT EXISTS example_accounts (id int PRIMARY KEY, balance int NOT NULL)"
    )
    try:
        await pool.execute("DELETE FROM example_accounts")
        await pool.execute("INSERT INTO example_accounts VALUES (1, 100), (2, 0)")
        await pool.run_transaction(transfer, retries=8, backoff=0.05, max_backoff=2.0)
        async with pool.acquire() as conn:
            await asyncpg_iam.run_transaction(conn, transfer, isolation="repeatable_read")
        rows = await pool.fetch("SELECT id, balance FROM example_accounts ORDER BY id")
        balances = [row["balance"] for row in rows]
        print(f"balances after two transfers: {balances}")
        assert balances == [80, 20], balances
    finally:
        await pool.execute("DROP TABLE example_accounts")


async def local() -> None:
    """Run against a throwaway PostgreSQL behind the emulator in DSQL mode."""
    from asyncpg_iam.testing import DEFAULT_DSQL_ENDPOINT, PostgresCluster, RDSIAMEmulator

    with PostgresCluster() as cluster:
        server = cluster.server
        emulator = RDSIAMEmulator(
            backend_host=server.host,
            backend_port=server.port,
            backend_password=server.password,
            endpoint=DEFAULT_DSQL_ENDPOINT,
            iam_users=[server.user],
        )
        # Stand-in AWS credentials that only this emulator trusts.
        key = asyncpg_iam.Credentials(
            access_key="AKIAEXAMPLE" + secrets.token_hex(5).upper(),
            secret_key=secrets.token_urlsafe(30),
        )
        emulator.register_key(key.access_key, key.secret_key, None)
        async with emulator:
            iam = asyncpg_iam.IAMAuth(signing_host=emulator.endpoint, credentials=key)
            async with asyncpg_iam.create_pool(
                **emulator.pool_kwargs(user=server.user, iam=iam)
            ) as pool:
                emulator.fail_next_commits(2)
                await run(pool)
            print(
                f"the emulator failed {emulator.commits_failed} COMMITs with SQLSTATE 40001; "
                "run_transaction ran the transaction again each time"
            )
            assert emulator.commits_failed == 2


async def main() -> None:
    """Run against ASYNCPG_IAM_EXAMPLE_DSQL_HOST, or against a local emulator."""
    host = os.environ.get("ASYNCPG_IAM_EXAMPLE_DSQL_HOST")
    if not host:
        await local()
        return
    # host is the cluster endpoint, like "abcdefghijklmnopqrstuvwxyz.dsql.us-east-1.on.aws"
    pool = await asyncpg_iam.create_pool(host=host, user="admin")
    try:
        await run(pool)
    finally:
        await pool.close()


if __name__ == "__main__":
    # DEBUG on the retry logger shows each retry and its backoff.
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("asyncpg_iam.retry").setLevel(logging.DEBUG)
    asyncio.run(main())
