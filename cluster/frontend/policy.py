"""Relay policy: who may send mail to which recipient (ARCHITECTURE.md contract 5: no open relay, ever).

A recipient is accepted when its domain is one of `smtp.local_domains` (anyone may send to us), or when the
client's address is inside `smtp.relay_networks` (our own users and trusted hosts), or when the session has
authenticated with SMTP AUTH over TLS (the session passes `client_may_relay=True` then, see
`cluster.frontend.session`). Everything else is refused with 554 5.7.1.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from cluster.bus.ring import domain_key
from cluster.smtp.reply import Reply

RELAY_DENIED = Reply.of(554, "5.7.1", "Relay access denied: this server does not relay for you")


class RelayPolicy:
    def __init__(self, relay_networks: Iterable[str], local_domains: Iterable[str]) -> None:
        self.networks = [ipaddress.ip_network(n, strict=False) for n in relay_networks]
        self.local_domains = frozenset(domain_key(d) for d in local_domains)

    def client_may_relay(self, client_ip: str) -> bool:
        try:
            address = ipaddress.ip_address(client_ip.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address.version == net.version and address in net for net in self.networks)

    def is_local(self, ascii_domain: str) -> bool:
        return domain_key(ascii_domain) in self.local_domains

    def check_recipient(self, client_may_relay: bool, ascii_domain: str) -> Reply | None:
        """None when the recipient is acceptable, else the refusal to send."""
        if client_may_relay or self.is_local(ascii_domain):
            return None
        return RELAY_DENIED
