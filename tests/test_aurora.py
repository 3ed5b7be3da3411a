"""Aurora as a topology, on the test bed: instance endpoints, failover without DNS, readers.

The rehearsal is `asyncpg_iam.testing.AuroraCluster`: a writer and streaming replicas, each
behind the RDS IAM emulator under an instance endpoint name of its own, answering
``aurora_replica_status()``; cluster and reader endpoints with DNS lag in front.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest_asyncio

import asyncpg_iam
from asyncpg_iam.testing import AuroraCluster, CredentialServer


@pytest_asyncio.fixture
async def cluster(credential_server: CredentialServer) -> AsyncIterator[AuroraCluster]:
    """Provide a started AuroraCluster (a writer, one replica, DNS lag 20 s)."""
    async with AuroraCluster(replicas=1, lag=20.0) as started:
        credential_server.add_emulator(started)
        yield started


async def test_the_pool_learns_the_topology_and_dials_the_writer_instance(
    cluster: AuroraCluster,
) -> None:
    """A pool on the cluster endpoint reads the topology and connects to the writer's
    instance endpoint, with tokens signed for that instance's name."""
    async with asyncpg_iam.create_pool(**cluster.pool_kwargs(min_size=2, max_size=4)) as pool:
        on = await pool.fetchval("SELECT aurora_db_instance_identifier()")
        stats = pool.stats()
    writer = cluster.writer_instance
    assert on == writer.id
    assert stats.topology_refreshes >= 1
    assert stats.connections_by_instance == {writer.id: 2}
    # The monitor's first login went through the cluster endpoint; the pool's did not.
    assert sum(cluster.writer.connections_by_backend.values()) == 1
    accepted = [r for r in writer.emulator.records if r.accepted]
    by_alias = [r for r in accepted if "alias" in r.detail]
    assert len(accepted) - len(by_alias) >= 2  # signed for the instance's own name
