"""Microseconds per RDS IAM token: asyncpg-iam vs botocore and aiobotocore (clients made once).

Run: ``python3 -m benchmarks.bench_token`` or ``python3 benchmarks/bench_token.py``.
Writes benchmarks/results/token.json and prints a Markdown table. Rounds interleave the three
signers so that drift in machine load hits all of them alike; the figures are medians.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import botocore  # noqa: E402
import botocore.session  # noqa: E402
from aiobotocore.session import AioSession  # noqa: E402

from asyncpg_iam._signing import Credentials, build_auth_token  # noqa: E402

HOST = "app.cluster-c9akciq32lpx.us-east-1.rds.amazonaws.com"
PORT = 5432
USER = "app_user"
REGION = "us-east-1"
ACCESS_KEY = "ASIAIOSFODNN7EXAMPLE"
SECRET_KEY = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
SESSION_TOKEN = "IQoJb3JpZ2luX2VjEXAMPLE" * 30  # session tokens are ~700-1000 characters
ROUNDS = 15
PER_ROUND = {"asyncpg-iam": 5000, "botocore": 300, "aiobotocore": 300}


def per_call_us(fn: object, n: int) -> float:
    """Return microseconds per call of a no-argument callable over `n` calls."""
    call = fn  # type: ignore[assignment]
    start = time.perf_counter()
    for _ in range(n):
        call()  # type: ignore[operator]
    return (time.perf_counter() - start) / n * 1e6


async def main() -> dict[str, object]:
    """Measure the three signers in interleaved rounds; return the figures."""
    credentials = Credentials(ACCESS_KEY, SECRET_KEY, SESSION_TOKEN)
    client = botocore.session.get_session().create_client(
        "rds",
        region_name=REGION,
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        aws_session_token=SESSION_TOKEN,
    )
    session = AioSession()
    async with session.create_client(
        "rds",
        region_name=REGION,
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        aws_session_token=SESSION_TOKEN,
    ) as aioclient:

        def ours() -> str:
            return build_auth_token(
                host=HOST, port=PORT, user=USER, region=REGION, credentials=credentials
            )

        def theirs() -> str:
            return str(client.generate_db_auth_token(HOST, PORT, USER, REGION))

        async def aio_us(n: int) -> float:
            start = time.perf_counter()
            for _ in range(n):
                await aioclient.generate_db_auth_token(HOST, PORT, USER, REGION)
            return (time.perf_counter() - start) / n * 1e6

        # Same inputs, same second: same token (checked once, outside the timing).
        now = dt.datetime.now(dt.timezone.utc)
        a = build_auth_token(
            host=HOST, port=PORT, user=USER, region=REGION, credentials=credentials, now=now
        )
        b = theirs()
        same = a.rsplit("&X-Amz-Signature=", 1)[0] == b.rsplit("&X-Amz-Signature=", 1)[0]
        samples: dict[str, list[float]] = {name: [] for name in PER_ROUND}
        ours()
        theirs()
        await aio_us(10)
        for _ in range(ROUNDS):
            samples["asyncpg-iam"].append(per_call_us(ours, PER_ROUND["asyncpg-iam"]))
            samples["botocore"].append(per_call_us(theirs, PER_ROUND["botocore"]))
            samples["aiobotocore"].append(await aio_us(PER_ROUND["aiobotocore"]))

    medians = {name: statistics.median(values) for name, values in samples.items()}
    result: dict[str, object] = {
        "unit": "microseconds per token (median of rounds)",
        "rounds": ROUNDS,
        "calls_per_round": PER_ROUND,
        "median_us": {k: round(v, 2) for k, v in medians.items()},
        "speedup_vs_botocore": round(medians["botocore"] / medians["asyncpg-iam"], 1),
        "speedup_vs_aiobotocore": round(medians["aiobotocore"] / medians["asyncpg-iam"], 1),
        "same_unsigned_prefix_as_botocore": same,
        "session_token": True,
        "python": platform.python_version(),
        "botocore": botocore.__version__,
        "machine": platform.machine(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    return result


def report(result: dict[str, object]) -> None:
    """Write the JSON and print the Markdown table."""
    out = Path(__file__).resolve().parent / "results" / "token.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    medians: dict[str, float] = result["median_us"]  # type: ignore[assignment]
    print("| signer | µs per token (median) | vs asyncpg-iam |")
    print("|---|---:|---:|")
    for name, value in medians.items():
        print(f"| {name} | {value:.1f} | {value / medians['asyncpg-iam']:.1f}x |")
    print(f"\nwritten to {out.relative_to(ROOT)}")


if __name__ == "__main__":
    report(asyncio.run(main()))
