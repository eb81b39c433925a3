"""How many CPUs this process may really use: its affinity mask capped by a cgroup CPU quota.

A container limited with ``docker run --cpus=1`` or Kubernetes ``limits.cpu: 1`` still sees
every host CPU in its affinity mask; the limit is a quota of CPU time per period in the
cgroup's ``cpu.max`` (cgroup v2) or ``cpu.cfs_quota_us`` and ``cpu.cfs_period_us`` (v1).

The quota may sit on the process's own cgroup or on any ancestor, and the tightest one
applies, so every directory from the process's cgroup (``/proc/self/cgroup``) up to the
root is read. Inside a container with its own cgroup namespace the process's path is ``/``
and the root files are its own; without one the path names a directory the container cannot
see, which is skipped, and the root files (the container's cgroup mounted there) still count.
Anything unreadable, missing or garbled means "no quota": a wrong guess here only costs a
default, never a start.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

CGROUP_ROOT = Path("/sys/fs/cgroup")
SELF_CGROUP = Path("/proc/self/cgroup")


def parse_cpu_max(text: str) -> float | None:
    """CPUs allowed by a cgroup v2 ``cpu.max`` ("150000 100000" -> 1.5; "max 100000" -> None)."""
    fields = text.split()
    if len(fields) != 2 or fields[0] == "max":
        return None
    return _quota_over_period(fields[0], fields[1])


def parse_cfs(quota_text: str, period_text: str) -> float | None:
    """CPUs allowed by cgroup v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` (-1 -> None)."""
    return _quota_over_period(quota_text.strip(), period_text.strip())


def _quota_over_period(quota_text: str, period_text: str) -> float | None:
    try:
        quota, period = int(quota_text), int(period_text)
    except ValueError:
        return None
    # v1 writes -1 for "no limit"; any other non-positive figure is not a limit either.
    if quota <= 0 or period <= 0:
        return None
    return quota / period


def cgroup_cpu_limit(
    cgroup_root: Path = CGROUP_ROOT, self_cgroup: Path = SELF_CGROUP
) -> float | None:
    """The tightest CPU quota on this process's cgroups, in CPUs; None when there is none."""
    limits: list[float] = []
    for v2_dir in _ancestry(cgroup_root, _own_path(self_cgroup, v2=True)):
        limit = parse_cpu_max(_read(v2_dir / "cpu.max"))
        if limit is not None:
            limits.append(limit)
    v1_path = _own_path(self_cgroup, v2=False)
    for v1_dir in _ancestry(cgroup_root / "cpu", v1_path):
        limit = parse_cfs(_read(v1_dir / "cpu.cfs_quota_us"), _read(v1_dir / "cpu.cfs_period_us"))
        if limit is not None:
            limits.append(limit)
    return min(limits, default=None)


def usable_cpus(cgroup_root: Path = CGROUP_ROOT, self_cgroup: Path = SELF_CGROUP) -> int:
    """CPUs this process may use at once: its affinity mask, capped by a cgroup quota.

    A fractional quota rounds up (1.5 CPUs -> 2): a quota is CPU time that any number of
    cores may spend, so the half CPU is there to run something alongside.
    """
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux, where there are no cgroups either
        return os.cpu_count() or 1
    limit = cgroup_cpu_limit(cgroup_root, self_cgroup)
    if limit is not None:
        cpus = min(cpus, math.ceil(limit))
    return max(cpus, 1)


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError):
        return ""


def _own_path(self_cgroup: Path, *, v2: bool) -> PurePosixPath:
    """This process's cgroup path in the v2 or the v1 ``cpu`` hierarchy ("/" if unknown).

    ``/proc/self/cgroup`` lines are ``id:controllers:path``; v2's is ``0::path`` and v1's cpu
    line lists ``cpu`` among its controllers (often ``cpu,cpuacct``).
    """
    for line in _read(self_cgroup).splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, path = parts
        if (v2 and hierarchy == "0" and not controllers) or (
            not v2 and "cpu" in controllers.split(",")
        ):
            own = PurePosixPath(path.strip())
            # Only a plain absolute path can be joined to the root without leaving it.
            if own.is_absolute() and ".." not in own.parts:
                return own
            break
    return PurePosixPath("/")


def _ancestry(root: Path, own: PurePosixPath) -> Iterator[Path]:
    """``root/own``, then each parent directory up to and including ``root``."""
    relative = own.relative_to("/")
    yield root / relative
    for parent in relative.parents:
        yield root / parent
