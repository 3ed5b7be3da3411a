"""A fleet against RDS's IAM throttle: logins per second from many replicas, simulated.

RDS accepts at most 200 new IAM-authenticated connections a second per instance; over that,
logins fail. What a fleet sends depends on the pools' lifetime spreading and rate limit, so
this case runs the library's own code for them, not a model of it: every simulated replica
has a `Recycler` (deadlines drawn and spread exactly as a `Pool` draws them, retirements at
those deadlines), a `TokenBucket` when ``max_connect_rate`` is set, and a `CredentialCache`
over a source that issues 900 s assumed-role credentials. One `ManualClock` drives them all;
the "server" only counts logins per simulated second.

Each replica's pool state is a stand-in for asyncpg's (holders in a queue, connections that
fire termination listeners), the shapes the recycler reads. A retired or dropped connection
is reopened at once, as asyncpg's min-size upkeep does: through the bucket, the credential
cache, the login, and `Recycler.track()`. Logins take no time and never fail (the figures are
what the fleet *asks* of the server). Connections are idle: an idle connection is retired at
its deadline, a busy one only later, on release, which spreads reconnects further.

Scenarios, for 1,000 replicas x 20 connections and 100 replicas x 50:

- ``deploy``: every replica starts at once; one hour.
- ``rolling``: 10 % of the replicas start every 60 s; one hour from the first.
- ``steady``: two hours of a running fleet: the replicas started at random times over the
  15 minutes before (simulated, not counted).
- ``drop``: the fleet deployed at once runs 20 min, then every connection drops at once (a
  restart or failover) and the fleet reconnects; 45 min after the drop.

"After the burst" counts from the second after the last login that opened a first lifetime
(a replica starting, a reconnect after the drop): from then on only recycling makes logins,
the first wave of retirements included. "After the first lifetime" counts from one
``max_lifetime`` later, when every connection of the burst has been replaced at least once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import itertools
import json
import math
import random
import weakref
from collections import Counter, deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from asyncpg_iam import Credentials, _lifetime
from asyncpg_iam._clock import ManualClock
from asyncpg_iam._credentials import CredentialCache
from asyncpg_iam._lifetime import Recycler, TokenBucket

from ._harness import CaseResult, new_figure, percentile, save_figure

NAME = "fleet"
TITLE = "10. Fleet simulation: logins per second against RDS's 200/s IAM throttle"
NEEDS_ENVIRONMENT = False

THROTTLE = 200
MAX_LIFETIME = 900.0
CREDENTIAL_LIFETIME = 900.0
# Credentials rotate (the source hands out a new key) every half lifetime, as STS would.
ROTATION = CREDENTIAL_LIFETIME / 2
#: The fleet-wide login rate the recommended settings aim at: 25 % below the throttle.
FLEET_CONNECT_RATE = 150.0
SHAPES = ((1000, 20), (100, 50))
SCENARIOS = ("deploy", "rolling", "steady", "drop")


def recommended_connect_rate(replicas: int) -> float:
    """Return the README's ``max_connect_rate``: 150 logins/s shared by every replica."""
    return FLEET_CONNECT_RATE / replicas


# -- the simulated server and credential source -------------------------------------------


class LoginCounter:
    """The simulated database: counts logins per simulated second, and nothing else."""

    def __init__(self, clock: ManualClock) -> None:
        self._clock = clock
        self.origin = clock.monotonic()
        self.per_second: Counter[int] = Counter()
        self.first_lifetime_logins: list[float] = []

    def login(self, *, first: bool) -> None:
        """Count one login now; `first` when it opens a first lifetime (not a replacement)."""
        elapsed = self._clock.monotonic() - self.origin
        self.per_second[int(elapsed)] += 1
        if first:
            self.first_lifetime_logins.append(elapsed)


class AssumedRoleSource:
    """A credential source that issues a new 900 s key on every fetch, as AssumeRole does."""

    def __init__(self, clock: ManualClock, fetch_log: list[float], origin: float) -> None:
        self._clock = clock
        self._log = fetch_log
        self._origin = origin
        self._serial = itertools.count()

    @property
    def description(self) -> str:
        return "simulated AssumeRole"

    async def fetch(self) -> Credentials:
        self._log.append(self._clock.monotonic() - self._origin)
        return Credentials(
            f"ASIASIMULATED{next(self._serial):07d}",
            "simulated-secret",
            "simulated-session",
            expiry=self._clock.now() + dt.timedelta(seconds=CREDENTIAL_LIFETIME),
        )

    async def aclose(self) -> None:
        return None


# -- the pool-like state the recycler works on --------------------------------------------


class SimConnection:
    """A connection as the recycler sees it: termination listeners, close, terminate."""

    __slots__ = ("__weakref__", "_closed", "_listeners")

    def __init__(self) -> None:
        self._closed = False
        self._listeners: list[Callable[[Any], None]] = []

    def add_termination_listener(self, callback: Callable[[Any], None]) -> None:
        self._listeners.append(callback)

    def is_closed(self) -> bool:
        return self._closed

    async def close(self, *, timeout: float | None = None) -> None:
        self.terminate()

    def terminate(self) -> None:
        if self._closed:
            return
        self._closed = True
        for listener in self._listeners:
            listener(self)
        self._listeners.clear()


class SimHolder:
    """asyncpg's connection holder, reduced to what the recycler reads and writes."""

    __slots__ = ("_con", "_generation", "_in_use")

    def __init__(self) -> None:
        self._con: SimConnection | None = None
        self._in_use: object | None = None
        self._generation = 0

    def _maybe_cancel_inactive_callback(self) -> None:
        return None


class _Queue:
    """asyncpg's holder queue: a deque the recycler takes idle holders out of."""

    __slots__ = ("_queue",)

    def __init__(self) -> None:
        self._queue: deque[SimHolder] = deque()

    def put_nowait(self, holder: SimHolder) -> None:
        self._queue.append(holder)


class Replica:
    """One replica's pool: holders, the library's recycler, rate limit and credential cache."""

    def __init__(
        self,
        *,
        size: int,
        clock: ManualClock,
        server: LoginCounter,
        rng: random.Random,
        connect_rate: float | None,
        jitter: float,
        fetch_log: list[float],
    ) -> None:
        self._size = size
        self._clock = clock
        self._server = server
        self._holders = [SimHolder() for _ in range(size)]
        self._queue = _Queue()
        self._closing = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._retired_pending = 0
        self.recycler = Recycler(
            self,
            max_lifetime=MAX_LIFETIME,
            jitter=jitter,
            on_closed=weakref.WeakMethod(self._on_closed),
            clock=clock,
            rng=rng,
        )
        self.bucket = (
            TokenBucket(connect_rate, clock=clock, stagger=True, rng=rng) if connect_rate else None
        )
        self.credentials = CredentialCache(
            AssumedRoleSource(clock, fetch_log, server.origin), clock=clock
        )

    def is_closing(self) -> bool:
        return self._closing

    def start(self) -> None:
        """Open every connection, as pool creation does (all at once, through the bucket)."""
        for holder in self._holders:
            self._spawn(holder, first=True)

    def drop_all(self) -> None:
        """Lose every connection at once (a database restart)."""
        for holder in self._holders:
            con = holder._con
            if con is not None:
                holder._con = None
                con.terminate()

    async def aclose(self) -> None:
        self._closing = True
        self.recycler.cancel()
        for task in list(self._tasks):
            task.cancel()
        await self.credentials.aclose()

    def _on_closed(self, reason: str) -> None:
        if self._closing:
            return
        replaces = reason == "max_lifetime"
        # Reopen once the holder is back in the queue (the recycler puts it back after close).
        loop = asyncio.get_running_loop()
        loop.call_soon(self._reopen_one, replaces)

    def _reopen_one(self, replaces: bool) -> None:
        queue = self._queue._queue
        holder = next((h for h in queue if h._con is None), None)
        if holder is None:
            holder = next((h for h in self._holders if h._con is None and h not in queue), None)
            if holder is None:
                return
        else:
            queue.remove(holder)
        self._spawn(holder, first=not replaces)

    def _spawn(self, holder: SimHolder, *, first: bool) -> None:
        task = asyncio.get_running_loop().create_task(self._open(holder, first=first))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _open(self, holder: SimHolder, *, first: bool) -> None:
        if self.bucket is not None:
            await self.bucket.acquire()
        await self.credentials.get()
        started = self._clock.monotonic()
        self._server.login(first=first)
        con = SimConnection()
        holder._con = con
        self.recycler.track(con, started)  # type: ignore[arg-type]
        self._queue.put_nowait(holder)


# -- running a scenario --------------------------------------------------------------------


@dataclasses.dataclass
class Outcome:
    """What one scenario run produced."""

    per_second: list[int]
    after: int
    after_burst: int
    fetches_per_replica_hour: float
    max_fetches_in_a_rotation: int
    replicas: int
    simulated_seconds: int
    logins: int


class SimClock(ManualClock):
    """A `ManualClock` that jumps from one due timer to the next, as fast as the loop allows.

    `ManualClock.advance` yields a fixed five times per stop so tests need not know the event
    loop; here each stop yields exactly until nothing is ready to run (asyncio's ready queue
    is empty), which keeps two simulated hours of 20,000 connections to seconds.
    """

    async def run_until(self, until: float) -> None:
        """Fire every timer and sleeper due up to `until`, in time order, then stop there."""
        loop = asyncio.get_running_loop()
        await _settle(loop)  # let what was just started schedule its timers
        while True:
            due = self.next_due()
            if due is None or due > until:
                break
            self._move_to(due)
            self._fire_due()
            await _settle(loop)
        self._move_to(until)


async def _settle(loop: asyncio.AbstractEventLoop) -> None:
    """Yield until every callback and task woken so far has run to its next wait."""
    ready = getattr(loop, "_ready", None)
    for _ in range(10_000 if ready is not None else 10):
        await asyncio.sleep(0)
        if ready is not None and not ready:
            return


async def simulate(
    scenario: str,
    *,
    replicas: int,
    size: int,
    connect_rate: float | None,
    jitter: float = 0.1,
    seed: int = 20261203,
    scale: float = 1.0,
) -> Outcome:
    """Run one scenario; `scale` shortens the simulated time (quick runs)."""
    clock = SimClock()
    server = LoginCounter(clock)
    rng = random.Random(seed)
    fetch_logs: list[list[float]] = []

    def new_replica() -> Replica:
        log: list[float] = []
        fetch_logs.append(log)
        return Replica(
            size=size,
            clock=clock,
            server=server,
            rng=rng,
            connect_rate=connect_rate,
            jitter=jitter,
            fetch_log=log,
        )

    fleet: list[Replica] = []
    origin = clock.monotonic()
    warmup = 0.0
    if scenario == "deploy":
        duration = 3600.0 * scale
        fleet = [new_replica() for _ in range(replicas)]
        for replica in fleet:
            replica.start()
        await clock.run_until(origin + duration)
    elif scenario == "rolling":
        duration = 3600.0 * scale
        batch = max(1, replicas // 10)
        for index in range(0, replicas, batch):
            at = origin + 60.0 * (index // batch)
            await clock.run_until(at)
            started = [new_replica() for _ in range(min(batch, replicas - index))]
            for replica in started:
                replica.start()
            fleet += started
        await clock.run_until(origin + duration)
    elif scenario == "steady":
        warmup = MAX_LIFETIME * scale
        duration = warmup + 7200.0 * scale
        starts = sorted(rng.uniform(0.0, warmup) for _ in range(replicas))
        for at in starts:
            await clock.run_until(origin + at)
            replica = new_replica()
            replica.start()
            fleet.append(replica)
        await clock.run_until(origin + duration)
    elif scenario == "drop":
        drop_at = 1200.0 * scale
        duration = drop_at + 2700.0 * scale
        fleet = [new_replica() for _ in range(replicas)]
        for replica in fleet:
            replica.start()
        await clock.run_until(origin + drop_at)
        for replica in fleet:
            replica.drop_all()
        await clock.run_until(origin + duration)
    else:
        raise ValueError(f"unknown scenario {scenario!r}")
    for replica in fleet:
        await replica.aclose()

    counted_from = int(warmup)
    seconds = int(duration)
    per_second = [server.per_second.get(s, 0) for s in range(counted_from, seconds)]
    last_first = max(server.first_lifetime_logins, default=0.0)
    after = max(0, min(seconds, math.ceil(last_first + MAX_LIFETIME)) - counted_from)
    after_burst = max(0, min(seconds, math.floor(last_first) + 1) - counted_from)
    hours = (duration - warmup) / 3600.0
    counted_fetches = [[t for t in log if t >= warmup] for log in fetch_logs]
    per_replica_hour = sum(len(log) for log in counted_fetches) / len(fetch_logs) / hours
    in_rotation = max(
        (
            max((sum(1 for u in log if t <= u < t + ROTATION) for t in log), default=0)
            for log in counted_fetches
        ),
        default=0,
    )
    return Outcome(
        per_second=per_second,
        after=after,
        after_burst=after_burst,
        fetches_per_replica_hour=per_replica_hour,
        max_fetches_in_a_rotation=in_rotation,
        replicas=replicas,
        simulated_seconds=seconds - counted_from,
        logins=sum(per_second),
    )


def _figures(outcome: Outcome) -> dict[str, Any]:
    series = outcome.per_second
    after = series[outcome.after :]
    return {
        "peak": max(series, default=0),
        "p99": percentile(series, 99),
        "peak_after_first_lifetime": max(after, default=0),
        "p99_after_first_lifetime": percentile(after, 99) if after else 0.0,
        "first_lifetime_ends_at": outcome.after,
        "peak_after_burst": max(series[outcome.after_burst :], default=0),
        "burst_ends_at": outcome.after_burst,
        "logins": outcome.logins,
        "simulated_seconds": outcome.simulated_seconds,
        "credential_fetches_per_replica_hour": outcome.fetches_per_replica_hour,
        "max_fetches_by_a_replica_in_one_rotation": outcome.max_fetches_in_a_rotation,
        "per_second": series,
    }


async def run(env: Any, quick: bool) -> CaseResult:
    """Run every scenario for both fleet shapes, with the defaults and the recommended rate."""
    del env
    result = CaseResult(NAME, TITLE)
    # Quick runs keep the durations (the figures after the first lifetime need them) and
    # shrink the fleets.
    shapes = ((50, 20), (10, 50)) if quick else SHAPES
    scale = 1.0
    figures: dict[str, Any] = {}
    for replicas, size in shapes:
        for settings, rate in (
            ("defaults", None),
            ("recommended", recommended_connect_rate(replicas)),
        ):
            for scenario in SCENARIOS:
                outcome = await simulate(
                    scenario, replicas=replicas, size=size, connect_rate=rate, scale=scale
                )
                key = f"{replicas}x{size}/{settings}/{scenario}"
                print(f"   ... {key} simulated", flush=True)
                figures[key] = _figures(outcome)
                figures[key]["max_connect_rate"] = rate
    # The previous release for comparison: first lifetimes inside the 10 % jitter window.
    replicas, size = shapes[0]
    saved = _lifetime.FIRST_LIFETIME_SPREAD
    _lifetime.FIRST_LIFETIME_SPREAD = 0.0
    try:
        before = _figures(await simulate("deploy", replicas=replicas, size=size, connect_rate=None))
    finally:
        _lifetime.FIRST_LIFETIME_SPREAD = saved
    result.figures = {"runs": figures, "throttle": THROTTLE, "quick": quick}
    result.figures["previous_release_deploy"] = {
        k: v for k, v in before.items() if k != "per_second"
    }
    _rows(result, figures, shapes)
    result.add(
        f"{replicas} x {size}, deploy, previous release (first lifetimes in the jitter window)",
        f"after the burst peak {before['peak_after_burst']}; after the first lifetime peak "
        f"{before['peak_after_first_lifetime']}, p99 {before['p99_after_first_lifetime']:.0f}"
        " logins/s",
    )
    return result


def _rows(result: CaseResult, figures: dict[str, Any], shapes: Any) -> None:
    for replicas, size in shapes:
        rate = recommended_connect_rate(replicas)
        for settings in ("defaults", "recommended"):
            label = f"{replicas} x {size}, {settings}"
            if settings == "recommended":
                label += f" (max_connect_rate={rate:g})"
            for scenario in SCENARIOS:
                f = figures[f"{replicas}x{size}/{settings}/{scenario}"]
                value = (
                    f"peak {f['peak']}, p99 {f['p99']:.0f}; after the burst peak "
                    f"{f['peak_after_burst']}; after the first lifetime peak "
                    f"{f['peak_after_first_lifetime']}, p99 "
                    f"{f['p99_after_first_lifetime']:.0f}"
                )
                target, met = "", None
                if settings == "defaults":
                    target = f"after the burst <= {THROTTLE}"
                    met = f["peak_after_burst"] <= THROTTLE
                elif scenario in ("drop", "deploy", "rolling"):
                    target = f"whole run < {THROTTLE}"
                    met = f["peak"] < THROTTLE
                result.add(f"{label}, {scenario}: logins/s", value, target, met)
        worst = max(
            figures[f"{replicas}x{size}/{settings}/{scenario}"][
                "max_fetches_by_a_replica_in_one_rotation"
            ]
            for settings in ("defaults", "recommended")
            for scenario in SCENARIOS
        )
        hourly = figures[f"{replicas}x{size}/defaults/steady"][
            "credential_fetches_per_replica_hour"
        ]
        result.add(
            f"{replicas} x {size}: credential fetches per replica (900 s credentials)",
            f"{hourly:.2f} an hour in steady state; at most {worst} in any {ROTATION:.0f} s "
            "rotation, any scenario",
            "<= 1 per replica per rotation",
            worst <= 1,
        )
    result.notes.append(
        "Simulated on a ManualClock with the library's own Recycler, TokenBucket and "
        "CredentialCache per replica (see benchmarks/case_fleet.py); the figures are logins "
        "per simulated second, fleet-wide, and do not depend on this machine's speed. "
        f"Recommended settings: max_connect_rate = {FLEET_CONNECT_RATE:g} / replicas "
        "(per pool), the rest as the defaults (max_lifetime 900 s, jitter 0.1). With the "
        "defaults nothing limits the rate of a deploy or a reconnect after a drop: those "
        "bursts are the whole fleet at once, which is what max_connect_rate is for; the "
        "target for the defaults is that recycling never bunches them again afterwards."
    )


def plot(result: CaseResult, out: Path) -> None:
    """One PNG per scenario: logins per simulated second, each shape and setting."""
    runs = result.figures.get("runs")
    if not runs:
        return
    shapes = sorted({key.split("/")[0] for key in runs}, key=lambda s: -int(s.split("x")[0]))
    for scenario in SCENARIOS:
        figure, axes = new_figure(10, 3.2 * len(shapes), rows=len(shapes))
        axes = list(axes) if len(shapes) > 1 else [axes]
        for ax, shape in zip(axes, shapes, strict=True):
            for settings, style in (("defaults", "-"), ("recommended", "--")):
                f = runs[f"{shape}/{settings}/{scenario}"]
                series = f["per_second"]
                label = settings
                if f["max_connect_rate"]:
                    label += f" (max_connect_rate={f['max_connect_rate']:g})"
                minutes = [second / 60 for second in range(len(series))]
                ax.plot(minutes, series, style, linewidth=0.7, label=label)
            ax.axhline(THROTTLE, color="red", linewidth=0.8, linestyle="--", label="RDS throttle")
            ax.set_yscale("symlog", linthresh=10)
            ax.set_ylim(bottom=0)
            ax.set_ylabel("logins in that second")
            replicas, size = shape.split("x")
            ax.set_title(f"{scenario}: {replicas} replicas x {size} connections")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7, loc="upper right")
        axes[-1].set_xlabel("simulated minutes (counted part of the run)")
        result.plots.append(save_figure(figure, out / f"fleet_{scenario}.png"))
    compact = {
        key: {k: v for k, v in value.items() if k != "per_second"} for key, value in runs.items()
    }
    (out / "fleet.json").write_text(json.dumps(compact, indent=1) + "\n")
