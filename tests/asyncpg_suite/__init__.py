"""asyncpg's own pool tests run on our `Pool` (see plugin.py and .ci/asyncpg-suite)."""
