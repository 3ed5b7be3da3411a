"""Run the benchmark suite: ``python -m benchmarks [--quick] [--only NAME,...] [--output DIR]``.

Writes ``results.json`` (raw figures), ``results.md`` (the table) and PNG plots to the output
directory (``benchmarks/results/`` by default), recording the machine, versions and date.
With ``--only``, the cases run replace their own entries in an existing ``results.json`` and
the others are kept, each marked with the run that produced it. With ``--loop uvloop`` the
cases' figures are kept beside the asyncio run's (``NAME@uvloop``) and shown as a column of
the same tables.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import sys
import time
import traceback
from collections.abc import Coroutine
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

from . import (
    _harness,
    case_bluegreen,
    case_cold_start,
    case_connect,
    case_dsql,
    case_failover,
    case_fetches,
    case_fleet,
    case_loop_lag,
    case_memory,
    case_metrics,
    case_pool_overhead,
    case_pool_overhead_capabilities,
    case_proxy,
    case_recycling,
    case_token,
)

_T = TypeVar("_T")

CASES: list[ModuleType] = [
    case_connect,
    case_token,
    case_fetches,
    case_loop_lag,
    case_recycling,
    case_pool_overhead,
    case_pool_overhead_capabilities,
    case_failover,
    case_dsql,
    case_metrics,
    case_fleet,
    case_bluegreen,
    case_proxy,
    case_cold_start,
    case_memory,
]
DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results"


def _parse(argv: list[str] | None) -> argparse.Namespace:
    names = [case.NAME for case in CASES]
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="short durations and few iterations: a smoke test, not figures to quote",
    )
    parser.add_argument(
        "--only",
        default="",
        help=f"comma-separated cases to run (default: all): {', '.join(names)}",
    )
    parser.add_argument(
        "--loop",
        choices=("asyncio", "uvloop"),
        default="asyncio",
        help="event loop to run every case on (default: %(default)s)",
    )
    parser.add_argument(
        "--no-pin",
        dest="pin",
        action="store_false",
        help="do not give this process and PostgreSQL their own CPUs in the cases that do "
        "(connect, pool_overhead, metrics; see Environment.pinned)",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=DEFAULT_OUTPUT,
        help="directory for results.json, results.md and the plots (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    chosen = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = sorted(set(chosen) - set(names))
    if unknown:
        parser.error(f"unknown case(s) {', '.join(unknown)}: choose from {', '.join(names)}")
    args.cases = [case for case in CASES if not chosen or case.NAME in chosen]
    return args


async def _run_cases(args: argparse.Namespace) -> tuple[list[_harness.CaseResult], dict]:
    needs_env = any(case.NEEDS_ENVIRONMENT for case in args.cases)
    results: list[_harness.CaseResult] = []
    async with _maybe_environment(needs_env, pin_cpus=args.pin) as env:
        for case in args.cases:
            print(f"-- {case.TITLE} ...", flush=True)
            gc.collect()
            started = time.perf_counter()
            pinning: contextlib.AbstractContextManager[dict[str, list[int]] | None]
            if env is not None and getattr(case, "PIN_CPUS", False):
                pinning = env.pinned()
            else:
                pinning = contextlib.nullcontext()
            try:
                with pinning as cpus:
                    result = await case.run(env, args.quick)
                if cpus is not None:
                    result.figures["cpus"] = cpus
                    result.notes.append(
                        f"This process ran on {_cpus(cpus['client'])} and PostgreSQL on "
                        f"{_cpus(cpus['postgres'])} (see `Environment.pinned`)."
                    )
            except Exception as exc:
                traceback.print_exc()
                result = _harness.CaseResult(case.NAME, case.TITLE)
                result.error = f"{type(exc).__name__}: {exc}"
            result.seconds = time.perf_counter() - started
            if result.error is None and hasattr(case, "plot"):
                try:
                    case.plot(result, args.output)
                except Exception as exc:
                    traceback.print_exc()
                    result.notes.append(f"Plotting failed: {type(exc).__name__}: {exc}")
            for row in result.rows:
                status = f" [{row.status} {row.target}]" if row.status else ""
                print(f"   {row.metric}: {row.value}{status}", flush=True)
            print(f"   ({result.seconds:.1f} s)", flush=True)
            results.append(result)
        command = "python -m benchmarks" + (" " + " ".join(sys.argv[1:]) if sys.argv[1:] else "")
        head = _harness.header(quick=args.quick, command=command, env=env)
    return results, head


def _cpus(cpus: list[int]) -> str:
    return ("CPU " if len(cpus) == 1 else "CPUs ") + ", ".join(map(str, cpus))


class _maybe_environment:
    """An `Environment` when some case needs one, else None."""

    def __init__(self, needed: bool, *, pin_cpus: bool) -> None:
        self._env = _harness.Environment(pin_cpus=pin_cpus) if needed else None

    async def __aenter__(self) -> _harness.Environment | None:
        if self._env is not None:
            await self._env.__aenter__()
        return self._env

    async def __aexit__(self, *exc_info: object) -> None:
        if self._env is not None:
            await self._env.__aexit__(*exc_info)


def _run(coro: Coroutine[Any, Any, _T], loop: str) -> _T:
    """Run `coro` on the chosen event loop."""
    if loop == "asyncio":
        return asyncio.run(coro)
    import uvloop

    if sys.version_info < (3, 11):  # no asyncio.Runner
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


def main(argv: list[str] | None = None) -> int:
    """Run the chosen cases and write the results; return the exit status."""
    args = _parse(argv)
    args.output.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.WARNING)
    results, head = _run(_run_cases(args), args.loop)
    head["loop"] = args.loop
    path = args.output / "results.json"
    if args.loop != "asyncio":
        # Beside the asyncio run's figures: a column of their tables (see _harness.markdown).
        for result in results:
            result.name += _harness.LOOP_SEPARATOR + args.loop
            result.run = {"date": head["date"], "command": head["command"], "quick": args.quick}
    if (args.only.strip() or args.loop != "asyncio") and path.exists():
        head, results = _harness.merge_results(path, head, results, order=[c.NAME for c in CASES])
    _harness.write_json(path, head, results)
    (args.output / "results.md").write_text(_harness.markdown(head, results))
    print(f"wrote results.json, results.md and plots to {args.output}")
    return 1 if any(result.error for result in results) else 0


if __name__ == "__main__":
    sys.exit(main())
