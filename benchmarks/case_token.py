"""Microseconds per token: asyncpg-iam's signer vs botocore's and aiobotocore's.

Each library signs for the same endpoint, port, user, region and static key; each client is
created once (client creation is case 1's concern). Per round every variant signs a batch of
tokens, rounds rotate the order, and the figure is the median over rounds of the time per token:

- ``ours`` ``asyncpg_iam.build_auth_token`` (the pure signer);
- ``ours_provider`` ``await TokenProvider.token(target)``: the per-connect path of the pool
  (a cache read of frozen credentials, then the signer);
- ``botocore`` ``client.generate_db_auth_token`` of a botocore RDS client;
- ``aiobotocore`` ``await client.generate_db_auth_token`` of an aiobotocore RDS client.

These use long-term keys (no session token). ``bench_token.py`` (written for the signer's own
issue; still runnable alone with ``python -m benchmarks.bench_token``) measures the same three
signers with a session token, as temporary credentials have; this case runs it too and
reports its figures alongside.
"""

from __future__ import annotations

import functools
import secrets
from pathlib import Path

from asyncpg_iam import Credentials, IAMAuth, build_auth_token
from asyncpg_iam._auth import TokenProvider

from ._harness import (
    CaseResult,
    Environment,
    interleave,
    isolated_aws,
    new_figure,
    percentile,
    ratio,
    save_figure,
)
from ._shared import per_await, per_call

NAME = "token"
TITLE = "2. Microseconds per token"
NEEDS_ENVIRONMENT = False

HOST = "mydb.abcdefghijkl.us-east-1.rds.amazonaws.com"
PORT = 5432
USER = "app_user"
REGION = "us-east-1"
LABELS = {
    "ours": "asyncpg-iam build_auth_token",
    "ours_provider": "asyncpg-iam TokenProvider.token (pool path)",
    "botocore": "botocore generate_db_auth_token",
    "aiobotocore": "aiobotocore generate_db_auth_token",
}


async def run(env: Environment | None, quick: bool) -> CaseResult:
    """Time every signer over interleaved batches."""
    rounds = 5 if quick else 15
    batches = {"fast": 300 if quick else 3000, "slow": 50 if quick else 400}
    credentials = Credentials("AKIABENCHTOKEN000001", secrets.token_urlsafe(30))
    result = CaseResult(NAME, TITLE)
    with isolated_aws():
        samples, same = await _sign(credentials, rounds, batches)
    micros = {name: [s * 1e6 for s in values] for name, values in samples.items()}
    median = {name: percentile(values, 50) for name, values in micros.items()}
    result.figures = {
        "unit": "us per token",
        "rounds": rounds,
        "batch": batches,
        "median": median,
        "per_round": micros,
        "identical_token_to_botocore": same,
    }
    _rows(result, median, rounds)
    await _with_session_token(result)
    if not same:
        result.notes.append(
            "The token differed from botocore's for the same second (possible when a second "
            "boundary fell between the two calls)."
        )
    return result


async def _sign(
    credentials: Credentials, rounds: int, batches: dict[str, int]
) -> tuple[dict[str, list[float]], bool]:
    """Sample every signer; return seconds per token per round, and whether ours matched."""
    import botocore.session
    from aiobotocore.session import AioSession

    keys = {
        "aws_access_key_id": credentials.access_key,
        "aws_secret_access_key": credentials.secret_key,
    }
    sync_client = botocore.session.get_session().create_client("rds", region_name=REGION, **keys)
    provider = TokenProvider(IAMAuth(credentials=credentials))
    target = provider.target(HOST, PORT, USER)
    signed = {"host": HOST, "port": PORT, "user": USER, "region": REGION}
    async with AioSession().create_client("rds", region_name=REGION, **keys) as aio_client:
        try:
            fast, slow = batches["fast"], batches["slow"]
            variants = {
                "ours": per_call(
                    functools.partial(build_auth_token, **signed, credentials=credentials), fast
                ),
                "ours_provider": per_await(functools.partial(provider.token, target), fast),
                "botocore": per_call(
                    functools.partial(sync_client.generate_db_auth_token, HOST, PORT, USER), slow
                ),
                "aiobotocore": per_await(
                    functools.partial(aio_client.generate_db_auth_token, HOST, PORT, USER), slow
                ),
            }
            for measure in variants.values():  # warm caches and lazy imports, untimed
                await measure()
            samples = await interleave(variants, rounds)
            # The tokens are interchangeable: same inputs and second, same bytes.
            same = build_auth_token(
                **signed, credentials=credentials
            ) == sync_client.generate_db_auth_token(HOST, PORT, USER)
        finally:
            await provider.aclose()
    return samples, same


def _rows(result: CaseResult, median: dict[str, float], rounds: int) -> None:
    for name, label in LABELS.items():
        result.add(f"{label} (median of {rounds} rounds)", f"{median[name]:.1f} us")
    speedup = ratio(median["botocore"], median["ours"])
    result.add("botocore / ours", f"{speedup:.1f}x", ">= 10x", speedup >= 10)
    speedup_provider = ratio(median["botocore"], median["ours_provider"])
    result.add(
        "botocore / ours (TokenProvider path)",
        f"{speedup_provider:.1f}x",
        ">= 10x",
        speedup_provider >= 10,
    )
    aio = ratio(median["aiobotocore"], median["ours"])
    result.add("aiobotocore / ours", f"{aio:.1f}x")


async def _with_session_token(result: CaseResult) -> None:
    """Run issue 3's benchmark (benchmarks/bench_token.py) as is and report it alongside.

    The same comparison with a ~700-character session token, as temporary credentials carry.
    """
    from . import bench_token

    with isolated_aws():
        with_token = await bench_token.main()
    result.figures["bench_token_with_session_token"] = with_token
    medians = with_token["median_us"]
    assert isinstance(medians, dict)
    result.add(
        "with a session token (bench_token.py): asyncpg-iam / botocore / aiobotocore",
        f"{medians['asyncpg-iam']:.1f} / {medians['botocore']:.1f} / "
        f"{medians['aiobotocore']:.1f} us",
    )
    speedup_token = float(with_token["speedup_vs_botocore"])  # type: ignore[arg-type]
    result.add(
        "botocore / ours, with a session token",
        f"{speedup_token:.1f}x",
        ">= 10x",
        speedup_token >= 10,
    )


def plot(result: CaseResult, out: Path) -> None:
    """Bar chart of the median microseconds per token."""
    median = result.figures.get("median")
    if not median:
        return
    figure, axes = new_figure(8, 3.5)
    names = list(median)
    axes.barh([LABELS[n] for n in names], [median[n] for n in names], color="tab:blue")
    for index, name in enumerate(names):
        axes.text(median[name], index, f" {median[name]:.1f} us", va="center", fontsize=8)
    axes.set_xlabel("microseconds per token (median over rounds)")
    axes.set_title("Token signing cost")
    axes.invert_yaxis()
    axes.set_xlim(0, max(median.values()) * 1.25)
    result.plots.append(save_figure(figure, out / "token.png"))
