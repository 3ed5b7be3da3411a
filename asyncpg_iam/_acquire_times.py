"""Wait and use times of a pool's acquires, buffered for a metrics reader off the acquire path.

A pool observer that wants them (OpenTelemetry's ``wait_time`` and ``use_time`` histograms)
hands the pool an `AcquireTimes`; the pool then appends to it on every acquire and release,
without calling anything of the observer's, and the observer records the samples later: when
its reader collects, and whenever the pool says the buffer has grown to `spill_at`.
"""

from __future__ import annotations

import collections
from collections.abc import Callable

__all__ = ["AcquireTimes"]


class AcquireTimes:
    """Seconds each acquire waited and each connection was used, until the owner takes them.

    The pool appends to `waits` and `uses` and keeps in `acquired` the clock time each holder
    in use was handed out. Nothing is ever dropped: when a release finds `spill_at` samples or
    more in `uses`, it calls `spill()` (on the event loop; it must not raise), and the owner
    takes samples so that the buffer stays bounded (it may raise `spill_at` meanwhile, so that
    releases call it again only if the buffer keeps growing). A reader takes samples with
    `popleft`: deques append and pop atomically, so a reader on another thread (an exporter's)
    takes each sample once.
    """

    __slots__ = ("acquired", "spill", "spill_at", "uses", "waits")

    def __init__(self, spill: Callable[[], None], spill_at: int) -> None:
        self.waits: collections.deque[float] = collections.deque()
        self.uses: collections.deque[float] = collections.deque()
        self.acquired: dict[object, float] = {}
        self.spill = spill
        self.spill_at = spill_at
