"""Routing: the transport table (exact domain, ".parent" suffix), then the smarthost, then MX."""

from __future__ import annotations

import pytest

from cluster.config import DeliveryConfig
from cluster.delivery.routing import ErrorRoute, LocalRoute, Router, SmtpRoute, parse_transport


def router(**values: object) -> Router:
    return Router(DeliveryConfig(**values))  # type: ignore[arg-type]


TABLE = {
    "example.com": "smtp:[10.0.0.5]:2525",
    ".example.com": "smtp:relay.example.net",
    ".deep.example.com": "local",
    "Blocked.Test": "error:5.7.1 No mail for you",
    "later.test": "error:4.3.2",
}


@pytest.mark.parametrize(("domain", "expected"), [
    ("example.com", SmtpRoute("10.0.0.5", 2525, mx_lookup=False)),
    ("EXAMPLE.com.", SmtpRoute("10.0.0.5", 2525, mx_lookup=False)),
    ("sub.example.com", SmtpRoute("relay.example.net", 25, mx_lookup=True)),
    ("a.b.example.com", SmtpRoute("relay.example.net", 25, mx_lookup=True)),
    ("x.deep.example.com", LocalRoute()),
    ("deep.example.com", SmtpRoute("relay.example.net", 25, mx_lookup=True)),
    ("blocked.test", ErrorRoute(550, "5.7.1", "No mail for you")),
    ("other.org", SmtpRoute("other.org", 25, mx_lookup=True)),
    ("notexample.com", SmtpRoute("notexample.com", 25, mx_lookup=True)),
])
def test_table_exact_then_longest_suffix_then_mx(domain: str, expected: object) -> None:
    assert router(transports=TABLE).route(domain) == expected


def test_error_transport_without_text_and_temporary_class() -> None:
    route = router(transports=TABLE).route("later.test")
    assert isinstance(route, ErrorRoute) and (route.code, route.enhanced) == (450, "4.3.2")
    assert route.text


def test_smarthost_after_table_and_before_mx() -> None:
    r = router(transports=TABLE, smarthost="relay.local:587")
    assert r.route("other.org") == SmtpRoute("relay.local", 587, mx_lookup=False)
    assert r.route("example.com") == SmtpRoute("10.0.0.5", 2525, mx_lookup=False)
    assert router(smarthost="[::1]:2525").route("x.org") == SmtpRoute("::1", 2525, mx_lookup=False)


def test_mx_port_comes_from_config() -> None:
    assert router(port=2526).route("x.org") == SmtpRoute("x.org", 2526, mx_lookup=True)
    assert parse_transport("smtp:relay.example:26", 25) == SmtpRoute("relay.example", 26, mx_lookup=True)


def test_unparseable_entry_defers_instead_of_crashing() -> None:
    route = parse_transport("carrier-pigeon:", 25)
    assert isinstance(route, ErrorRoute) and route.code == 451 and route.enhanced == "4.3.5"
