"""Session policy (the hooks, no open relay, submission needs AUTH) and the Received header."""

from __future__ import annotations

import datetime
import email.utils
import random

from cluster.accounts.checks import AccountChecks
from cluster.accounts.policy import AccountPolicy
from cluster.frontend.policy import (
    SUBMISSION,
    PolicyChain,
    RelayPolicy,
    SessionFacts,
    SessionPolicy,
    SubmissionPolicy,
)
from cluster.frontend.received import received_header, rfc5322_date
from cluster.smtp import replies
from cluster.smtp.address import Address
from cluster.smtp.events import MessageReceived
from cluster.smtp.replies import RELAY_DENIED, Reply


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


def test_relay_answers_are_remembered_per_address_and_bounded() -> None:
    policy = RelayPolicy(["127.0.0.0/8"], [])
    for _ in range(2):  # the second time from what was remembered
        assert policy.client_may_relay("127.0.0.5") and not policy.client_may_relay("192.0.2.1")
    for n in range(5000):
        policy.client_may_relay(f"10.0.{n // 256}.{n % 256}")
    assert len(policy._known) <= 4096
    assert policy.client_may_relay("127.0.0.5") and not policy.client_may_relay("192.0.2.1")


def test_received_date_is_what_email_utils_writes() -> None:
    generator = random.Random(7)
    for timestamp in [0, 951782400, 4102444799.9, *(generator.uniform(0, 4e9) for _ in range(2000))]:
        expected = email.utils.format_datetime(datetime.datetime.fromtimestamp(timestamp, datetime.UTC))
        assert rfc5322_date(timestamp) == expected


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


OUTSIDE = Address("someone", "elsewhere.test")


class Recorder(SessionPolicy):
    """Records every question; refuses with `answer` (None: no objection)."""

    def __init__(self, answer: Reply | None = None) -> None:
        self.answer = answer
        self.asked: list[str] = []

    async def check_auth(self, facts: SessionFacts) -> Reply | None:
        self.asked.append("auth")
        return self.answer

    async def check_login(self, facts: SessionFacts, username: str, verified: bool) -> Reply | None:
        self.asked.append(f"login {username} {verified}")
        return self.answer

    async def check_mail(self, facts: SessionFacts, sender: Address | None,
                         params: dict[str, str | None]) -> Reply | None:
        self.asked.append(f"mail {sender}")
        return self.answer

    async def check_rcpt(self, facts: SessionFacts, recipient: Address) -> Reply | None:
        self.asked.append(f"rcpt {recipient}")
        return self.answer

    async def check_message(self, facts: SessionFacts, message: MessageReceived) -> Reply | None:
        self.asked.append("message")
        return self.answer


async def test_the_chain_asks_in_order_and_the_first_refusal_wins() -> None:
    first, refusing, never = Recorder(), Recorder(replies.RELAY_DENIED), Recorder()
    chain = PolicyChain([first, refusing, never])
    facts = SessionFacts(client_ip="192.0.2.1")
    message = MessageReceived(None, (OUTSIDE,), b"x\r\n", False, False)
    assert await chain.check_auth(facts) == replies.RELAY_DENIED
    assert await chain.check_login(facts, "bob", True) == replies.RELAY_DENIED
    assert await chain.check_mail(facts, None, {}) == replies.RELAY_DENIED
    assert await chain.check_rcpt(facts, OUTSIDE) == replies.RELAY_DENIED
    assert await chain.check_message(facts, message) == replies.RELAY_DENIED
    assert first.asked == refusing.asked == ["auth", "login bob True", "mail None", f"rcpt {OUTSIDE}", "message"]
    assert never.asked == []
    assert await PolicyChain([first, Recorder()]).check_rcpt(facts, OUTSIDE) is None


async def test_relay_needs_a_trusted_network_or_auth_and_submission_needs_auth() -> None:
    relay = RelayPolicy(["10.0.0.0/8"], ["local.test"])
    stranger = SessionFacts(client_ip="192.0.2.1")
    assert await relay.check_rcpt(stranger, OUTSIDE) == replies.RELAY_DENIED
    assert await relay.check_rcpt(stranger, Address("a", "LOCAL.test")) is None
    assert await relay.check_rcpt(SessionFacts(client_ip="10.1.2.3", trusted_network=True), OUTSIDE) is None
    assert await relay.check_rcpt(SessionFacts(client_ip="192.0.2.1", user="alice"), OUTSIDE) is None
    submission = SubmissionPolicy()
    anonymous = SessionFacts(client_ip="10.1.2.3", listener=SUBMISSION, trusted_network=True)
    assert await submission.check_mail(anonymous, None, {}) == replies.AUTH_REQUIRED
    assert replies.AUTH_REQUIRED.to_bytes() == b"530 5.7.0 Authentication required\r\n"
    anonymous.user = "alice"
    assert await submission.check_mail(anonymous, None, {}) is None


async def test_a_rcpt_is_settled_without_asking_only_when_every_check_would_say_yes() -> None:
    """`settles_rcpt` lets the session skip check_rcpt: it must be True only where check_rcpt is None anyway."""

    class Refuses(SessionPolicy):
        async def check_rcpt(self, facts: SessionFacts, recipient: Address) -> Reply | None:
            return RELAY_DENIED

    relay = RelayPolicy(["127.0.0.0/8"], ["local.test"])
    trusted = SessionFacts("127.0.0.1", trusted_network=True)
    outsider = SessionFacts("192.0.2.1")
    authenticated = SessionFacts("192.0.2.1", user="alice")
    elsewhere = Address("bob", "elsewhere.test")
    chain = PolicyChain((SubmissionPolicy(), relay))
    assert chain.settles_rcpt(trusted) and await chain.check_rcpt(trusted, elsewhere) is None
    assert chain.settles_rcpt(authenticated) and await chain.check_rcpt(authenticated, elsewhere) is None
    assert not chain.settles_rcpt(outsider) and await chain.check_rcpt(outsider, elsewhere) == RELAY_DENIED
    assert SessionPolicy().settles_rcpt(outsider)  # the default check_rcpt says yes to everyone
    assert not PolicyChain((relay, Refuses())).settles_rcpt(trusted)  # its own check_rcpt: always asked


def test_the_accounts_settle_a_rcpt_only_for_a_trusted_client_without_a_user() -> None:
    checks = AccountChecks(AccountPolicy.__new__(AccountPolicy))  # settles_rcpt reads no state of the policy
    assert checks.settles_rcpt(SessionFacts("127.0.0.1", trusted_network=True))
    assert not checks.settles_rcpt(SessionFacts("127.0.0.1", trusted_network=True, user="alice"))  # daily limit
    assert not checks.settles_rcpt(SessionFacts("192.0.2.1"))  # whether a local recipient exists
