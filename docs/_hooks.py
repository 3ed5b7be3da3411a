"""MkDocs hook: publish the benchmark figures from where the benchmarks write them.

The plots stay in benchmarks/results/ (the benchmarks overwrite them on each run); copying them
under docs/ would leave a second, stale set. The site serves them at benchmarks/results/*.png.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parent.parent


def on_files(files: Files, config: Any) -> Files:
    """Add every PNG under benchmarks/results/ to the site at the same path."""
    for figure in sorted((ROOT / "benchmarks" / "results").rglob("*.png")):
        files.append(
            File(
                str(figure.relative_to(ROOT)),
                src_dir=str(ROOT),
                dest_dir=config["site_dir"],
                use_directory_urls=config["use_directory_urls"],
            )
        )
    return files
