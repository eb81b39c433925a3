"""The delivery worker's settings and their defaults."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest

from multimail import config
from multimail.config import Settings, default_compose_processes
from multimail.cpus import usable_cpus


@pytest.mark.parametrize(("cpus", "children"), [({0}, 0), ({0, 1}, 1), (set(range(16)), 1)])
def test_compose_processes_default_follows_the_cpus_this_process_may_use(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, cpus: set[int], children: int
) -> None:
    # No cgroup files, so a CPU quota on the machine running the tests cannot change the answer.
    monkeypatch.setattr(
        config, "usable_cpus", functools.partial(usable_cpus, tmp_path, tmp_path / "cgroup")
    )
    monkeypatch.delenv("MULTIMAIL_COMPOSE_PROCESSES", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: cpus)
    assert default_compose_processes() == children
    assert Settings().compose_processes == children


def test_compose_processes_set_explicitly_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0, 1})
    monkeypatch.setenv("MULTIMAIL_COMPOSE_PROCESSES", "0")
    assert Settings().compose_processes == 0
    assert Settings(compose_processes=3).compose_processes == 3


def test_delivery_batch_size_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MULTIMAIL_DELIVERY_BATCH_SIZE", raising=False)
    assert Settings().delivery_batch_size == 64
