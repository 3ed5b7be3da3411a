"""Where a cold start's time goes: each new process times its own phases.

``python -m benchmarks.cold_start_phases [--rounds N]``

Case 12's processes (Lambda's variables, TLS to the emulator on loopback), interleaved, each
printing how long it spent importing, connecting (``asyncpg.connect`` for the floor,
``asyncpg_iam.create_pool(min_size=1)`` for the pool) and on the first query: the floor, the
pool on its defaults, and the pool without the blue/green first check and the silent-host
monitor. Prints the medians; the spawn-to-result totals are case 12's measure.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import secrets
import statistics
import tempfile
from pathlib import Path

from asyncpg_iam.testing import AccessKey

from ._harness import Environment
from .case_cold_start import _environment, spawn

_SCRIPT = """
import time; t0 = time.perf_counter()
IMPORTS
t1 = time.perf_counter()
async def main():
    OPENED
    t2 = time.perf_counter()
    v = await NAME.fetchval("SELECT 42")
    t3 = time.perf_counter()
    print(v, flush=True)
    print(f"{(t1 - t0) * 1e3:.2f} {(t2 - t1) * 1e3:.2f} {(t3 - t2) * 1e3:.2f}", flush=True)
    await NAME.close()
asyncio.run(main())
"""


def _script(imports: str, name: str, opened: str) -> str:
    """A process that times its `imports`, `opened` (which binds `name`) and the first query."""
    return _SCRIPT.replace("IMPORTS", imports).replace("OPENED", opened).replace("NAME", name)


FLOOR = _script(
    "import asyncio, os, ssl\nimport asyncpg",
    "con",
    """con = await asyncpg.connect(
        host="127.0.0.1", port=int(os.environ["BENCH_PORT"]), user=os.environ["BENCH_USER"],
        database=os.environ["BENCH_DATABASE"], password="static",
        ssl=ssl.create_default_context(cafile=os.environ["BENCH_CA"]),
    )""",
)
POOL = _script(
    "import asyncio, os\nimport asyncpg_iam",
    "pool",
    """pool = await asyncpg_iam.create_pool(
        host="127.0.0.1", port=int(os.environ["BENCH_PORT"]), user=os.environ["BENCH_USER"],
        database=os.environ["BENCH_DATABASE"], sslrootcert=os.environ["BENCH_CA"],
        iam=asyncpg_iam.IAMAuth(signing_host=os.environ["BENCH_ENDPOINT"]), min_size=1, EXTRA
    )""",
)


async def _spawn(script: str, env: dict[str, str]) -> tuple[float, list[float]]:
    """Run `script`; return the seconds from spawn to its first line and its phases (ms)."""
    elapsed, rest = await spawn(script, env)
    return elapsed, [float(x) for x in rest.split()]


async def main(rounds: int) -> None:
    """Measure the variants `rounds` times, interleaved; print the medians."""
    async with Environment() as env:
        assert env.emu_iam is not None
        assert env.emu_any is not None
        secret, session = secrets.token_urlsafe(30), secrets.token_urlsafe(40)
        key = AccessKey("ASIACOLDSTARTBENCH01", secret, session)
        env.emu_iam.register_key(key.access_key, key.secret_key, key.session_token)
        with tempfile.TemporaryDirectory(prefix="asyncpg-iam-cold-") as home:
            iam_env = _environment(env, Path(home), key, emulator=env.emu_iam)
            any_env = _environment(env, Path(home), key, emulator=env.emu_any)
            variants = {
                "floor (asyncpg.connect)": (FLOOR, any_env),
                "asyncpg_iam.create_pool": (POOL.replace("EXTRA", ""), iam_env),
                "  blue_green=False, health_check=None": (
                    POOL.replace("EXTRA", "blue_green=False, health_check=None"),
                    iam_env,
                ),
            }
            totals: dict[str, list[float]] = {name: [] for name in variants}
            phases: dict[str, list[list[float]]] = {name: [] for name in variants}
            for script, variables in variants.values():
                await _spawn(script, variables)  # warm the page cache, untimed
            names, order = list(variants), random.Random(20261206)
            for _ in range(rounds):
                order.shuffle(names)
                for name in names:
                    total, parts = await _spawn(*variants[name])
                    totals[name].append(total)
                    phases[name].append(parts)
    floor = statistics.median(totals["floor (asyncpg.connect)"])
    print(
        "| variant | spawn to first result (median ms) | vs floor | imports | connect "
        "| first query |"
    )
    print("|---|---|---|---|---|---|")
    for name in variants:
        total = statistics.median(totals[name])
        imports, connect, query = (statistics.median(c) for c in zip(*phases[name], strict=True))
        print(
            f"| {name.strip()} | {total * 1e3:.1f} | {total / floor:.3f} | {imports:.1f} | "
            f"{connect:.1f} | {query:.2f} |"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40)
    asyncio.run(main(parser.parse_args().rounds))
