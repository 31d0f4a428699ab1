"""What `mtacluster up` starts: every shard, the workers, the mailbox, the frontends, each with its own metrics port."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster import cpu_limits
from cluster.config import UpConfig, config_from_dict, up_processes
from cluster.supervisor import plan_children


@pytest.fixture
def two_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """The defaults of `up` scale with the CPUs: these tests see the 2 CPUs of the project's machine."""
    monkeypatch.setattr(cpu_limits, "usable_cpus", lambda: 2)


def test_plan_starts_shards_then_workers_then_mailbox_then_frontends_with_own_metrics_ports() -> None:
    config = config_from_dict({
        "queue": {"shards": ["tcp://127.0.0.1:7000", "tcp://127.0.0.1:7001"]},
        "metrics": {"listen": "127.0.0.1:9600"},
        "up": {"frontends": 3, "workers": 2},
    }, environ={})
    children = plan_children(config, "/etc/mta.toml")
    assert [c.role for c in children] == ["queue", "queue", "worker", "worker", "mailbox",
                                          "frontend", "frontend", "frontend"]
    assert children[1].args[-4:] == ["--config", "/etc/mta.toml", "--shard", "1"]
    assert children[4].args[-4:] == ["serve", "mailbox", "--config", "/etc/mta.toml"]
    ports = [c.env["MTACLUSTER_METRICS_LISTEN"] for c in children]
    assert ports == [f'"127.0.0.1:{9600 + i}"' for i in range(8)]


def test_plan_without_config_file_or_metrics(two_cpus: None) -> None:
    config = config_from_dict({"metrics": {"listen": ""}}, environ={})
    children = plan_children(config, None)
    assert len(children) == 5  # shard, 1 worker, mailbox, 2 frontends
    assert all("--config" not in c.args for c in children)
    assert all("MTACLUSTER_METRICS_LISTEN" not in c.env or c.env["MTACLUSTER_METRICS_LISTEN"] == ""
               for c in children)


def test_plan_without_mailbox(two_cpus: None) -> None:
    config = config_from_dict({"up": {"mailbox": False}}, environ={})
    assert [c.role for c in plan_children(config, None)] == ["queue", "worker", "frontend", "frontend"]


@pytest.mark.parametrize(("cpus", "expected"), [(1, (1, 1)), (2, (2, 1)), (3, (3, 1)), (8, (8, 4))])
def test_default_process_counts_scale_with_the_cpus(cpus: int, expected: tuple[int, int]) -> None:
    assert up_processes(UpConfig(), cpus) == expected


def test_configured_process_counts_are_kept_whatever_the_cpus() -> None:
    assert up_processes(UpConfig(frontends=3, workers=5), 1) == (3, 5)
    assert up_processes(UpConfig(frontends=1), 8) == (1, 4)  # only the one left at 0 scales
    assert up_processes(UpConfig(workers=2), 8) == (8, 2)


def test_scaled_counts_follow_the_affinity_mask(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_limits.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr(cpu_limits, "cpu_quota", lambda: None)  # whatever limit the machine running this has
    assert cpu_limits.usable_cpus() == 4
    config = config_from_dict({"up": {"mailbox": False}}, environ={})
    assert [c.role for c in plan_children(config, None)].count("frontend") == 4


def cgroups(monkeypatch: pytest.MonkeyPatch, root: Path, membership: str, files: dict[str, str]) -> None:
    """A cgroup file system under `root` holding `files` (path -> content), and this process's membership."""
    for name, content in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(content)
    (root / "self-cgroup").write_text(membership)
    monkeypatch.setattr(cpu_limits, "CGROUP_ROOT", root)
    monkeypatch.setattr(cpu_limits, "CGROUP_MEMBERSHIP", root / "self-cgroup")
    monkeypatch.setattr(cpu_limits.os, "sched_getaffinity", lambda pid: set(range(16)))


def test_scaled_counts_follow_a_cgroup_v2_cpu_limit(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A container limited to 2 CPUs (`docker run --cpus 2`, a Kubernetes limit) on a 16-CPU host: its affinity
    mask still holds 16 CPUs, and 16 frontends and 8 workers would share 2 CPUs' worth of time."""
    cgroups(monkeypatch, tmp_path, "0::/kubepods/pod1/box\n", {
        "cgroup.controllers": "cpu memory", "cpu.max": "max 100000",
        "kubepods/cpu.max": "max 100000", "kubepods/pod1/cpu.max": "200000 100000",
        "kubepods/pod1/box/cpu.max": "max 100000"})
    assert cpu_limits.cpu_quota() == 2.0
    assert cpu_limits.usable_cpus() == 2
    config = config_from_dict({"up": {"mailbox": False}}, environ={})
    assert [c.role for c in plan_children(config, None)] == ["queue", "worker", "frontend", "frontend"]


def test_scaled_counts_follow_a_cgroup_v1_cpu_quota(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    cgroups(monkeypatch, tmp_path, "5:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n0::/\n", {
        "cpu,cpuacct/cpu.cfs_quota_us": "-1", "cpu,cpuacct/cpu.cfs_period_us": "100000",
        "cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "150000", "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000"})
    assert cpu_limits.cpu_quota() == 1.5
    assert cpu_limits.usable_cpus() == 2  # a part of a CPU counts as one


def test_without_a_cpu_limit_the_affinity_mask_decides(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    cgroups(monkeypatch, tmp_path, "0::/user.slice\n", {"unified/user.slice/cpu.max": "max 100000"})
    assert cpu_limits.cpu_quota() is None
    assert cpu_limits.usable_cpus() == 16
