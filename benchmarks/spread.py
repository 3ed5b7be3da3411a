"""The run-to-run spread of the near-1 ratios over several runs of the suite.

``python -m benchmarks.spread DIR1 DIR2 DIR3 [--output FILE]``

Each DIR holds a ``results.json`` written by ``python -m benchmarks``. For every target ratio
near 1 (`RATIOS`) that at least one run measured, under asyncio and under any other event loop
the runs used (``case@uvloop``), the table gives each run's value, their min / median / max,
the target, and whether every run that measured it met it. Rows for the A/A controls
(`CONTROLS`) follow: each run's real ratios and the control's interval, and whether every run
held them within it, as the case's own control row checks. The Markdown goes to FILE (for
docs/benchmarks.md, which includes it) or to standard output.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import operator
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ._harness import LOOP_SEPARATOR, base_name, percentile


@dataclasses.dataclass(frozen=True)
class Ratio:
    """One target ratio: where a case's figures keep it, and the bound it is held to."""

    case: str
    path: tuple[str | int, ...]
    label: str
    compare: Callable[[float, float], bool]
    bound: float

    @property
    def target(self) -> str:
        sign = ">=" if self.compare is operator.ge else "<="
        return f"{sign} {self.bound:g}"


def _at_least(case: str, path: tuple[str | int, ...], label: str, bound: float) -> Ratio:
    return Ratio(case, path, label, operator.ge, bound)


def _at_most(case: str, path: tuple[str | int, ...], label: str, bound: float) -> Ratio:
    return Ratio(case, path, label, operator.le, bound)


#: The near-1 target ratios (issue #28; the cold start: #30), by case (the asyncio name;
#: ``@loop`` runs match too).
RATIOS: tuple[Ratio, ...] = (
    _at_most("connect", ("target_pairs", "ratio"), "IAM connect / fair floor (p50)", 1.01),
    _at_most(
        "connect",
        ("target_pairs", "ratio_interval_95", 1),
        "IAM connect / fair floor, 95 % interval's upper end",
        1.02,
    ),
    *(
        _at_least("pool_overhead", (path, key), f"pool overhead, {label}: {estimator}", 0.98)
        for path, label in (("direct", "direct"), ("emulator", "through the emulator"))
        for key, estimator in (
            ("ratio", "median of per-round ratios"),
            ("ratio_of_medians", "ratio of medians"),
        )
    ),
    *(
        _at_least(
            "pool_overhead_capabilities",
            (variant, key),
            f"pool overhead, {label}: {estimator}",
            0.98,
        )
        for variant, label in (
            ("topology", "topology on"),
            ("health", "health checks on"),
            ("blue_green_deployment", "blue/green on, a deployment"),
            ("blue_green_none", "blue/green on, no deployment"),
            ("rds_proxy", "RDS Proxy defaults"),
        )
        for key, estimator in (
            ("ratio", "median of per-round ratios"),
            ("ratio_of_medians", "ratio of medians"),
        )
    ),
    *(
        _at_least("metrics", (variant, key), f"OpenTelemetry, {label} / off: {estimator}", 0.98)
        for variant, label in (
            ("on", "every instrument on"),
            ("on_counters_only", "histograms=False"),
        )
        for key, estimator in (
            ("ratio", "median of per-round ratios"),
            ("ratio_of_medians", "ratio of medians"),
        )
    ),
    _at_most("cold_start", ("ours_vs_floor",), "cold start / floor (ratio of medians)", 1.1),
)


@dataclasses.dataclass(frozen=True)
class ControlCheck:
    """The A/A control's target, as the case's own control row checks it: each real ratio
    (median of per-round ratios) within the control's 95 % interval over blocks, or at or
    above 1. `control` is the path to the control's figures; a run from before the interval
    over blocks was kept is checked against the control's interval over rounds."""

    case: str
    ratios: tuple[tuple[str | int, ...], ...]
    control: tuple[str | int, ...]
    label: str
    target = "each real ratio within the A/A control's 95 % interval over blocks, or >= 1"


#: The A/A controls' targets (issue #28), by case.
CONTROLS: tuple[ControlCheck, ...] = (
    *(
        ControlCheck(
            "pool_overhead",
            ((path, "ratio"),),
            (path, "control"),
            f"pool overhead, {label}: within the A/A control",
        )
        for path, label in (("direct", "direct"), ("emulator", "through the emulator"))
    ),
    ControlCheck(
        "metrics",
        (("on", "ratio"), ("on_counters_only", "ratio")),
        ("control",),
        "OpenTelemetry, both instrumented pools: within the A/A control",
    ),
)


def _value(figures: Any, path: Sequence[str | int]) -> float | None:
    """The number at `path` in a case's figures, or None where the run has none."""
    for key in path:
        try:
            figures = figures[key]
        except (KeyError, IndexError, TypeError):
            return None
    return float(figures) if isinstance(figures, (int, float)) else None


def _runs_of(runs: Sequence[dict[str, Any]], case: str) -> list[tuple[str, str]]:
    """The names `case` ran under in any of `runs` (``case``, ``case@uvloop``, ...), each with
    its event loop, in table order."""
    names = sorted({name for run in runs for name in run}, key=lambda n: (base_name(n), n))
    return [
        (name, name.split(LOOP_SEPARATOR, 1)[1] if LOOP_SEPARATOR in name else "asyncio")
        for name in names
        if base_name(name) == case
    ]


def _verdict(met: bool, measured: int, runs: int) -> str:
    """A row's last cell: met or MISSED, and whether a run did not measure it."""
    return ("met" if met else "MISSED") + ("" if measured == runs else " (not in every run)")


def _control_cell(figures: Any, check: ControlCheck) -> tuple[str, bool] | None:
    """One run's cell of a control check (its real ratios and the control's interval) and
    whether it held; None where the run has no such figures."""
    interval = "ratio_block_interval_95"
    if _value(figures, (*check.control, interval, 0)) is None:
        interval = "ratio_interval_95"  # a run from before it was kept
    low, high = (_value(figures, (*check.control, interval, end)) for end in (0, 1))
    ratios = [_value(figures, path) for path in check.ratios]
    if low is None or high is None or None in ratios:
        return None
    held = all(low <= r <= high or r >= 1.0 for r in ratios if r is not None)
    shown = ", ".join(f"{r:.3f}" for r in ratios if r is not None)
    return f"{shown} in {low:.3f}-{high:.3f}", held


def control_rows(
    runs: Sequence[dict[str, Any]], checks: Sequence[ControlCheck] = CONTROLS
) -> list[list[str]]:
    """One row per control check and event loop measured in any run: label, loop, each run's
    real ratios and the control's interval, no min / median / max, the target, and whether
    every run that measured it held."""
    table: list[list[str]] = []
    for check in checks:
        for name, loop in _runs_of(runs, check.case):
            cells = [_control_cell(run.get(name, {}).get("figures"), check) for run in runs]
            measured = [cell for cell in cells if cell is not None]
            if not measured:
                continue
            met = all(held for _shown, held in measured)
            verdict = _verdict(met, len(measured), len(runs))
            table.append(
                [
                    check.label,
                    loop,
                    *("-" if cell is None else cell[0] for cell in cells),
                    "-",
                    "-",
                    "-",
                    check.target,
                    verdict,
                ]
            )
    return table


def load(directory: Path) -> dict[str, Any]:
    """Return the cases of the run in `directory` (its results.json) by name."""
    document = json.loads((directory / "results.json").read_text())
    cases: dict[str, Any] = document.get("cases", {})
    return cases


def rows(runs: Sequence[dict[str, Any]], ratios: Sequence[Ratio] = RATIOS) -> list[list[str]]:
    """One row per ratio and event loop measured in any run: label, loop, each run's value,
    min, median, max, target and whether every run that measured it met it."""
    table: list[list[str]] = []
    for wanted in ratios:
        for name, loop in _runs_of(runs, wanted.case):
            values = [_value(run.get(name, {}).get("figures"), wanted.path) for run in runs]
            measured = [v for v in values if v is not None]
            if not measured:
                continue
            met = all(wanted.compare(v, wanted.bound) for v in measured)
            verdict = _verdict(met, len(measured), len(runs))
            table.append(
                [
                    wanted.label,
                    loop,
                    *("-" if v is None else f"{v:.3f}" for v in values),
                    f"{min(measured):.3f}",
                    f"{percentile(measured, 50):.3f}",
                    f"{max(measured):.3f}",
                    wanted.target,
                    verdict,
                ]
            )
    return table


def markdown(directories: Sequence[Path], runs: Sequence[dict[str, Any]]) -> str:
    """The spread table as Markdown, the runs named by their directories."""
    header = [
        "ratio",
        "loop",
        *(f"run {i} (`{d.name}`)" for i, d in enumerate(directories, 1)),
        "min",
        "median",
        "max",
        "target",
        "all runs",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in [*rows(runs), *control_rows(runs)]]
    if len(lines) == 2:
        lines.append("| no run measured a near-1 ratio |" + " |" * (len(header) - 1))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Print (or write) the spread table of the runs given."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.spread", description=__doc__)
    parser.add_argument("runs", nargs="+", type=Path, help="directories with a results.json")
    parser.add_argument("--output", type=Path, help="write the Markdown here")
    args = parser.parse_args(argv)
    missing = [str(d) for d in args.runs if not (d / "results.json").is_file()]
    if missing:
        parser.error(f"no results.json in {', '.join(missing)}")
    text = markdown(args.runs, [load(d) for d in args.runs])
    if args.output is not None:
        args.output.write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
