"""CPU threads on a shared machine.

PyTorch's OpenMP threads spin while they wait for work (``OMP_WAIT_POLICY`` defaults to active).
Beside another busy process they steal each other's cores, and a collection slows far more than
losing a core explains (README, Benchmarks: measured with and without the passive policy). The
policy is read once, when the OpenMP runtime starts with torch, so `prefer_passive_wait` runs when
``patcher`` is imported, before torch (a caller who imported torch first keeps its policy).
`configure_threads` then sizes torch's pool to the CPUs this process may use: its affinity mask
and its cgroup CPU quota, which ``os.cpu_count()`` and OpenMP ignore.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_V2 = Path("/sys/fs/cgroup/cpu.max")
CGROUP_V1 = (Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"), Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us"))


def prefer_passive_wait() -> None:
    """OpenMP threads sleep instead of spinning when idle, unless the user chose a policy."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _cgroup_cpus() -> float | None:
    """The CPU quota of this process's cgroup in CPUs, or None when there is none."""
    try:
        if CGROUP_V2.is_file():
            quota, period = CGROUP_V2.read_text().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        quota_file, period_file = CGROUP_V1
        if quota_file.is_file() and period_file.is_file():
            quota = int(quota_file.read_text())
            return None if quota <= 0 else quota / int(period_file.read_text())
    except (OSError, ValueError):
        return None
    return None


def available_cpus() -> int:
    """CPUs this process may run on: its affinity mask, capped by its cgroup quota (at least 1)."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    quota = _cgroup_cpus()
    if quota is not None:
        n = min(n, max(1, math.ceil(quota)))
    return max(1, n)


def configure_threads(threads: int | None = None) -> int:
    """Size torch's intra-op pool: ``threads`` when given, else `available_cpus`. Returns the size."""
    import torch

    n = threads if threads is not None else available_cpus()
    if n < 1:
        raise ValueError(n)
    torch.set_num_threads(n)
    return n
