"""Where mail for a recipient domain goes: the transport table, then the smarthost, then MX.

`Router(config.delivery).route(domain)` returns one `Route`:
- `SmtpRoute(host, port, mx_lookup)`: deliver by SMTP to `host`; with `mx_lookup` the host's MX records are
  resolved first (as for the recipient domain itself), without it `host` is connected to directly.
- `LocalRoute()`: deliver to a Maildir under `delivery.maildir_root`.
- `ErrorRoute(code, enhanced, text)`: fail (5.x.y) or defer (4.x.y) at once with that status.

Transport table keys (`delivery.transports`): an exact domain ("example.com") or a parent-domain suffix
(".example.com", matching every subdomain of example.com but not example.com itself, as Postfix's
transport_maps do). Matching is case-insensitive; the exact key wins, then the longest suffix. Values:
"smtp:[host]:port" (no MX lookup, like Postfix's brackets), "smtp:host[:port]" (MX lookup of host), "local",
"error:5.x.y text". The values were validated by cluster.config; a value that still does not parse becomes a
4.3.5 (configuration error) deferral rather than a crash.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from cluster.config import DeliveryConfig, split_host_port
from cluster.domains import domain_key


@dataclass(frozen=True)
class SmtpRoute:
    host: str
    port: int
    mx_lookup: bool


@dataclass(frozen=True)
class LocalRoute:
    pass


@dataclass(frozen=True)
class ErrorRoute:
    code: int
    enhanced: str
    text: str


Route = SmtpRoute | LocalRoute | ErrorRoute

# Routes kept per domain spelling; past this many the memo starts again (a flood of one-off domains).
ROUTES_KEPT = 10_000

_BRACKETED = re.compile(r"smtp:\[([^\]]+)\](?::(\d+))?")
_MX_HOST = re.compile(r"smtp:([A-Za-z0-9.-]+)(?::(\d+))?")
_ERROR = re.compile(r"error:([45])\.(\d{1,3})\.(\d{1,3})(?: (.*))?")


def parse_transport(value: str, default_port: int) -> Route:
    """One transport table value -> Route."""
    value = value.strip()
    if value == "local":
        return LocalRoute()
    if m := _BRACKETED.fullmatch(value):
        return SmtpRoute(m.group(1), int(m.group(2)) if m.group(2) else default_port, mx_lookup=False)
    if m := _MX_HOST.fullmatch(value):
        return SmtpRoute(m.group(1), int(m.group(2)) if m.group(2) else default_port, mx_lookup=True)
    if m := _ERROR.fullmatch(value):
        klass = m.group(1)
        enhanced = f"{klass}.{m.group(2)}.{m.group(3)}"
        text = m.group(4) or ("Delivery refused by configuration" if klass == "5" else "Delivery deferred by "
                              "configuration")
        return ErrorRoute(550 if klass == "5" else 450, enhanced, text)
    return ErrorRoute(451, "4.3.5", f"Bad transport table entry {value!r}")


class Router:
    def __init__(self, config: DeliveryConfig) -> None:
        self._port = config.port
        self._table: Mapping[str, str] = {domain_key(key): value for key, value in config.transports.items()}
        self._smarthost: SmtpRoute | None = None
        self._routes: dict[str, Route] = {}
        if config.smarthost:
            host, port = split_host_port(config.smarthost, 25)
            self._smarthost = SmtpRoute(host, port, mx_lookup=False)

    def table_entry(self, domain: str) -> str | None:
        """The transport table value for `domain`: exact key first, then the longest ".parent" suffix."""
        domain = domain_key(domain)
        if domain in self._table:
            return self._table[domain]
        labels = domain.split(".")
        for start in range(1, len(labels)):
            suffix = "." + ".".join(labels[start:])
            if suffix in self._table:
                return self._table[suffix]
        return None

    def route(self, domain: str) -> Route:
        """The route for `domain` (kept per domain: the table and the smarthost do not change while we run)."""
        route = self._routes.get(domain)
        if route is None:
            if len(self._routes) >= ROUTES_KEPT:
                self._routes.clear()
            route = self._routes[domain] = self._route(domain)
        return route

    def _route(self, domain: str) -> Route:
        entry = self.table_entry(domain)
        if entry is not None:
            return parse_transport(entry, self._port)
        if self._smarthost is not None:
            return self._smarthost
        return SmtpRoute(domain_key(domain), self._port, mx_lookup=True)
