"""What `mtacluster up` starts: every shard, the workers, the mailbox, the frontends, each with its own metrics port."""

from __future__ import annotations

from cluster.config import config_from_dict
from cluster.supervisor import plan_children


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


def test_plan_without_config_file_or_metrics() -> None:
    config = config_from_dict({"metrics": {"listen": ""}}, environ={})
    children = plan_children(config, None)
    assert len(children) == 6
    assert all("--config" not in c.args for c in children)
    assert all("MTACLUSTER_METRICS_LISTEN" not in c.env or c.env["MTACLUSTER_METRICS_LISTEN"] == ""
               for c in children)


def test_plan_without_mailbox() -> None:
    config = config_from_dict({"up": {"mailbox": False}}, environ={})
    assert [c.role for c in plan_children(config, None)] == ["queue", "worker", "worker", "frontend", "frontend"]
