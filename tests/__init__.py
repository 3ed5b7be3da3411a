"""asyncpg-iam's test suite (a package, so test modules can import `tests._support`)."""
