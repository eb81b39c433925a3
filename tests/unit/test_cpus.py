"""The CPUs a process may really use: its affinity mask capped by a cgroup v1 or v2 quota."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from multimail import config
from multimail.cpus import cgroup_cpu_limit, parse_cfs, parse_cpu_max, usable_cpus

SetAffinity = Callable[[int], None]


@pytest.fixture
def affinity(monkeypatch: pytest.MonkeyPatch) -> SetAffinity:
    """Shows 8 CPUs in the affinity mask (not the test host's); call it to show another count."""

    def set_affinity(count: int) -> None:
        monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(count)))

    set_affinity(8)
    return set_affinity


def v2(root: Path, cpu_max: str, cgroup: str = "/") -> Path:
    """A cgroup v2 tree with ``cpu.max`` at ``cgroup``; returns the /proc/self/cgroup file."""
    directory = root / cgroup.lstrip("/")
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "cpu.max").write_text(cpu_max + "\n")
    self_cgroup = root.parent / "self_cgroup"
    self_cgroup.write_text(f"0::{cgroup}\n")
    return self_cgroup


def v1(root: Path, quota: str, period: str = "100000", cgroup: str = "/") -> Path:
    """A cgroup v1 cpu hierarchy with a CFS quota at ``cgroup``; returns /proc/self/cgroup."""
    directory = root / "cpu" / cgroup.lstrip("/")
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "cpu.cfs_quota_us").write_text(quota + "\n")
    (directory / "cpu.cfs_period_us").write_text(period + "\n")
    self_cgroup = root.parent / "self_cgroup"
    self_cgroup.write_text(f"4:cpu,cpuacct:{cgroup}\n1:name=systemd:{cgroup}\n0::/\n")
    return self_cgroup


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """An empty directory standing in for /sys/fs/cgroup."""
    (tmp_path / "cgroup").mkdir()
    return tmp_path / "cgroup"


def test_v2_max_is_no_limit(root: Path, affinity: SetAffinity) -> None:
    """``cpu.max`` of "max 100000" leaves the affinity mask as it is."""
    self_cgroup = v2(root, "max 100000")
    assert cgroup_cpu_limit(root, self_cgroup) is None
    assert usable_cpus(root, self_cgroup) == 8


def test_v2_quota_of_one_cpu_caps_the_affinity_mask(root: Path, affinity: SetAffinity) -> None:
    """``docker run --cpus=1`` on an 8-CPU host: one CPU usable."""
    self_cgroup = v2(root, "100000 100000")
    assert cgroup_cpu_limit(root, self_cgroup) == 1.0
    assert usable_cpus(root, self_cgroup) == 1


def test_v2_fractional_quota_rounds_up(root: Path, affinity: SetAffinity) -> None:
    """1.5 CPUs of quota count as 2 usable CPUs (the half runs alongside the whole one)."""
    self_cgroup = v2(root, "150000 100000")
    assert cgroup_cpu_limit(root, self_cgroup) == 1.5
    assert usable_cpus(root, self_cgroup) == 2


def test_v1_minus_one_is_no_limit(root: Path, affinity: SetAffinity) -> None:
    """``cpu.cfs_quota_us`` of -1 leaves the affinity mask as it is."""
    self_cgroup = v1(root, "-1")
    assert cgroup_cpu_limit(root, self_cgroup) is None
    assert usable_cpus(root, self_cgroup) == 8


def test_v1_quota_caps_the_affinity_mask(root: Path, affinity: SetAffinity) -> None:
    """A v1 CFS quota of 3 periods per period allows 3 CPUs."""
    self_cgroup = v1(root, "150000", "50000")
    assert cgroup_cpu_limit(root, self_cgroup) == 3.0
    assert usable_cpus(root, self_cgroup) == 3


def test_affinity_smaller_than_quota_wins(root: Path, affinity: SetAffinity) -> None:
    """A quota of 4 CPUs on a process pinned to 2 CPUs leaves 2."""
    affinity(2)
    self_cgroup = v2(root, "400000 100000")
    assert usable_cpus(root, self_cgroup) == 2


@pytest.mark.parametrize(
    "cpu_max", ["", "garbage", "150000", "150000 0", "0 100000", "1.5 1", "150000 100000 7"]
)
def test_garbled_v2_file_means_no_quota(root: Path, affinity: SetAffinity, cpu_max: str) -> None:
    """A ``cpu.max`` that is not "<quota> <period>" with both positive is ignored."""
    self_cgroup = v2(root, cpu_max)
    assert cgroup_cpu_limit(root, self_cgroup) is None
    assert usable_cpus(root, self_cgroup) == 8


@pytest.mark.parametrize(("quota", "period"), [("x", "100000"), ("100000", ""), ("-5", "1")])
def test_garbled_v1_files_mean_no_quota(
    root: Path, affinity: SetAffinity, quota: str, period: str
) -> None:
    """CFS files that do not hold a positive quota and period are ignored."""
    self_cgroup = v1(root, quota, period)
    assert cgroup_cpu_limit(root, self_cgroup) is None


def test_undecodable_file_means_no_quota(root: Path, affinity: SetAffinity) -> None:
    """Bytes that are not text in ``cpu.max`` are ignored, not raised."""
    self_cgroup = v2(root, "")
    (root / "cpu.max").write_bytes(b"\xff\xfe 100000")
    assert usable_cpus(root, self_cgroup) == 8


def test_missing_files_mean_no_quota(tmp_path: Path, affinity: SetAffinity) -> None:
    """No cgroup tree and no /proc/self/cgroup: the affinity mask alone."""
    missing = tmp_path / "nowhere"
    assert cgroup_cpu_limit(missing, missing / "cgroup") is None
    assert usable_cpus(missing, missing / "cgroup") == 8


def test_v1_period_file_missing_means_no_quota(root: Path) -> None:
    """A quota without its period cannot be turned into CPUs, so it is ignored."""
    self_cgroup = v1(root, "100000")
    (root / "cpu" / "cpu.cfs_period_us").unlink()
    assert cgroup_cpu_limit(root, self_cgroup) is None


def test_quota_on_the_process_own_cgroup_counts(root: Path, affinity: SetAffinity) -> None:
    """Without a cgroup namespace the quota sits on the process's own cgroup, not the root."""
    self_cgroup = v2(root, "200000 100000", cgroup="/system.slice/multimail.service")
    assert usable_cpus(root, self_cgroup) == 2


def test_tightest_quota_on_the_way_to_the_root_wins(root: Path, affinity: SetAffinity) -> None:
    """A parent cgroup's smaller quota limits its children too."""
    v2(root, "100000 100000", cgroup="/kubepods")
    self_cgroup = v2(root, "300000 100000", cgroup="/kubepods/pod1")
    assert cgroup_cpu_limit(root, self_cgroup) == 1.0


def test_own_cgroup_the_container_cannot_see_falls_back_to_the_root(
    root: Path, affinity: SetAffinity
) -> None:
    """v1 without a namespace: /proc names /docker/<id>, the container's cgroup is the root."""
    self_cgroup = v1(root, "100000", cgroup="/")
    self_cgroup.write_text("4:cpu,cpuacct:/docker/0123abcd\n0::/\n")
    assert usable_cpus(root, self_cgroup) == 1


def test_own_cgroup_path_cannot_climb_out_of_the_root(
    tmp_path: Path, root: Path, affinity: SetAffinity
) -> None:
    """A path with ``..`` in /proc/self/cgroup is not followed outside the cgroup root."""
    (tmp_path / "cpu.max").write_text("100000 100000\n")
    self_cgroup = v2(root, "max 100000")
    self_cgroup.write_text("0::/../\n")
    assert cgroup_cpu_limit(root, self_cgroup) is None


@pytest.mark.parametrize(("cpu_max", "children"), [("max 100000", 1), ("100000 100000", 0)])
def test_compose_children_default_follows_the_quota(
    root: Path,
    affinity: SetAffinity,
    monkeypatch: pytest.MonkeyPatch,
    cpu_max: str,
    children: int,
) -> None:
    """On a 2-CPU affinity mask a 1-CPU quota means no compose child; no quota means one."""
    affinity(2)
    self_cgroup = v2(root, cpu_max)
    monkeypatch.setattr(config, "usable_cpus", functools.partial(usable_cpus, root, self_cgroup))
    monkeypatch.delenv("MULTIMAIL_COMPOSE_PROCESSES", raising=False)
    assert config.default_compose_processes() == children
    assert config.Settings().compose_processes == children


def test_compose_child_under_one_and_a_half_cpus(
    root: Path, affinity: SetAffinity, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 1.5-CPU quota starts a compose child: it can spend the half the worker cannot."""
    self_cgroup = v2(root, "150000 100000")
    monkeypatch.setattr(config, "usable_cpus", functools.partial(usable_cpus, root, self_cgroup))
    assert config.default_compose_processes() == 1


positive = st.integers(min_value=1, max_value=10**9)


@given(quota=positive, period=positive)
def test_any_positive_quota_is_quota_over_period(quota: int, period: int) -> None:
    """Both file formats turn a positive quota and period into quota/period CPUs."""
    assert parse_cpu_max(f"{quota} {period}\n") == quota / period
    assert parse_cfs(f"{quota}\n", f"{period}\n") == quota / period


@given(text=st.text())
def test_parsers_never_raise_and_only_report_positive_limits(text: str) -> None:
    """Whatever a file holds, the parsers answer None or a positive number of CPUs."""
    for limit in (parse_cpu_max(text), parse_cfs(text, "100000"), parse_cfs("100000", text)):
        assert limit is None or limit > 0
