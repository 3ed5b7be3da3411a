"""benchmarks.profile_pool's system call counts: strace's summary read right, and a real count."""

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
