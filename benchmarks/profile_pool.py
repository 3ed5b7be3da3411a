"""Where a pool's per-operation time goes, by measures that do not move with the machine's load.

``python -m benchmarks.profile_pool [--ops N] [--loop uvloop] [--path direct,emulator]``
``python -m benchmarks.profile_pool --connect [--ops N] [--syscalls | --until-handout]``

Runs case 6's workload (min_size = max_size = 10, 20 workers looping acquire, ``SELECT 1``,
release) a fixed number of operations on ``asyncpg.Pool`` and on ``asyncpg_iam.Pool``, in the
same process, interleaved, and reports per operation:

- **Python calls** (cProfile's count of function calls, C functions included), by function
  where the two pools differ: exact and repeatable;
- **instructions** executed by this process (valgrind's callgrind, only when run under it:
  ``valgrind --tool=callgrind --collect-atstart=no python -m benchmarks.profile_pool
  --callgrind``; the measured stretches are switched on and off through callgrind's client
  requests, compiled into a small helper with the C compiler). The emulator runs in this
  process, so on that path its relay work is counted too, alike for both pools;
- **CPU microseconds** (``time.process_time``), which a loaded machine still moves a little;
- with ``--syscalls``, **system calls** by name (``strace -c`` attached to this process, every
  thread, over one more sample per pool): the kernel work callgrind does not see.

With ``--connect`` it profiles case 1's connect pair instead: one new connection per acquire
(max_size 1, the connection expired before release), through the verifying emulator, of
``asyncpg.Pool`` with a token signed once as a static password (the fair floor, ``f_pool``) and
of ``asyncpg_iam.Pool`` (``e_pool``); the figures are then per connect. With
``--until-handout`` they count only the stretch case 1 times, from the call of ``acquire()`` to
the handout (`Window`): the pool defers its bookkeeping of a new connection until after it,
so a whole connect's count holds work that costs CPU but no connect latency.

Instruction and call counts are properties of the code path, not of the machine's speed: they
say what the pool adds, where a throughput ratio on a shared machine can only bound it.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import ctypes
import os
import pstats
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg

import asyncpg_iam

from ._harness import Environment, percentile

POOL_SIZE = 10
WORKERS = 20

_HELPER_SOURCE = r"""
#include <valgrind/callgrind.h>
void cg_toggle(void) { CALLGRIND_TOGGLE_COLLECT; }
void cg_dump(const char *label) { CALLGRIND_DUMP_STATS_AT(label); }
void cg_zero(void) { CALLGRIND_ZERO_STATS; }
"""


class Callgrind:
    """Switch callgrind's collection on and off around a stretch, and read what it counted."""

    def __init__(self, out_dir: Path) -> None:
        build = Path(tempfile.mkdtemp(prefix="cg_helper"))
        (build / "cg.c").write_text(_HELPER_SOURCE)
        subprocess.run(
            ["cc", "-shared", "-fPIC", "-O1", "-o", str(build / "cg.so"), str(build / "cg.c")],
            check=True,
        )
        self._lib = ctypes.CDLL(str(build / "cg.so"))
        self._out_dir = out_dir
        self._pid = os.getpid()

    @staticmethod
    def running() -> bool:
        """Tell whether this process runs under valgrind."""
        return "vgpreload" in os.environ.get("LD_PRELOAD", "")

    def start(self) -> None:
        """Count from zero, collecting from now."""
        self.zero()
        self.toggle()

    def zero(self) -> None:
        """Forget what was counted so far (collection stays as it is)."""
        self._lib.cg_zero()

    def toggle(self) -> None:
        """Switch collection on if it is off, off if it is on."""
        self._lib.cg_toggle()

    def stop(self, label: str) -> int:
        """Stop collecting, dump the counts under `label`; return the instructions counted."""
        self._lib.cg_toggle()
        return self.dump(label)

    def dump(self, label: str) -> int:
        """Dump the counts under `label`; return the instructions counted."""
        before = set(self._out_dir.glob(f"callgrind.out.{self._pid}*"))
        self._lib.cg_dump(label.encode())
        after = set(self._out_dir.glob(f"callgrind.out.{self._pid}*")) - before
        for path in after:
            for line in path.read_text(errors="replace").splitlines():
                if line.startswith(("summary:", "totals:")):
                    return int(line.split()[1])
        raise RuntimeError("callgrind wrote no dump: run with --collect-atstart=no")


class Strace:
    """Count this process's system calls (every thread) over a stretch, with ``strace -c``."""

    def __init__(self) -> None:
        if shutil.which("strace") is None:
            raise SystemExit("--syscalls: strace is not installed")

    async def count(self, work: Any, pool: Any, ops: int) -> dict[str, int]:
        """Run ``work(pool, ops)`` under strace; return the system calls made, by name."""
        tracer, out = self._attach()
        try:
            said = ""
            while "attached" not in said:  # the stretch starts once every thread is traced
                if tracer.poll() is not None:
                    raise RuntimeError(f"strace could not attach: {said.strip()}")
                await asyncio.sleep(0.05)
                said += tracer.stderr.read() or ""  # type: ignore[union-attr]
            await work(pool, ops)
        finally:
            counts = self._detach(tracer, out)
        return counts

    @staticmethod
    def _attach() -> tuple[subprocess.Popen[str], Path]:
        handle, name = tempfile.mkstemp(prefix="strace", suffix=".txt")
        os.close(handle)
        tracer = subprocess.Popen(
            ["strace", "-c", "-f", "-o", name, "-p", str(os.getpid())],
            stderr=subprocess.PIPE,
            text=True,
        )
        assert tracer.stderr is not None
        os.set_blocking(tracer.stderr.fileno(), False)
        return tracer, Path(name)

    @staticmethod
    def _detach(tracer: subprocess.Popen[str], out: Path) -> dict[str, int]:
        tracer.send_signal(signal.SIGINT)
        tracer.wait()
        counts = strace_counts(out.read_text())
        out.unlink()
        return counts


def strace_counts(summary: str) -> dict[str, int]:
    """Return the calls by system call name from ``strace -c``'s summary table."""
    counts: dict[str, int] = {}
    for line in summary.splitlines():
        # "% time  seconds  usecs/call  calls  [errors]  syscall": the errors column may be blank.
        fields = line.split()
        if len(fields) >= 5 and fields[0][0].isdigit() and fields[-1] != "total":
            counts[fields[-1]] = int(fields[3])
    return counts


async def _operations(pool: Any, count: int) -> None:
    """Run `count` acquire + ``SELECT 1`` + release, spread over the workers (case 6's loop)."""

    async def worker(n: int) -> None:
        for _ in range(n):
            async with pool.acquire() as con:
                await con.fetchval("SELECT 1")

    share, extra = divmod(count, WORKERS)
    await asyncio.gather(*(worker(share + (i < extra)) for i in range(WORKERS)))


async def _connects(pool: Any, count: int, window: Window | None = None) -> None:
    """Open `count` new connections through `pool` (case 1's pool sample, untimed); with a
    `window`, its ``begin()`` and ``end()`` are called around each acquire."""
    for _ in range(count):
        if window is not None:
            window.begin()
            proxy = await pool.acquire()
            window.end()
        else:
            proxy = await pool.acquire()
        await pool.expire_connections()
        await pool.release(proxy)


def _calls(stats: pstats.Stats) -> dict[str, int]:
    """Return calls by function (``file:line(name)``, shortened) from cProfile's stats."""
    found: dict[str, int] = {}
    for (file, line, name), (_cc, calls, *_rest) in stats.stats.items():  # type: ignore[attr-defined]
        short = file
        for marker in ("site-packages/", "asyncpg_iam/", "lib/python3"):
            if marker in file:
                short = file[file.index(marker) :]
                break
        key = f"{short}:{line}({name})"
        found[key] = found.get(key, 0) + calls
    return found


class Window:
    """The stretch measured of each connect with ``--until-handout``: from the call of
    ``acquire()`` to the connection's handout, the stretch case 1 times.

    Work the pool defers until after the handout (watching and tracking the connection, the
    close) is left out; it costs CPU, not connect latency.
    """

    def __init__(self, begin: Callable[[], object], end: Callable[[], object]) -> None:
        self.begin = begin
        self.end = end


class _CPUWindow(Window):
    """Adds up the thread's CPU time inside the window."""

    def __init__(self) -> None:
        super().__init__(self._begin, self._end)
        self.seconds = 0.0
        self._started = 0.0

    def _begin(self) -> None:
        self._started = time.thread_time()

    def _end(self) -> None:
        self.seconds += time.thread_time() - self._started


async def _profiled(pool: Any, count: int, work: Any, windowed: bool = False) -> dict[str, int]:
    profiler = cProfile.Profile()
    if windowed:
        await work(pool, count, Window(profiler.enable, profiler.disable))
    else:
        profiler.enable()
        await work(pool, count)
        profiler.disable()
    return _calls(pstats.Stats(profiler))


async def _measure_pair(
    pools: dict[str, Any],
    ops: int,
    rounds: int,
    callgrind: Callgrind | None,
    work: Any = _operations,
    strace: Strace | None = None,
    windowed: bool = False,
) -> dict[str, Any]:
    """Count calls, instructions and CPU time per operation (`work` on a pool: case 6's
    operations, or `_connects`) for each pool, interleaved; system calls too with `strace`.

    `windowed` (`_connects` only): count inside each connect's `Window` alone.
    """
    for pool in pools.values():
        await work(pool, ops)  # warm: statement caches, codecs, the loop
    calls = {name: await _profiled(pool, ops, work, windowed) for name, pool in pools.items()}
    syscalls = {}
    if strace is not None:
        syscalls = {name: await strace.count(work, pool, ops) for name, pool in pools.items()}
    instructions: dict[str, list[float]] = {name: [] for name in pools}
    cpu: dict[str, list[float]] = {name: [] for name in pools}
    for index in range(rounds):
        order = list(pools) if index % 2 == 0 else list(reversed(pools))
        for name in order:
            pool = pools[name]
            if callgrind is not None and windowed:
                callgrind.zero()
                await work(pool, ops, Window(callgrind.toggle, callgrind.toggle))
                instructions[name].append(callgrind.dump(f"{name}-{index}") / ops)
                continue
            if callgrind is not None:  # CPU time under valgrind says nothing
                callgrind.start()
                await work(pool, ops)
                instructions[name].append(callgrind.stop(f"{name}-{index}") / ops)
                continue
            if windowed:
                window = _CPUWindow()
                await work(pool, ops, window)
                cpu[name].append(window.seconds / ops * 1e6)
                continue
            started = time.process_time()
            await work(pool, ops)
            cpu[name].append((time.process_time() - started) / ops * 1e6)
    return {"calls": calls, "instructions": instructions, "cpu_us": cpu, "syscalls": syscalls}


def _report(path: str, ops: int, found: dict[str, Any], loop: str, unit: str = "op") -> list[str]:
    calls = found["calls"]
    what = "operations" if unit == "op" else "connects"
    lines = [f"## {path} ({loop}, {ops} {what} a sample)", ""]
    lines.append(
        f"| pool | Python calls / {unit} | instructions / {unit}, median (range) "
        f"| CPU us / {unit} (median) |"
    )
    lines.append("|---|---|---|---|")
    for name, per_function in calls.items():
        total = sum(per_function.values()) / ops
        instr = found["instructions"][name]
        instr_text = (
            f"{percentile(instr, 50):,.0f} ({min(instr):,.0f}-{max(instr):,.0f})"
            if instr
            else "(not under callgrind)"
        )
        cpu = found["cpu_us"][name]
        cpu_text = f"{percentile(cpu, 50):.1f}" if cpu else "(under callgrind)"
        lines.append(f"| {name} | {total:.1f} | {instr_text} | {cpu_text} |")
    lines.append("")
    names = list(calls)
    base, other = calls[names[0]], calls[names[-1]]
    rows = []
    for key in sorted(set(base) | set(other)):
        delta = (other.get(key, 0) - base.get(key, 0)) / ops
        if abs(delta) >= 0.05:
            rows.append((delta, key))
    if rows:
        lines.append(f"Calls per {unit} that differ, {names[-1]} minus {names[0]}:")
        lines.append("")
        lines.append(f"| calls / {unit} | function |")
        lines.append("|---|---|")
        for delta, key in sorted(rows, key=lambda r: (-abs(r[0]), r[1])):
            lines.append(f"| {delta:+.2f} | `{key}` |")
        lines.append("")
    if found.get("syscalls"):
        lines += _syscall_rows(found["syscalls"], ops, unit)
    return lines


def _syscall_rows(syscalls: dict[str, dict[str, int]], ops: int, unit: str) -> list[str]:
    """The system calls per `unit` of each pool, by name, where the first and last differ."""
    names = list(syscalls)
    base, other = syscalls[names[0]], syscalls[names[-1]]
    keys = sorted(
        (
            key
            for key in set(base) | set(other)
            if abs(other.get(key, 0) - base.get(key, 0)) >= 0.05 * ops
        ),
        key=lambda key: (-abs(other.get(key, 0) - base.get(key, 0)), key),
    )
    lines = [f"System calls per {unit} (strace -c, every thread), where they differ:", ""]
    lines.append("| system call | " + " | ".join(names) + " |")
    lines.append("|---|" + "---|" * len(names))
    for key in [*keys, "all"]:
        cells = [
            sum(counts.values()) / ops if key == "all" else counts.get(key, 0) / ops
            for counts in syscalls.values()
        ]
        lines.append(f"| {key} | " + " | ".join(f"{cell:.2f}" for cell in cells) + " |")
    lines.append("")
    return lines


async def _no_reset(_con: Any) -> None:
    """A pool ``reset`` that does nothing (for --no-reset)."""


#: The pools this tool can compare, by the name --pools takes.
POOLS = {
    "plain": "asyncpg.Pool",
    "plain2": "asyncpg.Pool (again)",
    "iam": "asyncpg_iam.Pool",
    "otel": "asyncpg_iam.Pool, OpenTelemetry",
    "otel_counters": "asyncpg_iam.Pool, OpenTelemetry histograms=False",
    "writer": "asyncpg_iam.Pool, target_session_attrs=read-write (failover watches queries)",
}


async def _pools(
    names: list[str],
    plain_kwargs: dict[str, Any],
    iam_kwargs: dict[str, Any],
    iam: Any,
    extra: dict[str, Any],
) -> dict[str, Any]:
    """Create the pools named (keys of `POOLS`), in that order."""
    pools: dict[str, Any] = {}
    for name in names:
        if name.startswith("plain"):
            pools[POOLS[name]] = await asyncpg.create_pool(**plain_kwargs, **extra)
            continue
        writer = {"target_session_attrs": "read-write"} if name == "writer" else {}
        pool = await asyncpg_iam.create_pool(**iam_kwargs, iam=iam, **extra, **writer)
        if name.startswith("otel"):
            from opentelemetry.sdk.metrics import MeterProvider
            from opentelemetry.sdk.metrics.export import InMemoryMetricReader

            from asyncpg_iam.otel import instrument_pool

            provider = MeterProvider(metric_readers=[InMemoryMetricReader()])
            instrument_pool(pool, provider, histograms=name == "otel")
        pools[POOLS[name]] = pool
    return pools


async def _run(args: argparse.Namespace) -> list[str]:
    callgrind = None
    if args.callgrind:
        if not Callgrind.running():
            raise SystemExit(
                "--callgrind: run under valgrind --tool=callgrind --collect-atstart=no"
            )
        callgrind = Callgrind(args.callgrind_dir)
    lines: list[str] = []
    extra: dict[str, Any] = {"min_size": POOL_SIZE, "max_size": POOL_SIZE}
    if args.no_reset:
        extra["reset"] = _no_reset
    async with Environment() as env:
        if args.connect:
            return await _run_connect(env, args, callgrind)
        for path in args.path:
            if path == "direct":
                plain_kwargs, iam_kwargs = env.direct_kwargs(), env.direct_kwargs()
            else:
                plain_kwargs = {**env.any_kwargs(), "password": "static-password"}
                iam_kwargs = env.iam_kwargs()
            pools = await _pools(args.pools, plain_kwargs, iam_kwargs, env.iam_auth(), extra)
            try:
                found = await _measure_pair(
                    pools, args.ops, args.rounds, callgrind, strace=_strace(args)
                )
            finally:
                for pool in pools.values():
                    await pool.close()
            lines += _report(path, args.ops, found, args.loop)
    return lines


async def _run_connect(
    env: Environment, args: argparse.Namespace, callgrind: Callgrind | None
) -> list[str]:
    """Profile case 1's pool pair: the fair floor (f_pool) and asyncpg_iam.Pool (e_pool)."""
    signed_once = asyncpg_iam.build_auth_token(
        host=env.signing_host,
        port=env.signing_port,
        user=env.user,
        region=env.region,
        credentials=env.credentials,
    )
    one = {"min_size": 0, "max_size": 1}
    pools = {
        "f_pool (asyncpg.Pool, token signed once)": await asyncpg.create_pool(
            **env.iam_kwargs(), password=signed_once, **one
        ),
        "e_pool (asyncpg_iam.Pool)": await asyncpg_iam.create_pool(
            **env.iam_kwargs(), iam=env.iam_auth(), **one
        ),
    }
    try:
        found = await _measure_pair(
            pools,
            args.ops,
            args.rounds,
            callgrind,
            _connects,
            strace=_strace(args),
            windowed=args.until_handout,
        )
    finally:
        for pool in pools.values():
            await pool.close()
    what = "connect through the verifying emulator"
    if args.until_handout:
        what += ", until the handout (CPU: this thread's)"
    return _report(what, args.ops, found, args.loop, "connect")


def _strace(args: argparse.Namespace) -> Strace | None:
    return Strace() if args.syscalls else None


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile_pool", description=__doc__)
    parser.add_argument("--ops", type=int, default=2000, help="operations a sample")
    parser.add_argument("--rounds", type=int, default=3, help="samples per pool")
    parser.add_argument("--path", default="direct,emulator", help="direct, emulator or both")
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    parser.add_argument("--callgrind", action="store_true", help="count instructions (valgrind)")
    parser.add_argument(
        "--callgrind-dir",
        type=Path,
        default=Path.cwd(),
        help="the directory of valgrind's --callgrind-out-file (default: the current one)",
    )
    parser.add_argument(
        "--pools",
        default="plain,plain2,iam",
        help=f"pools to compare, the first against the last ({', '.join(POOLS)})",
    )
    parser.add_argument("--no-reset", action="store_true", help="a no-op reset on every pool")
    parser.add_argument(
        "--syscalls",
        action="store_true",
        help="count system calls by name (strace -c, one more sample per pool)",
    )
    parser.add_argument(
        "--connect",
        action="store_true",
        help="profile case 1's connect pair (f_pool, e_pool) per connect instead",
    )
    parser.add_argument(
        "--until-handout",
        action="store_true",
        help="with --connect: count only from each acquire's call to its handout",
    )
    args = parser.parse_args(argv)
    if args.until_handout and not args.connect:
        parser.error("--until-handout goes with --connect")
    if args.until_handout and args.syscalls:
        parser.error("--syscalls counts whole connects: run it without --until-handout")
    args.path = [p.strip() for p in args.path.split(",") if p.strip()]
    args.pools = [p.strip() for p in args.pools.split(",") if p.strip()]
    unknown = sorted(set(args.pools) - set(POOLS))
    if unknown:
        parser.error(f"unknown pools {', '.join(unknown)}: choose from {', '.join(POOLS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Profile both pools and print the tables (Markdown)."""
    args = _parse(argv)
    if args.loop == "uvloop":
        import uvloop

        lines = uvloop.run(_run(args))
    else:
        lines = asyncio.run(_run(args))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
