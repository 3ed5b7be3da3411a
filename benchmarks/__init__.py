"""Benchmarks: what asyncpg-iam costs next to what users would otherwise write.

Run everything with ``python -m benchmarks`` (or ``nox -s bench``); figures go to
``benchmarks/results/`` as JSON (raw figures), Markdown (the table) and PNG plots. Each case is
a module with ``NAME``, ``TITLE``, ``NEEDS_ENVIRONMENT`` and ``async def run(env, quick)``;
`_harness` holds what they share: the local PostgreSQL, the RDS IAM emulators, the credential
endpoint, statistics and the writers.
"""
