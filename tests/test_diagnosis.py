"""Clock skew in the diagnosis: first when measured against AWS, a lesser guess otherwise."""

from __future__ import annotations

import datetime as dt
import time

import pytest

import asyncpg_iam
from asyncpg_iam import IAMAuth
from asyncpg_iam._clock import SystemClock
from asyncpg_iam.testing import CredentialServer, MotoSTS, PostgresServer, RDSIAMEmulator


class SkewedClock(SystemClock):
    """The real clock with its wall time shifted by `offset` seconds, as a badly set host's."""

    def __init__(self, offset: float) -> None:
        self.offset = dt.timedelta(seconds=offset)

    def now(self) -> dt.datetime:
        return dt.datetime.now(dt.timezone.utc) + self.offset


@pytest.fixture
def sts(
    moto_sts: MotoSTS, credential_server: CredentialServer, monkeypatch: pytest.MonkeyPatch
) -> MotoSTS:
    """Send STS requests to moto; source credentials come from the credential server."""
    for name, value in moto_sts.env().items():
        monkeypatch.setenv(name, value)
    return moto_sts


async def refused_login(
    emulator: RDSIAMEmulator, server: PostgresServer, sts: MotoSTS, clock: SkewedClock
) -> asyncpg_iam.IAMAuthenticationError:
    """Sign with an assumed role on `clock`, let the emulator trust the role, and log in."""
    role = sts.create_role(f"skew-{time.monotonic_ns()}")
    auth = IAMAuth(role_arn=role, signing_host=emulator.endpoint)
    pool = asyncpg_iam.create_pool(
        **emulator.pool_kwargs(user=server.user, iam=auth, min_size=0), clock=clock
    )
    async with pool:
        assert pool._connector.provider is not None
        assumed = await pool._connector.provider.credentials.get()
        emulator.register_key(assumed.access_key, assumed.secret_key, assumed.token)
        with pytest.raises(asyncpg_iam.IAMAuthenticationError) as caught:
            await pool.fetchval("SELECT 1")
    return caught.value


async def test_measured_skew_is_the_first_hint(
    rds_emulator: RDSIAMEmulator, postgres_server: PostgresServer, sts: MotoSTS
) -> None:
    """A host clock 20 minutes slow, measured against STS's Date, is named first."""
    error = await refused_login(rds_emulator, postgres_server, sts, SkewedClock(-1200))
    assert rds_emulator.records[-1].reason == "expired"
    assert error.context.clock_skew is not None
    assert -1202 < error.context.clock_skew < -1198
    assert error.hints[0].startswith("Clock skew: this host's clock is 1")
    assert "s behind AWS's" in error.hints[0]


async def test_unmeasured_skew_is_only_a_last_guess(
    rds_emulator: RDSIAMEmulator, postgres_server: PostgresServer, sts: MotoSTS
) -> None:
    """With the clock right, a refusal for another reason lists clock skew last, as measured."""
    rds_emulator.disable_iam_user(postgres_server.user)
    error = await refused_login(rds_emulator, postgres_server, sts, SkewedClock(0))
    assert rds_emulator.records[-1].reason == "user_not_iam_enabled"
    assert error.context.clock_skew is not None
    assert abs(error.context.clock_skew) < 5
    assert error.hints[0].startswith("The database user")
    assert error.hints[-1].startswith("Clock skew")
    assert "measured against AWS" in error.hints[-1]
