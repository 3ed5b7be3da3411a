"""The benchmark suite runs from the command line and writes its result files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_quick_token_benchmark_writes_json_markdown_and_plot(tmp_path: Path) -> None:
    """`python -m benchmarks --quick --only token` writes results.json, results.md and a PNG."""
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks",
            "--quick",
            "--only",
            "token",
            "--output",
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    document = json.loads((tmp_path / "results.json").read_text())
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
