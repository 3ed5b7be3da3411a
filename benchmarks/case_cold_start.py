"""Cold start: a new process, from its start to the first query result, as on AWS Lambda.

Each sample spawns a fresh Python process with the variables Lambda sets (an access key, a
secret key, a session token, the region, the function name; no config files, no metadata
service) and times it, from the spawn to the line that carries the first query's result:
interpreter start-up, imports, credentials, signing, TLS to the emulator on loopback and the
login. Variants, interleaved in a fresh random order each round:

- ``floor``: ``asyncpg.connect`` with a static password (accept-any emulator);
- ``botocore``: botocore's ``generate_db_auth_token`` (a session and an ``rds`` client, what
  users write), then ``asyncpg.connect`` with the token;
- ``ours``: ``asyncpg_iam.create_pool(min_size=1)`` on the default chain, then a query.

Both IAM variants log in through the verifying emulator with the same key.
"""

from __future__ import annotations

import asyncio
import secrets
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from asyncpg_iam.testing import AccessKey
from asyncpg_iam.testing._isolation import lambda_environment

from ._harness import (
    CaseResult,
    Environment,
    interleave,
    paired_ratio_interval,
    percentile,
    ratio,
    summarize,
)

NAME = "cold_start"
TITLE = "12. Cold start: new process to first query result (Lambda's environment)"
NEEDS_ENVIRONMENT = True
# A process start moves by +-30 % from one sample to the next on a 2-CPU machine: 15 rounds
# gave ratios of medians from 0.99 to 1.30 on the same code, so the case takes 60 and gives
# the ratio's bootstrap interval (resampling rounds).
ROUNDS = 60

_CONNECT = """
import asyncio, os, ssl
async def main(password):
    import asyncpg
    con = await asyncpg.connect(
        host="127.0.0.1", port=int(os.environ["BENCH_PORT"]), user=os.environ["BENCH_USER"],
        database=os.environ["BENCH_DATABASE"], password=password,
        ssl=ssl.create_default_context(cafile=os.environ["BENCH_CA"]),
    )
    print(await con.fetchval("SELECT 42"), flush=True)
    await con.close()
"""
SCRIPTS = {
    "floor": _CONNECT + "asyncio.run(main('static'))\n",
    "botocore": _CONNECT
    + """
import botocore.session
client = botocore.session.get_session().create_client("rds")
token = client.generate_db_auth_token(
    DBHostname=os.environ["BENCH_ENDPOINT"], Port=int(os.environ["BENCH_PORT"]),
    DBUsername=os.environ["BENCH_USER"],
)
asyncio.run(main(token))
""",
    "ours": """
import asyncio, os
import asyncpg_iam
async def main():
    pool = await asyncpg_iam.create_pool(
        host="127.0.0.1", port=int(os.environ["BENCH_PORT"]), user=os.environ["BENCH_USER"],
        database=os.environ["BENCH_DATABASE"], sslrootcert=os.environ["BENCH_CA"],
        iam=asyncpg_iam.IAMAuth(signing_host=os.environ["BENCH_ENDPOINT"]), min_size=1,
    )
    print(await pool.fetchval("SELECT 42"), flush=True)
    await pool.close()
asyncio.run(main())
""",
}
LABELS = {
    "floor": "asyncpg, static password (floor)",
    "botocore": "asyncpg + botocore generate_db_auth_token",
    "ours": "asyncpg_iam.create_pool",
}


async def _spawn(script: str, env: dict[str, str]) -> float:
    """Run `script` in a new process; return the seconds from spawn to its first line."""
    elapsed, _rest = await spawn(script, env)
    return elapsed


async def spawn(script: str, env: dict[str, str]) -> tuple[float, str]:
    """Run `script` in a new process, which prints the first query's result (42) first;
    return the seconds from spawn to that line and what the process printed after it."""
    start = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        script,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 120)
    elapsed = time.perf_counter() - start
    rest, err = await asyncio.wait_for(proc.communicate(), 120)
    if line.strip() != b"42" or proc.returncode != 0:
        raise RuntimeError(f"cold start script failed: {err.decode()[-2000:]}")
    return elapsed, rest.decode()


def _environment(env: Environment, home: Path, key: AccessKey, *, emulator: Any) -> dict[str, str]:
    variables = lambda_environment(key, region=emulator.region, home=home)
    variables.update(
        BENCH_PORT=str(emulator.port),
        BENCH_USER=env.user,
        BENCH_DATABASE=env.database,
        BENCH_CA=emulator.ca_path,
        BENCH_ENDPOINT=emulator.endpoint,
    )
    return variables


async def run(env: Environment, quick: bool) -> CaseResult:
    """Time each variant's cold start over interleaved rounds."""
    rounds = 3 if quick else ROUNDS
    assert env.emu_iam is not None
    assert env.emu_any is not None
    key = AccessKey("ASIACOLDSTARTBENCH01", secrets.token_urlsafe(30), secrets.token_urlsafe(40))
    env.emu_iam.register_key(key.access_key, key.secret_key, key.session_token)
    with tempfile.TemporaryDirectory(prefix="asyncpg-iam-cold-") as home:
        iam_env = _environment(env, Path(home), key, emulator=env.emu_iam)
        any_env = _environment(env, Path(home), key, emulator=env.emu_any)
        variants = {
            "floor": lambda: _spawn(SCRIPTS["floor"], any_env),
            "botocore": lambda: _spawn(SCRIPTS["botocore"], iam_env),
            "ours": lambda: _spawn(SCRIPTS["ours"], iam_env),
        }
        for variant in variants.values():
            await variant()  # warm the page cache, untimed
        samples = await interleave(variants, rounds)
    median = {name: percentile(values, 50) for name, values in samples.items()}
    result = CaseResult(NAME, TITLE)
    result.figures = {
        "rounds": rounds,
        "seconds": samples,
        "summary": {name: summarize(values) for name, values in samples.items()},
    }
    for name in ("floor", "botocore", "ours"):
        result.add(f"{LABELS[name]} (median ms)", f"{median[name] * 1000:.0f}")
    vs_floor = ratio(median["ours"], median["floor"])
    vs_botocore = ratio(median["ours"], median["botocore"])
    result.figures.update(ours_vs_floor=vs_floor, ours_vs_botocore=vs_botocore)
    low, high = paired_ratio_interval(samples["ours"], samples["floor"])
    result.figures.update(ours_vs_floor_interval_95=(low, high))
    result.add(
        "asyncpg_iam vs the floor (ratio of medians)",
        f"{vs_floor:.2f}x (95 % interval {low:.2f}-{high:.2f})",
        "<= 1.1x",
        vs_floor <= 1.1,
    )
    result.add(
        "asyncpg_iam vs botocore (ratio of medians)", f"{vs_botocore:.2f}x", "< 1x", vs_botocore < 1
    )
    result.notes.append(
        "Each sample is a new process (interpreter start-up included) with Lambda's variables; "
        "TLS to the emulator on loopback; the interval resamples rounds."
    )
    return result
