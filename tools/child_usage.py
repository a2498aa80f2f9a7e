"""Run a command and measure what it alone used: wall time, CPU time and peak resident memory.

Linux keeps a process's peak resident memory across `exec`, and a child starts as a copy of its
parent (or, with vfork, inside it): measured with `wait4` directly, a command started by a large
process (pytest, a script that imported torch) reports at least that process's memory. So the
command is started by a small launcher (a fresh Python without site packages, a few MB), which
forks and execs it, waits for it and writes its resource usage to a pipe.
"""
from dataclasses import dataclass
import json
import os
from pathlib import Path
import subprocess
import sys
import time
import typing as tp

# argv: the pipe's write end, then the command; what it writes there holds the command's status.
_LAUNCHER = """
import json, os, sys
fd, command = int(sys.argv[1]), sys.argv[2:]
pid = os.fork()
if pid == 0:
    try:
        os.execvp(command[0], command)
    finally:
        os._exit(127)
_, status, usage = os.wait4(pid, 0)
code = os.waitstatus_to_exitcode(status)
os.write(fd, json.dumps({"returncode": code, "maxrss_kib": usage.ru_maxrss,
                         "cpu_s": usage.ru_utime + usage.ru_stime}).encode())
sys.exit(1 if code else 0)
"""


@dataclass(frozen=True)
class Usage:
    """What one run of a command used. `returncode` is its exit status (negative: a signal)."""
    returncode: int
    wall_s: float
    cpu_s: float
    peak_rss_mib: float


def run_measured(command: tp.Sequence[str], cwd: tp.Optional[Path] = None,
                 env: tp.Optional[tp.Dict[str, str]] = None, stdout: tp.Any = None,
                 stderr: tp.Any = None) -> Usage:
    """Run `command` (like `subprocess.run` with these arguments) and return its usage, measured
    through the small launcher (see the module docstring)."""
    read_end, write_end = os.pipe()
    try:
        begin = time.perf_counter()
        process = subprocess.Popen([sys.executable, "-S", "-c", _LAUNCHER, str(write_end),
                                    *command], cwd=cwd, env=env, stdout=stdout, stderr=stderr,
                                   pass_fds=(write_end,))
        os.close(write_end)
        write_end = -1
        report = b"".join(iter(lambda: os.read(read_end, 4096), b""))
        process.wait()
        wall = time.perf_counter() - begin
    finally:
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)
    if not report:
        raise RuntimeError(f"could not run {' '.join(command)} (status {process.returncode})")
    usage = json.loads(report)
    return Usage(usage["returncode"], wall, usage["cpu_s"], usage["maxrss_kib"] / 1024)
