"""pytest plugin: run every asyncio test on uvloop, as asyncpg recommends.

Load it with ``pytest -p tests._uvloop`` (``nox -s uvloop`` does); needs ``uvloop`` installed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import pytest
import uvloop


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], Any]]:
    """Give every asyncio test (and its fixtures) a uvloop event loop."""
    return {"uvloop": uvloop.new_event_loop}
