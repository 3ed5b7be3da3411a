"""What every benchmark case shares: the servers, the AWS environment, statistics and output.

`Environment` starts (as an `asyncpg_iam.testing.Sandbox`) one throwaway PostgreSQL and two RDS
IAM emulators in front of it, in the benchmark's own event loop: ``emu_any`` accepts any
password (the static-password floor) and ``emu_iam`` verifies every token (SigV4 signature
against a registered key, date, host, port, region, user). Both relay to the same backend, so
the only difference between the two paths is the verification itself. A static access key,
registered with both, is exported as ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` so every
signer (boto3, botocore, aiobotocore, asyncpg-iam) finds it through its default chain; cases
that need expiring credentials switch the environment to a `CredentialServer` with
`Environment.container_credentials`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import gc
import importlib.metadata
import json
import math
import os
import platform
import random
import secrets
import ssl
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from asyncpg_iam import Credentials, IAMAuth
from asyncpg_iam.testing import (
    AccessKey,
    CredentialServer,
    PostgresCluster,
    RDSIAMEmulator,
    Sandbox,
    isolated_aws_environment,
)
from asyncpg_iam.testing._isolation import patched_environ
from asyncpg_iam.testing._postgres import postmaster_pid

__all__ = [
    "CaseResult",
    "Environment",
    "Row",
    "balanced_orders",
    "block_median_interval",
    "interleave",
    "machine_info",
    "median_interval",
    "paired_ratio_interval",
    "percentile",
    "ratio",
    "summarize",
    "versions",
]

BENCH_ACCESS_KEY = "AKIABENCHMARKKEY0001"


# -- results -----------------------------------------------------------------------------------


@dataclasses.dataclass
class Row:
    """One line of the results table: a figure, and the target it is held to (if any)."""

    metric: str
    value: str
    target: str = ""
    met: bool | None = None

    @property
    def status(self) -> str:
        """Return "met", "MISSED" or "" (no target)."""
        if self.met is None:
            return ""
        return "met" if self.met else "MISSED"


@dataclasses.dataclass
class CaseResult:
    """What one case measured: table rows, raw figures for the JSON, notes and plot files."""

    name: str
    title: str
    rows: list[Row] = dataclasses.field(default_factory=list)
    figures: dict[str, Any] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)
    plots: list[str] = dataclasses.field(default_factory=list)
    seconds: float = 0.0
    error: str | None = None
    run: dict[str, Any] | None = None
    """The date, command and quick flag of the run that produced it, when not the header's."""

    def add(self, metric: str, value: str, target: str = "", met: bool | None = None) -> None:
        """Append a table row."""
        self.rows.append(Row(metric, value, target, met))


# -- statistics --------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Return the `q`-th percentile (0-100) with linear interpolation between ranks."""
    if not values:
        return math.nan
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100.0
    low = math.floor(position)
    high = math.ceil(position)
    if low == high:
        return ordered[low]
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def median_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """Return a distribution-free confidence interval for the median of `values`.

    The order statistics x(k) and x(n-k+1), with k the largest such that a Binomial(n, 1/2)
    falls below k with probability at most (1 - confidence) / 2. No resampling, so repeatable.
    With too few values for the confidence asked, the whole range.
    """
    ordered = sorted(values)
    n = len(ordered)
    if n == 0:
        return math.nan, math.nan
    tail = (1.0 - confidence) / 2.0
    below, k = 0.0, 0
    while k < n and below + math.comb(n, k) / 2**n <= tail:
        below += math.comb(n, k) / 2**n
        k += 1
    if k == 0:
        return ordered[0], ordered[-1]
    return ordered[k - 1], ordered[n - k]


def paired_ratio_interval(
    numerators: Sequence[float],
    denominators: Sequence[float],
    q: float = 50.0,
    *,
    confidence: float = 0.95,
    resamples: int = 1000,
) -> tuple[float, float]:
    """Return a bootstrap confidence interval for ``percentile(numerators, q) /
    percentile(denominators, q)``, resampling rounds (the i-th values of both stay together).

    Seeded, so a run's figures are repeatable from its samples.
    """
    n = len(numerators)
    if n == 0 or n != len(denominators):
        raise ValueError("paired_ratio_interval needs two non-empty samples of the same length")
    rng = random.Random(20261203)
    ratios = []
    for _ in range(resamples):
        picks = [rng.randrange(n) for _ in range(n)]
        ratios.append(
            ratio(
                percentile([numerators[i] for i in picks], q),
                percentile([denominators[i] for i in picks], q),
            )
        )
    tail = (1.0 - confidence) / 2.0 * 100.0
    return percentile(ratios, tail), percentile(ratios, 100.0 - tail)


def block_median_interval(
    values: Sequence[float],
    blocks: int,
    *,
    confidence: float = 0.95,
    resamples: int = 1000,
) -> tuple[float, float]:
    """Return a bootstrap confidence interval for the median of `values`, measured in `blocks`
    consecutive blocks of equal length, resampling whole blocks.

    Values of one block share what the block drew (its particular pools and connections), so
    they are not independent: `median_interval`, which treats them as such, comes out too
    narrow when blocks differ. Seeded, so a run's figures are repeatable from its samples.
    """
    if blocks < 1 or not values or len(values) % blocks:
        raise ValueError(f"{len(values)} values do not make {blocks} blocks of equal length")
    size = len(values) // blocks
    groups = [list(values[start : start + size]) for start in range(0, len(values), size)]
    rng = random.Random(20261207)
    medians = []
    for _ in range(resamples):
        picked = [value for _ in groups for value in groups[rng.randrange(blocks)]]
        medians.append(percentile(picked, 50))
    tail = (1.0 - confidence) / 2.0 * 100.0
    return percentile(medians, tail), percentile(medians, 100.0 - tail)


def summarize(values: Sequence[float]) -> dict[str, float]:
    """Return n, min, p50, p95, p99, max and mean of `values`."""
    if not values:
        return {"n": 0}
    return {
        "n": len(values),
        "min": min(values),
        "p50": percentile(values, 50),
        "p95": percentile(values, 95),
        "p99": percentile(values, 99),
        "max": max(values),
        "mean": sum(values) / len(values),
    }


def ratio(numerator: float, denominator: float) -> float:
    """Return numerator / denominator (nan when the denominator is 0)."""
    return numerator / denominator if denominator else math.nan


def balanced_orders(count: int) -> list[list[int]]:
    """A Williams design for `count` variants: orders of ``range(count)`` in which each variant
    takes each position, and follows each other variant, equally often.

    `count` orders when `count` is even, ``2 * count`` (each also reversed) when it is odd. Row
    ``k`` is the first row ``0, 1, n-1, 2, n-2, ...`` with ``k`` added to every entry, mod ``n``.
    """
    if count < 1:
        raise ValueError(f"a design needs at least one variant, not {count}")
    first = [0]
    low, high = 1, count - 1
    while low <= high:
        first.append(low)
        low += 1
        if low <= high:
            first.append(high)
            high -= 1
    rows = [[(entry + shift) % count for entry in first] for shift in range(count)]
    if count % 2:
        rows += [row[::-1] for row in rows]
    return _chained(rows)


def _chained(rows: list[list[int]]) -> list[list[int]]:
    """`rows` in an order in which, run one after another and round again from the last to the
    first, no row begins with the variant that ended the row before it, and no two rows meet
    on the same pair of variants; `rows` as they are where no such order exists (one or two
    variants).

    Rounds run back to back, so the last variant of one round precedes the first of the next:
    a variant right after itself ran about 1 % faster in the pool cases, and the plain Williams
    rows for three variants let two of them, never the third, do so once a cycle.
    """
    if len(rows[0]) < 3:
        return rows
    order, pairs = [0], set()

    def extend() -> bool:
        last = rows[order[-1]][-1]
        if len(order) == len(rows):
            return last != rows[order[0]][0] and (last, rows[order[0]][0]) not in pairs
        for index, row in enumerate(rows):
            pair = (last, row[0])
            if index in order or pair[0] == pair[1] or pair in pairs:
                continue
            order.append(index)
            pairs.add(pair)
            if extend():
                return True
            order.pop()
            pairs.discard(pair)
        return False

    return [rows[index] for index in order] if extend() else rows


async def interleave(
    variants: dict[str, Callable[[], Awaitable[float]]], rounds: int, first_round: int = 0
) -> dict[str, list[float]]:
    """Run each variant once per round, in the orders of a balanced design, and collect.

    Each callable measures one sample and returns it; machine drift over the run hits every
    variant alike. Round ``r`` runs in order ``r`` (mod its length) of `balanced_orders`, so
    over every full cycle of the design each variant runs at each position, and right after
    each other variant, equally often, and (from three variants on) none runs right after
    itself across two rounds: what ran just before (creating a boto3 client, say) measurably
    slows the next connect, and in the pool cases the first pool of a round ran up to 2 %
    faster than the last, and a pool right after itself about 1 % faster. A caller that
    measures in blocks passes the block's `first_round` so that the blocks continue the design
    rather than each restart it.
    """
    names = list(variants)
    samples: dict[str, list[float]] = {name: [] for name in names}
    orders = balanced_orders(len(names))
    for index in range(rounds):
        for position in orders[(first_round + index) % len(orders)]:
            name = names[position]
            samples[name].append(await variants[name]())
        if index % 50 == 49:
            gc.collect()
    return samples


# -- machine and versions ----------------------------------------------------------------------


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def machine_info() -> dict[str, Any]:
    """Describe the machine: CPU count and model, platform, Python implementation."""
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "python_implementation": platform.python_implementation(),
    }


def versions() -> dict[str, str]:
    """Return the versions of Python and every library compared."""
    found = {"python": sys.version.split()[0]}
    for name in ("asyncpg-iam", "asyncpg", "botocore", "aiobotocore", "boto3", "aiohttp"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


# -- environment -------------------------------------------------------------------------------


class Environment:
    """One PostgreSQL, two emulators in front of it and a static key every signer can find.

    A thin layer over `asyncpg_iam.testing.Sandbox`. Use as ``async with Environment() as
    env``; it needs the PostgreSQL server binaries.
    """

    def __init__(self, *, max_connections: int = 1200, pin_cpus: bool = True) -> None:
        self.pin_cpus = pin_cpus
        """Whether `pinned` splits the CPUs between this process and PostgreSQL."""
        self.credentials = Credentials(BENCH_ACCESS_KEY, secrets.token_urlsafe(30))
        import trustme

        # Both emulators serve certificates of one CA, the one the environment names.
        self.sandbox = Sandbox(
            postgres_settings={"max_connections": str(max_connections)},
            access_key=AccessKey(self.credentials.access_key, self.credentials.secret_key),
            credential_server=False,
            ca=trustme.CA(),
        )
        self._stack = contextlib.AsyncExitStack()
        self.cluster: PostgresCluster | None = None
        self.emu_any: RDSIAMEmulator | None = None
        self.emu_iam: RDSIAMEmulator | None = None
        self.server_version = ""
        self._ssl_any: ssl.SSLContext | None = None
        self._ssl_iam: ssl.SSLContext | None = None

    async def __aenter__(self) -> Environment:
        try:
            sandbox = await self._stack.enter_async_context(self.sandbox)
            # boto3 and botocore read the region from AWS_DEFAULT_REGION.
            self._stack.enter_context(
                patched_environ({"AWS_DEFAULT_REGION": sandbox.emulator.region})
            )
            self.cluster = sandbox.cluster
            self.emu_iam = sandbox.emulator
            self.emu_any = await sandbox.add_emulator(accept_any_password=True)
            self._ssl_any = self.emu_any.client_ssl_context()
            self._ssl_iam = self.emu_iam.client_ssl_context()
            import asyncpg

            con = await asyncpg.connect(**self.direct_kwargs())
            try:
                self.server_version = str(await con.fetchval("SHOW server_version"))
            finally:
                await con.close()
        except BaseException:
            await self._stack.aclose()
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._stack.aclose()

    @property
    def user(self) -> str:
        """The database user every case logs in as."""
        assert self.cluster is not None
        return self.cluster.user

    @property
    def database(self) -> str:
        """The database every case connects to."""
        assert self.cluster is not None
        return self.cluster.database

    def any_kwargs(self) -> dict[str, Any]:
        """Return connect arguments for the accept-any emulator (no password included)."""
        assert self.emu_any is not None
        return {
            "host": self.emu_any.host,
            "port": self.emu_any.port,
            "user": self.user,
            "database": self.database,
            "ssl": self._ssl_any,
        }

    def iam_kwargs(self) -> dict[str, Any]:
        """Return connect arguments for the verifying emulator (no password included)."""
        assert self.emu_iam is not None
        return {
            "host": self.emu_iam.host,
            "port": self.emu_iam.port,
            "user": self.user,
            "database": self.database,
            "ssl": self._ssl_iam,
        }

    def direct_kwargs(self) -> dict[str, Any]:
        """Return connect arguments for the PostgreSQL server itself (TLS, trust auth)."""
        assert self.cluster is not None
        server = self.cluster.server
        return {
            "host": server.host,
            "port": server.port,
            "user": server.user,
            "database": server.database,
            "ssl": self.cluster.client_ssl_context(),
        }

    @property
    def signing_host(self) -> str:
        """The RDS endpoint name tokens are signed for."""
        assert self.emu_iam is not None
        return self.emu_iam.endpoint

    @property
    def signing_port(self) -> int:
        """The port tokens are signed for."""
        assert self.emu_iam is not None
        return self.emu_iam.endpoint_port

    @property
    def region(self) -> str:
        """The region tokens are signed for."""
        assert self.emu_iam is not None
        return self.emu_iam.region

    def iam_auth(self, **overrides: Any) -> IAMAuth:
        """Return IAM settings that sign for the verifying emulator's endpoint."""
        return IAMAuth(signing_host=self.signing_host, **overrides)

    @contextlib.contextmanager
    def pinned(self) -> Iterator[dict[str, list[int]] | None]:
        """Within the block, this process and the PostgreSQL server each run on their own CPUs.

        This process (the client, and the in-process emulators) gets the lower half of the
        CPUs it may use, PostgreSQL (its postmaster, the processes running now and every
        backend it forks meanwhile) the upper half; both get them all back afterwards. Yields
        the split, or None where there is nothing to split (one CPU, no `sched_setaffinity`,
        or ``--no-pin``).

        On a 2-CPU machine the client and PostgreSQL's backends otherwise compete for both
        CPUs, and where the scheduler puts them moves a round's throughput. On CPUs of their
        own, as a client and its database server are in production, the client's CPU bounds a
        pool's throughput, so what the pool adds per operation shows in full (see
        docs/benchmarks.md for what it did to the spread). Cases that start servers of their
        own do not use it: those would inherit this process's half.
        """
        mine = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_setaffinity") else []
        if not self.pin_cpus or len(mine) < 2 or self.cluster is None:
            yield None
            return
        half = len(mine) // 2
        client, server = mine[:half], mine[half:]
        try:
            postmaster = postmaster_pid(self.cluster.data_dir)
            _set_affinity([postmaster, *_children_of(postmaster)], server)
        except PermissionError:  # PostgreSQL runs as another user, and this one may not
            yield None
            return
        os.sched_setaffinity(0, client)
        try:
            yield {"client": client, "postgres": server}
        finally:
            os.sched_setaffinity(0, mine)
            _set_affinity([postmaster, *_children_of(postmaster)], mine)

    @contextlib.contextmanager
    def container_credentials(self, server: CredentialServer) -> Iterator[None]:
        """Within the block, the default chain finds `server`'s credentials, not the static key.

        Keys the server issues are registered with the verifying emulator.
        """
        assert self.emu_iam is not None
        server.add_emulator(self.emu_iam)
        env: dict[str, str | None] = {"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None}
        env.update(server.env())
        with patched_environ(env):
            yield


def _children_of(pid: int) -> list[int]:
    """The processes whose parent is `pid` (from /proc)."""
    children = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError):
            stat = Path(f"/proc/{entry}/stat").read_text()
            # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                children.append(int(entry))
    return children


def _set_affinity(pids: list[int], cpus: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):  # a backend that just exited
            os.sched_setaffinity(pid, cpus)


def isolated_aws() -> contextlib.AbstractContextManager[Path]:
    """Hide the host's AWS configuration (for cases that run without an `Environment`)."""
    return isolated_aws_environment()


# -- output ------------------------------------------------------------------------------------


def _json_default(value: Any) -> Any:
    if isinstance(value, (dt.datetime, dt.date)):
        return value.isoformat()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)


def _clean(value: Any) -> Any:
    """Replace non-finite floats (not valid JSON) with None, recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def write_json(path: Path, header: dict[str, Any], results: list[CaseResult]) -> None:
    """Write the header and every case's rows and raw figures as JSON."""
    document = {
        **header,
        "cases": {
            result.name: {
                "title": result.title,
                "seconds": round(result.seconds, 2),
                "error": result.error,
                "rows": [dataclasses.asdict(row) for row in result.rows],
                "notes": result.notes,
                "plots": result.plots,
                "figures": result.figures,
                **({"run": result.run} if result.run else {}),
            }
            for result in results
        },
    }
    path.write_text(json.dumps(_clean(document), indent=1, default=_json_default) + "\n")


def merge_results(
    path: Path, header: dict[str, Any], results: list[CaseResult], *, order: list[str]
) -> tuple[dict[str, Any], list[CaseResult]]:
    """Return `results` merged into the document at `path`: new cases replace old ones.

    Cases kept from the old document are marked with the run that produced them; the header
    becomes the new run's.
    """
    old = json.loads(path.read_text())
    fresh = {result.name for result in results}
    merged = list(results)
    for name, case in old.get("cases", {}).items():
        if name in fresh:
            continue
        kept = CaseResult(
            name,
            case["title"],
            rows=[Row(**row) for row in case["rows"]],
            figures=case["figures"],
            notes=case["notes"],
            plots=case["plots"],
            seconds=case["seconds"],
            error=case["error"],
        )
        kept.run = case.get("run") or {
            "date": old["date"],
            "command": old["command"],
            "quick": old["quick"],
        }
        merged.append(kept)
    rank = {name: index for index, name in enumerate(order)}
    merged.sort(key=lambda result: (rank.get(base_name(result.name), len(rank)), result.name))
    return header, merged


#: What a case run on another event loop than asyncio is named after: ``pool_overhead@uvloop``.
LOOP_SEPARATOR = "@"


def base_name(name: str) -> str:
    """Return a case's name without its event loop (``connect@uvloop`` -> ``connect``)."""
    return name.split(LOOP_SEPARATOR, 1)[0]


def _loop_table(result: CaseResult, other: CaseResult, loop: str) -> list[str]:
    """Return one table with a value column per event loop (rows matched by their figure)."""
    theirs = {row.metric: row for row in other.rows}
    lines = [f"| figure | asyncio | {loop} | target | |", "|---|---|---|---|---|"]
    for row in result.rows:
        twin = theirs.pop(row.metric, None)
        status = " / ".join(
            {"met": "met", "MISSED": "**missed**", "": ""}[r.status]
            for r in (row, twin)
            if r is not None and r.status
        )
        value = twin.value if twin is not None else ""
        lines.append(f"| {row.metric} | {row.value} | {value} | {row.target} | {status} |")
    for row in theirs.values():
        status = {"met": "met", "MISSED": "**missed**", "": ""}[row.status]
        lines.append(f"| {row.metric} |  | {row.value} | {row.target} | {status} |")
    return lines


def markdown(header: dict[str, Any], results: list[CaseResult], *, heading: str = "##") -> str:
    """Return the results as Markdown: what ran where, then one table per case."""
    machine = header["machine"]
    found = header["versions"]
    lines = [
        f"{heading} Benchmark results",
        "",
        f"Run {header['date']} on {machine['cpu_count']} CPUs ({machine['cpu_model']}), "
        f"{machine['platform']}; PostgreSQL {header.get('postgresql', '?')}"
        + (" -- **quick run (smoke test figures, not for quoting)**" if header["quick"] else "")
        + ".",
        "",
        "Versions: " + ", ".join(f"{name} {version}" for name, version in found.items()) + ".",
        "",
        f"Command: `{header['command']}`; event loop: {header.get('loop', 'asyncio')}.",
        "",
    ]
    by_name = {result.name: result for result in results}
    for result in results:
        base, _, loop = result.name.partition(LOOP_SEPARATOR)
        if loop and base in by_name:
            continue  # shown as a column of the asyncio run's table
        others = [
            (name.partition(LOOP_SEPARATOR)[2], other)
            for name, other in by_name.items()
            if loop == "" and name.startswith(base + LOOP_SEPARATOR)
        ]
        lines += [f"{heading}# {result.title}" + (f" ({loop})" if loop else ""), ""]
        for other_loop, other in others:
            lines += [
                f"The {other_loop} column: `{(other.run or header)['command']}`, "
                f"{(other.run or header)['date']}.",
                "",
            ]
        if result.run:
            quick = " (quick run)" if result.run.get("quick") else ""
            lines += [
                f"From an earlier run{quick}, {result.run['date']}: `{result.run['command']}`",
                "",
            ]
        if result.error is not None:
            lines += [f"Failed: `{result.error}`", ""]
        if result.rows and others:
            lines += _loop_table(result, others[0][1], others[0][0])
            lines.append("")
        elif result.rows:
            lines += ["| figure | value | target | |", "|---|---|---|---|"]
            for row in result.rows:
                status = {"met": "met", "MISSED": "**missed**", "": ""}[row.status]
                lines.append(f"| {row.metric} | {row.value} | {row.target} | {status} |")
            lines.append("")
        for note in result.notes:
            lines += [note, ""]
    return "\n".join(lines).rstrip() + "\n"


def header(*, quick: bool, command: str, env: Environment | None) -> dict[str, Any]:
    """Return what every results file records: date, machine, versions, command."""
    return {
        "date": dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat(),
        "quick": quick,
        "command": command,
        "machine": machine_info(),
        "versions": versions(),
        "postgresql": env.server_version if env is not None else None,
    }


def new_figure(width: float = 8.0, height: float = 4.5, *, rows: int = 1) -> Any:
    """Return a matplotlib (figure, axes) pair on the Agg backend; `rows` stacks axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(rows, 1, figsize=(width, height), dpi=100, sharex=rows > 1)


def save_figure(figure: Any, path: Path) -> str:
    """Save and close `figure`; return the file name."""
    import matplotlib.pyplot as plt

    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path.name


def now() -> float:
    """Return a high-resolution timestamp in seconds (for intervals only)."""
    return time.perf_counter()
