"""tools.child_usage: a command's own peak memory, whatever the size of the process starting it."""
import sys

from tools.child_usage import run_measured


def test_peak_memory_is_the_commands_own_even_from_a_large_parent():
    ballast = bytearray(400 * 2 ** 20)  # this process is now large
    ballast[::4096] = b"x" * len(ballast[::4096])  # touched, so resident
    small = run_measured([sys.executable, "-c", "print('done')"])
    big = run_measured([sys.executable, "-c", "x = bytearray(300 * 2 ** 20); x[::4096] = "
                        "b'y' * len(x[::4096])"])
    assert small.returncode == 0 and small.peak_rss_mib < 100
    assert 300 < big.peak_rss_mib < 400
    assert big.cpu_s >= 0 and big.wall_s > 0


def test_the_commands_status_is_returned():
    assert run_measured([sys.executable, "-c", "import sys; sys.exit(3)"]).returncode == 3
    killed = run_measured([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), "
                           "signal.SIGKILL)"])
    assert killed.returncode == -9
