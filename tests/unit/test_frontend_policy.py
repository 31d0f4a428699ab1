"""Relay policy (no open relay) and the Received header."""

from __future__ import annotations

from cluster.frontend.policy import RelayPolicy
from cluster.frontend.received import received_header
from cluster.smtp.replies import RELAY_DENIED


def test_relay_networks_and_local_domains() -> None:
    policy = RelayPolicy(["127.0.0.0/8", "2001:db8::/32"], ["Local.Test", "bücher.de"])
    assert policy.client_may_relay("127.0.0.5")
    assert policy.client_may_relay("::ffff:127.0.0.1")
    assert policy.client_may_relay("2001:db8::1")
    assert not policy.client_may_relay("192.0.2.1")
    assert not policy.client_may_relay("garbage")
    outsider = policy.client_may_relay("192.0.2.1")
    assert policy.check_recipient(outsider, "local.test") is None
    assert policy.check_recipient(outsider, "xn--bcher-kva.de") is None
    assert policy.check_recipient(outsider, "elsewhere.test") == RELAY_DENIED
    assert RELAY_DENIED.code == 554 and RELAY_DENIED.enhanced == "5.7.1"
    assert policy.check_recipient(True, "elsewhere.test") is None


def test_received_header_is_safe_and_hides_bcc() -> None:
    header = received_header(helo="evil\r\nX-Injected: yes", client_ip="192.0.2.1", hostname="mx.test",
                             protocol="ESMTP", trace_id="abc", recipients=["a@b.test"], timestamp=0)
    text = header.decode()
    assert text.startswith("Received: from evil??X-Injected:?yes ([192.0.2.1])\r\n")
    assert "\tfor <a@b.test>; Thu, 01 Jan 1970 00:00:00 +0000\r\n" in text
    assert text.count("\r\n") == 3 and "\n" not in text.replace("\r\n", "")
    many = received_header(helo=None, client_ip="::1", hostname="mx.test", protocol="SMTP", trace_id="abc",
                           recipients=["a@b.test", "c@d.test"], timestamp=0).decode()
    assert "a@b.test" not in many and "from unknown" in many
