"""SQLAlchemy's AsyncEngine with IAM tokens, through the emulator."""

from __future__ import annotations

import asyncio
import secrets
import time
from typing import Any

import pytest

pytest.importorskip("sqlalchemy")

from sqlalchemy import String, event, func, select, text
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from asyncpg_iam import (
    ConfigurationError,
    CredentialsError,
    IAMAuth,
    IAMAuthenticationError,
)
from asyncpg_iam.sqlalchemy import create_async_engine
from asyncpg_iam.testing import CredentialServer, PostgresServer, RDSIAMEmulator
from tests._support import wait_for


def engine_for(emulator: RDSIAMEmulator, server: PostgresServer, **kwargs: Any) -> AsyncEngine:
    """Return an engine that dials the emulator and signs for its endpoint."""
    url = f"postgresql+asyncpg://{server.user}@{emulator.host}:{emulator.port}/{server.database}"
    kwargs.setdefault("iam", IAMAuth(signing_host=emulator.endpoint))
    kwargs.setdefault("connect_args", {"ssl": emulator.client_ssl_context()})
    return create_async_engine(url, **kwargs)


def track_connects(engine: AsyncEngine) -> list[int]:
    """Record the backend pid of every DBAPI connection the engine opens."""
    pids: list[int] = []

    @event.listens_for(engine.sync_engine, "connect")
    def connected(dbapi_connection: Any, _record: Any) -> None:
        pids.append(dbapi_connection.driver_connection.get_server_pid())

    return pids


def relayed_pids(emulator: RDSIAMEmulator) -> set[int | None]:
    """Return the backend pids of the connections the emulator relays now."""
    return {c.backend_pid for c in emulator.relayed_connections()}


async def test_orm_sessions_outlive_their_first_connections(
    iam_emulator: RDSIAMEmulator,
    postgres_server: PostgresServer,
) -> None:
    """ORM sessions keep working for 4 lifetimes; every DBAPI connection logged in with a token."""

    class Base(DeclarativeBase):
        pass

    class Note(Base):
        __tablename__ = f"notes_{secrets.token_hex(4)}"
        id: Mapped[int] = mapped_column(primary_key=True)
        worker: Mapped[int]
        body: Mapped[str] = mapped_column(String(50))

    engine = engine_for(iam_emulator, postgres_server, max_lifetime=1.0, pool_size=3)
    opened = track_connects(engine)
    sessions = async_sessionmaker(engine, expire_on_commit=False)
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
    first = set(opened)
    written = [0, 0, 0]

    async def worker(n: int) -> None:
        stop_at = time.monotonic() + 4.0
        while time.monotonic() < stop_at:
            async with sessions() as session, session.begin():
                session.add(Note(worker=n, body=f"note {written[n]}"))
            written[n] += 1
            async with sessions() as session:
                count = await session.scalar(
                    select(func.count()).select_from(Note).where(Note.worker == n)
                )
            assert count == written[n]
            await asyncio.sleep(0.02)

    try:
        await asyncio.gather(*(worker(n) for n in range(3)))
        async with engine.begin() as conn:
            await conn.run_sync(Base.metadata.drop_all)
    finally:
        await engine.dispose()

    assert min(written) > 20
    assert len(opened) >= len(first) + 6, "connections were replaced at their lifetime"
    assert not (first & relayed_pids(iam_emulator)), "the first connections were closed"
    accepted = [r for r in iam_emulator.records if r.accepted]
    assert iam_emulator.logins_rejected == 0
    assert len(accepted) == len(opened)
    assert sorted(r.backend_pid for r in accepted) == sorted(opened)
    assert all(r.token_age is not None and r.access_key for r in accepted)


async def test_due_connection_is_replaced_on_checkout(
    iam_emulator: RDSIAMEmulator,
    postgres_server: PostgresServer,
) -> None:
    """An idle connection past its lifetime is closed and replaced when next checked out."""
    engine = engine_for(
        iam_emulator, postgres_server, max_lifetime=0.3, max_lifetime_jitter=0, pool_size=1
    )
    try:
        async with engine.connect() as conn:
            old = await conn.scalar(text("SELECT pg_backend_pid()"))
        await asyncio.sleep(0.5)
        assert old in relayed_pids(iam_emulator), "SQLAlchemy has no idle reaper"
        async with engine.connect() as conn:
            new = await conn.scalar(text("SELECT pg_backend_pid()"))
        assert new != old
        assert old not in relayed_pids(iam_emulator)
    finally:
        await engine.dispose()


async def test_connection_in_use_is_kept_then_closed_on_checkin(
    iam_emulator: RDSIAMEmulator,
    postgres_server: PostgresServer,
) -> None:
    """A connection held past its lifetime keeps working and closes when checked in."""
    engine = engine_for(
        iam_emulator, postgres_server, max_lifetime=0.3, max_lifetime_jitter=0, pool_size=1
    )
    try:
        async with engine.connect() as conn:
            pid = await conn.scalar(text("SELECT pg_backend_pid()"))
            await asyncio.sleep(0.5)
            assert await conn.scalar(text("SELECT pg_backend_pid()")) == pid
        await wait_for(lambda: pid not in relayed_pids(iam_emulator))
    finally:
        await engine.dispose()


async def test_pool_recycle_defaults_to_max_lifetime(
    rds_emulator: RDSIAMEmulator, credential_server: CredentialServer
) -> None:
    """pool_recycle follows max_lifetime unless given; pool_pre_ping passes through."""
    url = f"postgresql+asyncpg://app@{rds_emulator.endpoint}:5432/app"
    engine = create_async_engine(url, max_lifetime=120)
    other = create_async_engine(url, max_lifetime=120, pool_recycle=60, pool_pre_ping=True)
    try:
        assert engine.sync_engine.pool._recycle == 120
        assert other.sync_engine.pool._recycle == 60
        assert other.sync_engine.pool._pre_ping
    finally:
        await engine.dispose()
        await other.dispose()


async def test_refused_login_raises_iam_authentication_error(
    iam_emulator: RDSIAMEmulator,
    postgres_server: PostgresServer,
) -> None:
    """A refused login surfaces as IAMAuthenticationError with the pool's hints."""
    iam_emulator.disable_iam_user(postgres_server.user)
    engine = engine_for(iam_emulator, postgres_server)
    try:
        with pytest.raises(IAMAuthenticationError) as refused:
            async with engine.connect():
                pass
    finally:
        await engine.dispose()
    error = refused.value
    assert error.user == postgres_server.user
    assert any("rds_iam" in hint for hint in error.hints)
    assert "PAM authentication failed" in str(error)


async def test_missing_credentials_raise_credentials_error(
    rds_emulator: RDSIAMEmulator,
    postgres_server: PostgresServer,
    credential_server: CredentialServer,
) -> None:
    """When the credential endpoint fails, connecting raises CredentialsError."""
    credential_server.fail_status = 500
    engine = engine_for(rds_emulator, postgres_server)
    try:
        with pytest.raises(CredentialsError):
            async with engine.connect():
                pass
    finally:
        await engine.dispose()
    assert rds_emulator.password_messages == 0


async def test_engine_works_after_dispose(
    iam_emulator: RDSIAMEmulator,
    postgres_server: PostgresServer,
    credential_server: CredentialServer,
) -> None:
    """dispose() releases the credential cache; the engine then connects with a fresh one."""
    engine = engine_for(iam_emulator, postgres_server)
    try:
        async with engine.connect() as conn:
            assert await conn.scalar(text("SELECT 1")) == 1
        requests = credential_server.requests
        await engine.dispose()
        async with engine.connect() as conn:
            assert await conn.scalar(text("SELECT 2")) == 2
        assert credential_server.requests > requests, "a fresh cache fetched credentials"
    finally:
        await engine.dispose()
    assert iam_emulator.logins_accepted == 2


@pytest.mark.parametrize(
    ("url", "kwargs", "match"),
    [
        ("postgresql+asyncpg://app:secret@db.example.com/app", {}, "password"),
        ("postgresql+asyncpg://app@db.example.com/app?ssl=prefer", {}, "sslmode"),
        ("postgresql+psycopg://app@db.example.com/app", {}, "asyncpg"),
        ("postgresql+asyncpg://app@db.example.com/app", {"max_lifetime": 0}, "max_lifetime"),
        ("postgresql+asyncpg://app@db.example.com/app", {"creator": object()}, "creator"),
        (
            "postgresql+asyncpg://app@db.example.com/app?prepared_statement_cache_size=5",
            {},
            "prepared_statement_cache_size",
        ),
    ],
)
def test_bad_settings_are_refused(url: str, kwargs: dict[str, Any], match: str) -> None:
    """Passwords, clear-text TLS modes, other drivers and bad options raise ConfigurationError."""
    with pytest.raises(ConfigurationError, match=match):
        create_async_engine(url, iam=IAMAuth(region="us-east-1"), **kwargs)
