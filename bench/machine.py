"""What the benchmark ran on, and whether something else was using its cores."""

from __future__ import annotations

import os
import platform
import subprocess
import time
from pathlib import Path

_TICK_S = 1 / os.sysconf("SC_CLK_TCK")


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _version(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    lines = (done.stdout or done.stderr).strip().splitlines()
    return lines[0] if lines else "unknown"


def git_revision(repo: Path) -> str:
    rev = _version(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"])
    dirty = _version(["git", "-C", str(repo), "status", "--porcelain", "--", "frugalserve"])
    return f"{rev} + uncommitted changes" if dirty not in ("", "unknown") else rev


def source_at(repo: Path, revision: str, dest: Path) -> Path:
    """The `frugalserve/` package of a git revision, extracted under dest (put dest on
    PYTHONPATH to run it). SystemExit naming the revision when git cannot give it."""
    git = subprocess.run(["git", "-C", str(repo), "archive", revision, "frugalserve"],
                         capture_output=True)
    if git.returncode:
        raise SystemExit(f"--against {revision}: {git.stderr.decode().strip()}")
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=git.stdout, check=True)
    return dest


def describe(repo: Path) -> dict[str, str | int]:
    return {
        "nproc": int(_version(["nproc"])),
        "cpu": cpu_model(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "wrk": _version(["wrk", "-v"]).split(" [")[0],
        "frugalserve": git_revision(repo),
    }


def core_ticks(cores: tuple[int, ...]) -> dict[int, tuple[int, int]]:
    """(busy, total) jiffies per core from /proc/stat. Busy is process time (user, nice,
    system) only: interrupt and softirq time is mostly the benchmark's own loopback traffic."""
    ticks = {}
    for line in Path("/proc/stat").read_text().splitlines():
        name, *fields = line.split()
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cores:
            values = [int(f) for f in fields[:8]]  # user nice system idle iowait irq softirq steal
            ticks[int(name[3:])] = (sum(values[:3]), sum(values))
    return ticks


def busy_between(before: dict[int, tuple[int, int]],
                 after: dict[int, tuple[int, int]]) -> dict[int, float]:
    """Fraction of each core busy between two core_ticks readings."""
    return {core: (after[core][0] - before[core][0]) / max(1, after[core][1] - before[core][1])
            for core in before}


def core_busy(cores: tuple[int, ...], seconds: float = 0.5) -> dict[int, float]:
    """Fraction of each core busy over `seconds`: what other processes use while we idle."""
    before = core_ticks(cores)
    time.sleep(seconds)
    return busy_between(before, core_ticks(cores))


def wait_quiet(cores: tuple[int, ...], threshold: float, max_wait_s: float) -> dict[int, float]:
    """Wait (at most max_wait_s) until no core in `cores` is more than `threshold` busy;
    returns the last reading."""
    deadline = time.monotonic() + max_wait_s
    busy = core_busy(cores)
    while max(busy.values()) > threshold and time.monotonic() < deadline:
        busy = core_busy(cores, 1.0)
    return busy


def children(pid: int) -> list[int]:
    """The process ids of a process's children (frugalserve's ledger writer process)."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except FileNotFoundError:  # a thread that ended
            continue
    return found


def tree_cpu_seconds(pid: int) -> float:
    """process_cpu_seconds of a process and its children (those running now)."""
    total = process_cpu_seconds(pid)
    for child in children(pid):
        try:
            total += process_cpu_seconds(child)
        except FileNotFoundError:  # it ended in between
            continue
    return total


def process_cpu_seconds(pid: int, thread: int | None = None) -> float:
    """User + system CPU seconds of a process, all its threads included; or of one of its
    threads (`thread`: its native id; the main thread's is the pid)."""
    stat = Path(f"/proc/{pid}/stat" if thread is None else f"/proc/{pid}/task/{thread}/stat")
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * _TICK_S
