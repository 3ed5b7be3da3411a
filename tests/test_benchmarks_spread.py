"""`python -m benchmarks.spread` combines several runs' results.json into one spread table."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from benchmarks import spread

ROOT = Path(__file__).resolve().parent.parent


def _run_dir(tmp_path: Path, name: str, cases: dict[str, Any]) -> Path:
    directory = tmp_path / name
    directory.mkdir()
    document = {"date": "2026-12-06T00:00:00Z", "quick": False, "cases": cases}
    (directory / "results.json").write_text(json.dumps(document))
    return directory


def _overhead(direct: float, of_medians: float) -> dict[str, Any]:
    figures = {
        "direct": {"ratio": direct, "ratio_of_medians": of_medians},
        "emulator": {"ratio": 1.0, "ratio_of_medians": 1.0},
    }
    return {"figures": figures}


def _connect(value: float, high: float) -> dict[str, Any]:
    return {"figures": {"target_pairs": {"ratio": value, "ratio_interval_95": [0.99, high]}}}


def _row(table: list[list[str]], label: str, loop: str) -> list[str]:
    (found,) = [row for row in table if row[0] == label and row[1] == loop]
    return found


def test_each_runs_value_min_median_max_and_verdict() -> None:
    """A ratio's row lists each run's value, their min, median and max, and "met" only
    when every run met the target."""
    runs = [
        {"pool_overhead": _overhead(0.99, 0.985)},
        {"pool_overhead": _overhead(1.01, 0.975)},
        {"pool_overhead": _overhead(0.995, 0.99)},
    ]
    table = spread.rows(runs)
    direct = _row(table, "pool overhead, direct: median of per-round ratios", "asyncio")
    assert direct[2:] == ["0.990", "1.010", "0.995", "0.990", "0.995", "1.010", ">= 0.98", "met"]
    of_medians = _row(table, "pool overhead, direct: ratio of medians", "asyncio")
    assert of_medians[2:5] == ["0.985", "0.975", "0.990"]
    assert of_medians[-1] == "MISSED"


def test_other_loops_get_their_own_rows_and_upper_bounds_hold_from_above() -> None:
    """A ``case@uvloop`` run is its own row under its loop's name; a "<=" target is missed
    by a value above it."""
    runs = [
        {"connect": _connect(1.005, 1.015), "connect@uvloop": _connect(1.008, 1.021)},
        {"connect": _connect(1.004, 1.012), "connect@uvloop": _connect(1.009, 1.019)},
    ]
    table = spread.rows(runs)
    assert _row(table, "IAM connect / fair floor (p50)", "asyncio")[-1] == "met"
    assert _row(table, "IAM connect / fair floor (p50)", "uvloop")[-1] == "met"
    upper = _row(table, "IAM connect / fair floor, 95 % interval's upper end", "uvloop")
    assert upper[2:4] == ["1.021", "1.019"]
    assert upper[-2:] == ["<= 1.02", "MISSED"]


def test_a_run_without_the_case_is_shown_and_not_counted_as_met() -> None:
    """A run that did not measure a ratio shows "-" and the verdict says not every run did."""
    runs = [{"metrics": {"figures": {"on": {"ratio": 0.99}}}}, {}]
    label = "OpenTelemetry, every instrument on / off: median of per-round ratios"
    row = _row(spread.rows(runs), label, "asyncio")
    assert row[2:4] == ["0.990", "-"]
    assert row[-1] == "met (not in every run)"


def test_command_line_writes_the_markdown_table(tmp_path: Path) -> None:
    """``python -m benchmarks.spread A B C --output FILE`` writes a table naming the runs."""
    dirs = [
        _run_dir(tmp_path, f"run{i}", {"pool_overhead@uvloop": _overhead(value, value)})
        for i, value in enumerate((0.97, 0.99, 1.0), 1)
    ]
    out = tmp_path / "spread.md"
    completed = subprocess.run(
        [sys.executable, "-m", "benchmarks.spread", *map(str, dirs), "--output", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    text = out.read_text()
    assert "| run 1 (`run1`) | run 2 (`run2`) | run 3 (`run3`) |" in text
    assert "| pool overhead, direct: ratio of medians | uvloop | 0.970 | 0.990 | 1.000 |" in text
    assert "MISSED" in text


def test_a_directory_without_results_is_refused(tmp_path: Path) -> None:
    """A directory with no results.json is a usage error naming it."""
    with pytest.raises(SystemExit) as exited:
        spread.main([str(tmp_path)])
    assert exited.value.code == 2


def test_control_rows_hold_each_real_ratio_to_the_controls_interval() -> None:
    """A control check shows each run's real ratios and the control's interval over blocks
    (over rounds for a run that kept no other), and is met only when in every run each real
    ratio is inside the interval or at or above 1."""

    def overhead(real: float, low: float, high: float) -> dict[str, Any]:
        control = {"ratio_interval_95": [0.5, 1.5], "ratio_block_interval_95": [low, high]}
        figures = {
            "direct": {"ratio": real, "control": control},
            "emulator": {"ratio": 1.02, "control": {"ratio_interval_95": [1.03, 1.04]}},
        }
        return {"figures": figures}

    runs = [
        {"pool_overhead": overhead(0.99, 0.985, 1.01)},
        {"pool_overhead": overhead(0.993, 1.0, 1.014)},
    ]
    table = spread.control_rows(runs)
    direct = _row(table, "pool overhead, direct: within the A/A control", "asyncio")
    assert direct[2:4] == ["0.990 in 0.985-1.010", "0.993 in 1.000-1.014"]
    assert direct[-1] == "MISSED"
    # Above 1 counts as held even outside the interval.
    emulator = _row(table, "pool overhead, through the emulator: within the A/A control", "asyncio")
    assert emulator[-1] == "met"
    # A run from before the interval over blocks was kept: its interval over rounds.
    assert emulator[2] == "1.020 in 1.030-1.040"
    assert "within the A/A control" in spread.markdown([Path("a"), Path("b")], runs)
