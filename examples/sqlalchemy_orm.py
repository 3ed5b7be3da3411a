"""SQLAlchemy ORM sessions on an IAM engine: ``python examples/sqlalchemy_orm.py``.

Against RDS, set ``ASYNCPG_IAM_EXAMPLE_DSN=postgresql://app@<endpoint>:5432/app`` (credentials
come from the default AWS chain). Without it the example starts a throwaway PostgreSQL and the
local RDS IAM emulator in front of it (``asyncpg_iam.testing``; needs the PostgreSQL server
binaries and the ``testing`` extra) and signs with a key the emulator trusts.

Connections live at most 2 seconds here, so over the 5 rounds you can watch the engine replace
them (a new backend pid) with a freshly signed token, while the sessions carry on.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from sqlalchemy import String, func, select, text
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from asyncpg_iam.sqlalchemy import create_async_engine


class Base(DeclarativeBase):
    pass


class Note(Base):
    __tablename__ = "asyncpg_iam_example_notes"

    id: Mapped[int] = mapped_column(primary_key=True)
    body: Mapped[str] = mapped_column(String(100))


async def run(url: str, **engine_kwargs: Any) -> None:
    """Write and read notes through ORM sessions across several connection lifetimes."""
    engine = create_async_engine(url, max_lifetime=2.0, pool_size=2, **engine_kwargs)
    sessions = async_sessionmaker(engine, expire_on_commit=False)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(Base.metadata.create_all)
        for round_ in range(5):
            async with sessions() as session, session.begin():
                session.add(Note(body=f"round {round_}"))
            async with sessions() as session:
                count = await session.scalar(select(func.count()).select_from(Note))
                pid = await session.scalar(text("SELECT pg_backend_pid()"))
            print(f"round {round_}: {count} notes, served by backend pid {pid}")
            await asyncio.sleep(1.0)
        async with engine.begin() as conn:
            await conn.run_sync(Base.metadata.drop_all)
    finally:
        await engine.dispose()


async def main() -> None:
    """Run against ASYNCPG_IAM_EXAMPLE_DSN, or against a local emulator."""
    dsn = os.environ.get("ASYNCPG_IAM_EXAMPLE_DSN")
    if dsn:
        await run(dsn)
        return
    from _local import local_rds  # beside this file

    async with local_rds() as rds:
        server, emulator = rds.server, rds.emulator
        url = (
            f"postgresql+asyncpg://{server.user}@{emulator.host}:{emulator.port}/{server.database}"
        )
        await run(url, iam=rds.iam_auth(), connect_args={"ssl": emulator.client_ssl_context()})
        print(f"the emulator verified {emulator.logins_accepted} token logins")


if __name__ == "__main__":
    asyncio.run(main())
