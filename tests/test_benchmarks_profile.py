"""benchmarks.profile_pool: strace's summary read right, a real count, the handout window."""

from __future__ import annotations

import shutil

import pytest

from benchmarks import profile_pool

SUMMARY = """\
% time     seconds  usecs/call     calls    errors syscall
------ ----------- ----------- --------- --------- ----------------
 24.63    0.043680           2     15908           epoll_wait
  6.86    0.012166          20       600       600 connect
  3.75    0.006646           2      2400           setsockopt
------ ----------- ----------- --------- --------- ----------------
100.00    0.062492           3     18908       600 total
"""


def test_strace_counts_reads_calls_with_and_without_errors() -> None:
    """Each system call's count is read from its row, whether the errors column is blank or
    not, and the total row is left out."""
    assert profile_pool.strace_counts(SUMMARY) == {
        "epoll_wait": 15908,
        "connect": 600,
        "setsockopt": 2400,
    }


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")
async def test_strace_counts_the_system_calls_of_a_stretch() -> None:
    """A stretch that makes 50 setsockopt calls is counted with at least those 50."""
    import socket

    sock = socket.socket()

    async def work(_pool: object, ops: int) -> None:
        for _ in range(ops):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)

    try:
        counts = await profile_pool.Strace().count(work, None, 50)
    except RuntimeError as exc:  # no ptrace here (a container without the capability)
        pytest.skip(str(exc))
    finally:
        sock.close()
    assert counts.get("setsockopt", 0) >= 50


async def test_until_handout_counts_each_acquire_alone() -> None:
    """``--until-handout`` profiles only from each acquire's call to its handout: the pool's
    bookkeeping of a new connection, which runs after the handout (`Pool._adopt`), is in a
    whole connect's calls and not in the window's, while each login is in both."""
    import asyncpg_iam
    from benchmarks._harness import Environment

    async with Environment(max_connections=20) as env:
        pool = await asyncpg_iam.create_pool(
            **env.iam_kwargs(), iam=env.iam_auth(), min_size=0, max_size=1
        )
        try:
            pools = {"e_pool": pool}
            window = await profile_pool._measure_pair(
                pools, 5, 1, None, profile_pool._connects, windowed=True
            )
            whole = await profile_pool._measure_pair(pools, 5, 1, None, profile_pool._connects)
        finally:
            await pool.close()

    def calls(found: dict[str, object], function: str) -> int:
        by_function = found["calls"]["e_pool"]  # type: ignore[index]
        return sum(n for key, n in by_function.items() if key.endswith(f"({function})"))

    assert calls(whole, "_adopt") == 5
    assert calls(window, "_adopt") == 0
    assert calls(window, "_login") >= 5
    assert calls(whole, "_login") == calls(window, "_login")
    [cpu] = window["cpu_us"]["e_pool"]
    assert cpu > 0
