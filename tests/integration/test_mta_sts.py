"""MTA-STS end to end at the worker: the policy comes from a real DNS server (dnsmasq: the _mta-sts TXT record,
the MX records, the addresses) and a real HTTPS server with a test-CA certificate; the MX hosts are real SMTP
servers (aiosmtpd) offering STARTTLS. `enforce` delivers only to listed MX hosts over verified TLS and defers
the rest with 4.7.5; `testing` delivers anyway; no record means no policy."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
import trustme

from cluster.bus.schemas import Deliver
from cluster.config import config_from_dict
from cluster.delivery.worker import Worker
from tests.support.harness import DnsServer, running
from tests.support.tls_peers import PolicyServer, StartTlsSmtp
from tests.support.tooling import free_port

pytestmark = pytest.mark.integration


def policy(mode: str, *mx: str) -> str:
    return "version: STSv1\r\nmode: " + mode + "\r\n" + "".join(f"mx: {m}\r\n" for m in mx) + "max_age: 86400\r\n"


# domain -> (MX host, its address, the name on its certificate or None for no STARTTLS, the policy or None)
DOMAINS = {
    "enforce.test": ("mx.enforce.test", "127.0.0.21", "mx.enforce.test", policy("enforce", "mx.enforce.test")),
    "badcert.test": ("mx.badcert.test", "127.0.0.22", "wrong.test", policy("enforce", "*.badcert.test")),
    "nomatch.test": ("mx.nomatch.test", "127.0.0.23", "mx.nomatch.test", policy("enforce", "*.elsewhere.test")),
    "notls.test": ("mx.notls.test", "127.0.0.24", None, policy("enforce", "mx.notls.test")),
    "testing.test": ("mx.testing.test", "127.0.0.25", "wrong.test", policy("testing", "*.elsewhere.test")),
    "plain.test": ("mx.plain.test", "127.0.0.26", None, None),
}


def _server_context(ca: trustme.CA, name: str | None) -> ssl.SSLContext | None:
    if name is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(name).configure_cert(context)
    return context


async def test_enforce_testing_and_no_policy(tmp_path: Path, ca: trustme.CA) -> None:
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    policies = {domain: text for domain, (_, _, _, text) in DOMAINS.items() if text is not None}
    smtp_port = free_port()
    mx = [(domain, host, 10) for domain, (host, _, _, _) in DOMAINS.items()]
    hosts = {host: address for host, address, _, _ in DOMAINS.values()}
    hosts.update({f"mta-sts.{domain}": "127.0.0.1" for domain in policies})
    txt = {f"_mta-sts.{domain}": ["v=STSv1; id=20261129;"] for domain in policies}
    servers = {domain: StartTlsSmtp(address, smtp_port, _server_context(ca, cert))
               for domain, (_, address, cert, _) in DOMAINS.items()}
    with running(DnsServer(mx, hosts, txt)) as dns_server, running(PolicyServer(ca, policies)) as policy_server:
        for server in servers.values():
            server.start()
        try:
            config = config_from_dict({
                "delivery": {"port": smtp_port, "nameservers": [dns_server.address], "connect_timeout": 5},
                "mta_sts": {"ca_file": str(ca_file), "https_port": policy_server.port, "fetch_timeout": 5},
                "metrics": {"listen": ""}}, environ={})
            deliverer = Worker(config).deliverer
            outcomes = {}
            for domain in DOMAINS:
                job = Deliver("j", "q", "s@sender.test", [f"rcpt@{domain}"], domain, b"Subject: t\r\n\r\nt\r\n", 1)
                (outcomes[domain],) = await deliverer.deliver(job)
            deliverer.cache.close_all()
        finally:
            for server in servers.values():
                server.stop()
    status = {domain: (o.kind, o.enhanced) for domain, o in outcomes.items()}
    assert status["enforce.test"][0] == "delivered", outcomes["enforce.test"]
    assert servers["enforce.test"].messages == [(["rcpt@enforce.test"], True)]
    for refused in ("badcert.test", "nomatch.test", "notls.test"):
        assert status[refused] == ("deferred", "4.7.5"), outcomes[refused]
        assert "MTA-STS" in outcomes[refused].text
        assert servers[refused].messages == []
    assert status["testing.test"][0] == "delivered" and status["plain.test"][0] == "delivered"
    assert servers["plain.test"].messages == [(["rcpt@plain.test"], False)]
    # One fetch per domain with a policy, none for the domain without.
    assert policy_server.requests == len(policies)
