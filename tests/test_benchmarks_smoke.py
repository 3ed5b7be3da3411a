"""The benchmark suite runs from the command line and writes its result files."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from asyncpg_iam.testing import PostgresServer
from asyncpg_iam.testing._postgres import postmaster_pid
from benchmarks._harness import Environment
from tests._support import direct_kwargs

ROOT = Path(__file__).resolve().parent.parent


def _run_quick(case: str, tmp_path: Path, *, timeout: float = 300) -> Any:
    """Run ``python -m benchmarks --quick --only CASE`` into `tmp_path`; return results.json."""
    completed = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--only", case, "--output", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    return json.loads((tmp_path / "results.json").read_text())


def test_quick_token_benchmark_writes_json_markdown_and_plot(tmp_path: Path) -> None:
    """`python -m benchmarks --quick --only token` writes results.json, results.md and a PNG."""
    document = _run_quick("token", tmp_path, timeout=120)
    assert document["quick"] is True
    assert set(document["versions"]) >= {
        "python",
        "asyncpg",
        "botocore",
        "aiobotocore",
        "asyncpg-iam",
    }
    assert document["machine"]["cpu_count"] >= 1
    token = document["cases"]["token"]
    assert token["error"] is None
    assert {"ours", "botocore", "aiobotocore"} <= set(token["figures"]["median"])
    assert "Microseconds per token" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "token.png").read_bytes().startswith(b"\x89PNG")


def test_unknown_case_is_refused(tmp_path: Path) -> None:
    """An unknown --only name exits with a usage error naming the valid cases."""
    completed = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--only", "nosuch", "--output", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert completed.returncode == 2
    assert "connect" in completed.stderr
    assert not (tmp_path / "results.json").exists()


def test_quick_fleet_simulation_keeps_other_cases(tmp_path: Path) -> None:
    """`--quick --only fleet` meets the throttle targets, plots each scenario, keeps old cases."""
    earlier = {
        "date": "2026-01-01T00:00:00+00:00",
        "quick": False,
        "command": "python -m benchmarks",
        "machine": {"cpu_count": 2, "cpu_model": "x", "platform": "p"},
        "versions": {"python": "3"},
        "postgresql": None,
        "cases": {
            "token": {
                "title": "2. Microseconds per token",
                "seconds": 1.0,
                "error": None,
                "rows": [{"metric": "m", "value": "v", "target": "", "met": None}],
                "notes": [],
                "plots": [],
                "figures": {},
            }
        },
    }
    (tmp_path / "results.json").write_text(json.dumps(earlier))
    document = _run_quick("fleet", tmp_path)
    assert set(document["cases"]) == {"token", "fleet"}
    assert document["cases"]["token"]["run"]["date"] == earlier["date"]
    fleet = document["cases"]["fleet"]
    targets = [row for row in fleet["rows"] if row["met"] is not None]
    assert len(targets) >= 16
    assert all(row["met"] for row in targets), [r for r in targets if not r["met"]]
    markdown = (tmp_path / "results.md").read_text()
    assert "From an earlier run, 2026-01-01T00:00:00+00:00" in markdown
    assert "Fleet simulation" in markdown
    for scenario in ("deploy", "rolling", "steady", "drop"):
        assert (tmp_path / f"fleet_{scenario}.png").read_bytes().startswith(b"\x89PNG")


def test_median_interval_is_the_binomial_order_statistics() -> None:
    """The benchmarks' confidence interval for a median: x(k) and x(n-k+1), by the binomial."""
    from benchmarks._harness import median_interval

    # n = 10: P(Bin(10, 1/2) <= 1) = 11/1024 <= 2.5 % < P(<= 2) = 56/1024, so k = 2.
    assert median_interval([float(v) for v in range(10, 0, -1)]) == (2.0, 9.0)
    # n = 160 (the pool-overhead case): k = 68.
    assert median_interval([float(v) for v in range(1, 161)]) == (68.0, 93.0)
    # Too few values for 95 %: the whole range.
    assert median_interval([3.0, 1.0, 2.0]) == (1.0, 3.0)
    assert median_interval([0.5]) == (0.5, 0.5)


def test_balanced_orders_put_each_variant_at_each_place_and_after_each_other_alike() -> None:
    """The Williams design: every order a permutation, each variant at each position equally
    often, each ordered pair of different variants adjacent equally often."""
    from collections import Counter

    from benchmarks._harness import balanced_orders

    for count in range(1, 8):
        orders = balanced_orders(count)
        assert len(orders) == (count if count % 2 == 0 else 2 * count)
        assert all(sorted(order) == list(range(count)) for order in orders)
        places = Counter(
            (variant, place) for order in orders for place, variant in enumerate(order)
        )
        assert set(places.values()) == {len(orders) // count}
        assert len(places) == count * count
        pairs = Counter(pair for order in orders for pair in itertools.pairwise(order))
        if count > 1:
            assert len(pairs) == count * (count - 1)
            assert set(pairs.values()) == {len(orders) // count}
    with pytest.raises(ValueError, match="at least one variant"):
        balanced_orders(0)


def test_balanced_orders_chain_so_no_variant_runs_right_after_itself() -> None:
    """From three variants on, the orders run back to back (and round again) never put a
    variant right after itself, and no two orders meet on the same pair; with three, each
    ordered pair of different variants is adjacent exactly three times a cycle."""
    from collections import Counter

    from benchmarks._harness import balanced_orders

    for count in range(3, 9):
        orders = balanced_orders(count)
        joins = [
            (before[-1], after[0])
            for before, after in zip(orders, orders[1:] + orders[:1], strict=True)
        ]
        assert all(last != first for last, first in joins), (count, orders)
        assert len(set(joins)) == len(joins)
    sequence = [variant for order in balanced_orders(3) for variant in order]
    adjacent = Counter(zip(sequence, sequence[1:] + sequence[:1], strict=True))
    assert adjacent == {(a, b): 3 for a in range(3) for b in range(3) if a != b}


def test_block_median_interval_resamples_whole_blocks() -> None:
    """Blocks that differ widen the interval over blocks beyond the interval over rounds,
    which treats every round as independent; it holds the median, repeats, and refuses
    blocks of unequal length."""
    import random

    from benchmarks._harness import block_median_interval, median_interval, percentile

    rng = random.Random(11)
    offsets = [rng.gauss(0, 0.01) for _ in range(9)]
    values = [1.0 + offset + rng.gauss(0, 0.004) for offset in offsets for _ in range(20)]
    low, high = block_median_interval(values, 9, resamples=300)
    assert low <= percentile(values, 50) <= high
    round_low, round_high = median_interval(values)
    assert high - low > 1.5 * (round_high - round_low)
    assert block_median_interval(values, 9, resamples=300) == (low, high)
    with pytest.raises(ValueError, match="blocks of equal length"):
        block_median_interval(values[:-1], 9)


async def test_interleaved_blocks_continue_the_design() -> None:
    """Blocks that pass their first round run the orders one call of all their rounds runs,
    and over a cycle of the design each variant opens a round equally often."""
    from collections import Counter

    from benchmarks._harness import interleave

    def recorder(ran: list[str]) -> dict[str, Any]:
        def variant(name: str) -> Any:
            async def measure() -> float:
                ran.append(name)
                return float(len(ran))

            return measure

        return {name: variant(name) for name in ("a", "b", "c")}

    whole: list[str] = []
    await interleave(recorder(whole), 12)
    blocks: list[str] = []
    for first in (0, 4, 8):
        await interleave(recorder(blocks), 4, first_round=first)
    assert blocks == whole
    assert Counter(whole[::3][:6]) == {"a": 2, "b": 2, "c": 2}


async def test_blocks_turn_the_order_their_pools_are_made_in(
    postgres_server: PostgresServer,
) -> None:
    """Each block makes its pools in the order of the last block's turned by one, so over a
    multiple of their number of blocks each pool is made at each place equally often; the
    rounds still run in the design's orders and every pool is measured in every round."""
    from collections import Counter

    from benchmarks.case_pool_overhead import run_blocks

    made: list[str] = []

    def factory(name: str) -> Any:
        async def make() -> Any:
            made.append(name)
            kwargs = direct_kwargs(postgres_server)
            del kwargs["iam"]
            return await asyncpg.create_pool(**kwargs, min_size=1, max_size=1)

        return make

    async def measure(pool: Any, _seconds: float) -> float:
        return float(await pool.fetchval("SELECT 1"))

    @contextlib.asynccontextmanager
    async def setup() -> Any:
        yield {name: factory(name) for name in ("a", "b", "c")}, measure

    samples = await run_blocks(setup, 6, 2, 0.01)
    assert made[:9] == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert Counter(zip(made, itertools.cycle(range(3)))) == {
        (name, place): 2 for name in "abc" for place in range(3)
    }
    assert samples == {name: [1.0] * 12 for name in "abc"}


def test_paired_ratio_interval_brackets_the_ratio_and_repeats() -> None:
    """The bootstrap interval of a ratio of medians holds the ratio, narrows with more rounds,
    is repeatable, and refuses samples that are not paired."""
    import random

    import pytest

    from benchmarks._harness import paired_ratio_interval, percentile

    rng = random.Random(7)
    fair = [10.0 + rng.gauss(0, 1.5) for _ in range(2000)]
    iam = [value * 1.01 + rng.gauss(0, 0.5) for value in fair]
    point = percentile(iam, 50) / percentile(fair, 50)
    low, high = paired_ratio_interval(iam, fair, resamples=200)
    assert low <= point <= high
    assert high - low < 0.02
    assert paired_ratio_interval(iam, fair, resamples=200) == (low, high)
    few_low, few_high = paired_ratio_interval(iam[:100], fair[:100], resamples=200)
    assert few_high - few_low > high - low
    with pytest.raises(ValueError, match="same length"):
        paired_ratio_interval(iam, fair[:-1])


def test_quick_proxy_case_counts_no_pins_for_this_pool(tmp_path: Path) -> None:
    """`--quick --only proxy` counts 0 sessions pinned by what this pool, its engine and its
    Starlette app send on their own, and every session of plain asyncpg.Pool pinned."""
    clients = _run_quick("proxy", tmp_path)["cases"]["proxy"]["figures"]["clients"]
    for name in ("ours", "sqlalchemy_ours", "starlette"):
        assert clients[name]["sessions"] >= 1
        assert clients[name]["pinned"] == 0, clients[name]
    assert clients["asyncpg"]["pinned_by_cause"] == {"library": clients["asyncpg"]["sessions"]}


async def test_pinned_gives_this_process_and_postgresql_cpus_of_their_own() -> None:
    """`Environment.pinned` splits the CPUs: this process on one part, PostgreSQL (the
    postmaster and every backend forked meanwhile) on the other; both get them all back."""
    mine = os.sched_getaffinity(0)
    if len(mine) < 2:
        pytest.skip("one CPU: nothing to split")
    async with Environment(max_connections=20) as env:
        assert env.cluster is not None
        postmaster = postmaster_pid(env.cluster.data_dir)
        with env.pinned() as cpus:
            assert cpus is not None
            client, server = set(cpus["client"]), set(cpus["postgres"])
            assert client
            assert server
            assert not client & server
            assert client | server == mine
            assert os.sched_getaffinity(0) == client
            assert os.sched_getaffinity(postmaster) == server
            con = await asyncpg.connect(**env.direct_kwargs())
            try:
                backend = await con.fetchval("SELECT pg_backend_pid()")
                assert os.sched_getaffinity(backend) == server
            finally:
                await con.close()
        assert os.sched_getaffinity(0) == mine
        assert os.sched_getaffinity(postmaster) == mine
    unpinned = Environment(pin_cpus=False)
    unpinned.cluster = env.cluster  # started or not, --no-pin splits nothing
    with unpinned.pinned() as cpus:
        assert cpus is None
        assert os.sched_getaffinity(0) == mine
