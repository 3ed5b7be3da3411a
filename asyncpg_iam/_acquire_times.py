"""Wait and use times of a pool's acquires, buffered for a metrics reader off the acquire path.

A pool observer that wants them (OpenTelemetry's ``wait_time`` and ``use_time`` histograms)
hands the pool an `AcquireTimes`; the pool then appends to it on every acquire and release,
without calling anything, and the observer records the samples when its reader collects.
"""

from __future__ import annotations

import collections

__all__ = ["AcquireTimes"]


class AcquireTimes:
    """Seconds each acquire waited and each connection was used, at most `maxlen` of each.

    The pool appends to `waits` and `uses` (the oldest are dropped when a reader falls behind)
    and keeps in `acquired` the clock time each holder in use was handed out. A reader takes
    samples with `popleft`: deques append and pop atomically, so a reader on another thread
    (an exporter's) loses none.
    """

    __slots__ = ("acquired", "uses", "waits")

    def __init__(self, maxlen: int) -> None:
        self.waits: collections.deque[float] = collections.deque(maxlen=maxlen)
        self.uses: collections.deque[float] = collections.deque(maxlen=maxlen)
        self.acquired: dict[object, float] = {}
