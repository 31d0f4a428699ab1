"""Delivery attempts against a real DNS server (dnsmasq with a test zone) and real SMTP peers (smtp-sink on
several 127.0.0.x addresses sharing one port): MX order and backup hosts, DNS outcomes, transports, reuse."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from cluster.bus.schemas import Deliver, Outcome
from cluster.config import Config, config_from_dict
from cluster.delivery.connections import ConnectionCache
from cluster.delivery.deliver import Deliverer
from cluster.delivery.mx import CachingMxResolver, DnsMxResolver
from tests.support.harness import DnsServer, SmtpSink
from tests.support.tooling import free_port

pytestmark = pytest.mark.integration

BODY = b"Received: from test\r\nSubject: routing\r\n\r\nhello\r\n"

# name -> (address, smtp-sink options or None for "nothing listens there")
HOSTS: dict[str, tuple[str, list[str] | None]] = {
    "mx1.backup.test": ("127.0.0.11", None),
    "mx2.backup.test": ("127.0.0.12", []),
    "quits.test": ("127.0.0.13", ["-Q", "rcpt"]),
    "softrcpt.test": ("127.0.0.14", ["-r", "rcpt"]),
    "down1.test": ("127.0.0.21", None),
    "down2.test": ("127.0.0.22", None),
    "amx.test": ("127.0.0.23", []),
    "direct.test": ("127.0.0.9", []),
}
MX = [
    ("backup.test", "mx1.backup.test", 10), ("backup.test", "mx2.backup.test", 20),
    ("q421.test", "quits.test", 10), ("q421.test", "mx2.backup.test", 20),
    ("soft.test", "softrcpt.test", 10), ("soft.test", "mx2.backup.test", 20),
    ("alldown.test", "down1.test", 10), ("alldown.test", "down2.test", 20),
    ("noaddr.test", "nowhere.test", 10),
    ("only421.test", "quits.test", 10),
    ("onlysoft.test", "softrcpt.test", 10),
]


@dataclass
class Peers:
    port: int
    dns: str
    sinks: dict[str, SmtpSink]

    def config(self, **delivery: Any) -> Config:
        return config_from_dict({
            "smtp": {"hostname": "client.test"},
            "delivery": {"port": self.port, "nameservers": [self.dns], "connect_timeout": 2, **delivery},
            "metrics": {"listen": ""},
        }, environ={})


@pytest.fixture(scope="module")
def peers() -> Iterator[Peers]:
    port = free_port("127.0.0.12")
    dns = DnsServer(MX, {name: address for name, (address, _) in HOSTS.items()}).start()
    sinks: dict[str, SmtpSink] = {}
    try:
        for name, (address, options) in HOSTS.items():
            if options is not None:
                sinks[name] = SmtpSink(host=address, port=port, options=options).start()
        yield Peers(port, dns.address, sinks)
    finally:
        for sink in sinks.values():
            sink.stop()
        dns.stop()


async def deliver(config: Config, *recipients: str, deliverer: Deliverer | None = None) -> list[Outcome]:
    deliverer = deliverer or make_deliverer(config)
    job = Deliver(job_id="j", queue_id="q", sender="sender@origin.test", recipients=list(recipients),
                  domain=recipients[0].rpartition("@")[2], body=BODY, attempt=1)
    try:
        return await deliverer.deliver(job)
    finally:
        deliverer.cache.close_all()


def make_deliverer(config: Config) -> Deliverer:
    resolver = CachingMxResolver(DnsMxResolver(config.delivery.nameservers, timeout=5))
    return Deliverer(config, resolver, ConnectionCache(30, 100))


def statuses(outcomes: list[Outcome]) -> list[tuple[str, int, str]]:
    return [(o.kind, o.code, o.enhanced) for o in outcomes]


async def test_primary_down_backup_takes_it_in_the_same_attempt(peers: Peers) -> None:
    (outcome,) = await deliver(peers.config(), "user@backup.test")
    assert outcome.kind == "delivered", outcome
    assert outcome.remote == "mx2.backup.test[127.0.0.12]"


async def test_primary_421_on_rcpt_goes_to_backup(peers: Peers) -> None:
    (outcome,) = await deliver(peers.config(), "user@q421.test")
    assert outcome.kind == "delivered", outcome
    assert outcome.remote == "mx2.backup.test[127.0.0.12]"


async def test_without_backup_the_hosts_own_words_are_reported(peers: Peers) -> None:
    (closing,) = await deliver(peers.config(), "user@only421.test")
    assert (closing.kind, closing.code, closing.remote) == ("deferred", 421, "quits.test[127.0.0.13]"), closing
    assert "lost connection" not in closing.text
    (soft,) = await deliver(peers.config(), "user@onlysoft.test")
    assert (soft.kind, soft.remote) == ("deferred", "softrcpt.test[127.0.0.14]"), soft
    assert (soft.code, soft.enhanced, soft.text) == (450, "4.3.0", "Error: command failed")  # smtp-sink's words


async def test_primary_4xx_to_every_rcpt_goes_to_backup(peers: Peers) -> None:
    outcomes = await deliver(peers.config(), "a@soft.test", "b@soft.test")
    assert [o.kind for o in outcomes] == ["delivered", "delivered"], outcomes
    assert {o.remote for o in outcomes} == {"mx2.backup.test[127.0.0.12]"}


async def test_all_hosts_down_defers_with_the_last_hosts_words(peers: Peers) -> None:
    (outcome,) = await deliver(peers.config(), "user@alldown.test")
    assert outcome.kind == "deferred" and outcome.code == 451, outcome
    assert outcome.remote == "down2.test[127.0.0.22]"
    assert "refused" in outcome.text.lower()


async def test_null_mx_fails_at_once(peers: Peers) -> None:
    (outcome,) = await deliver(peers.config(), "user@nullmx.test")
    assert statuses([outcome]) == [("failed", 556, "5.1.10")]


async def test_no_mx_but_an_address_is_delivered_to_it(peers: Peers) -> None:
    (outcome,) = await deliver(peers.config(), "user@amx.test")
    assert outcome.kind == "delivered" and outcome.remote == "amx.test[127.0.0.23]", outcome
    messages = await asyncio.to_thread(peers.sinks["amx.test"].wait_for_messages, 1)
    assert messages[-1].recipients == ["user@amx.test"]


async def test_servfail_defers_with_4_4_3(peers: Peers) -> None:
    (outcome,) = await deliver(peers.config(), "user@servfail.test")
    assert statuses([outcome]) == [("deferred", 451, "4.4.3")]


async def test_nxdomain_fails_with_5_1_2(peers: Peers) -> None:
    (outcome,) = await deliver(peers.config(), "user@nosuchdomain.test")
    assert statuses([outcome]) == [("failed", 550, "5.1.2")]


async def test_mx_host_without_address_defers_with_4_4_4(peers: Peers) -> None:
    (outcome,) = await deliver(peers.config(), "user@noaddr.test")
    assert statuses([outcome]) == [("deferred", 451, "4.4.4")]


async def test_transports_bracketed_host_and_error(peers: Peers) -> None:
    config = peers.config(transports={
        "routed.example": f"smtp:[127.0.0.9]:{peers.port}",
        ".blocked.example": "error:5.7.1 Mail to this domain is not allowed",
    })
    outcomes = await deliver(config, "x@routed.example")
    assert outcomes[0].kind == "delivered" and outcomes[0].remote == "127.0.0.9[127.0.0.9]", outcomes
    messages = await asyncio.to_thread(peers.sinks["direct.test"].wait_for_messages, 1)
    assert "x@routed.example" in messages[-1].recipients
    (blocked,) = await deliver(config, "y@sub.blocked.example")
    assert (blocked.kind, blocked.code, blocked.enhanced, blocked.text) == (
        "failed", 550, "5.7.1", "Mail to this domain is not allowed")


async def test_transport_mx_lookup_of_a_relay_host(peers: Peers) -> None:
    config = peers.config(transports={"elsewhere.example": f"smtp:backup.test:{peers.port}"})
    (outcome,) = await deliver(config, "z@elsewhere.example")
    assert outcome.kind == "delivered" and outcome.remote == "mx2.backup.test[127.0.0.12]", outcome


async def test_smarthost_takes_everything_without_dns(peers: Peers) -> None:
    config = peers.config(smarthost=f"127.0.0.23:{peers.port}", nameservers=["127.0.0.1:9"])
    (outcome,) = await deliver(config, "user@anything.invalid")
    assert outcome.kind == "delivered" and outcome.remote == "127.0.0.23[127.0.0.23]", outcome


async def test_connections_are_reused_across_jobs(peers: Peers) -> None:
    deliverer = make_deliverer(peers.config())
    try:
        for _ in range(3):
            job = Deliver(job_id="j", queue_id="q", sender="s@origin.test", recipients=["r@amx.test"],
                          domain="amx.test", body=BODY, attempt=1)
            assert [o.kind for o in await deliverer.deliver(job)] == ["delivered"]
    finally:
        deliverer.cache.close_all()
    assert deliverer.connections_opened == 1


async def test_recipients_are_split_into_transactions(peers: Peers) -> None:
    config = peers.config(max_recipients_per_transaction=2)
    sink = peers.sinks["amx.test"]
    before = len(sink.messages())
    recipients = [f"split{i}@amx.test" for i in range(5)]
    outcomes = await deliver(config, *recipients)
    assert [o.kind for o in outcomes] == ["delivered"] * 5
    messages = await asyncio.to_thread(sink.wait_for_messages, before + 3)
    split = [m.recipients for m in messages if any(r.startswith("split") for r in m.recipients)]
    assert sorted(len(r) for r in split) == [1, 2, 2]
