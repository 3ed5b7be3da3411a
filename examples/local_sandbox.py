"""A local RDS with IAM authentication in one block: `asyncpg_iam.testing.Sandbox`.

Starts a throwaway PostgreSQL (needs the PostgreSQL server binaries and the ``testing`` extra),
the RDS IAM emulator in front of it and a credential endpoint whose rotating keys the emulator
trusts, points the default AWS chain at them, runs a query through an IAM pool, and stops it all.
"""

from __future__ import annotations

import asyncio

import asyncpg_iam
from asyncpg_iam.testing import Sandbox


async def main() -> None:
    """Query as the IAM user ``app`` through the emulator, then show what it verified."""
    async with Sandbox(iam_users=["app"]) as sandbox:
        async with asyncpg_iam.create_pool(**sandbox.pool_kwargs(user="app")) as pool:
            print("logged in as", await pool.fetchval("SELECT current_user"))
        print([record.reason for record in sandbox.emulator.records])  # "ok", or why not
        assert sandbox.emulator.logins_rejected == 0


if __name__ == "__main__":
    asyncio.run(main())
