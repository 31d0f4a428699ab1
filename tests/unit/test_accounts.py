"""Accounts, pure parts: the users file (both formats), sender ownership, local recipients, sender domains,
the per-user usage ledger, the AUTH failure counter, the shard's account counters and their bus messages."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import MappingProxyType

import pytest

from cluster.accounts.recipients import LocalRecipients
from cluster.accounts.sender_domain import check_sender_domain
from cluster.bus.ring import shard_for_key
from cluster.bus.schemas import (
    AuthFailures,
    AuthStatus,
    Granted,
    Refused,
    Release,
    Released,
    Reserve,
    SchemaError,
    decode,
)
from cluster.config import DeliveryConfig
from cluster.delivery.mx import StaticMxResolver
from cluster.delivery.routing import Router
from cluster.queue.accounts import AccountCounters
from cluster.queue.auth_failures import AuthFailureCounter
from cluster.queue.spool import Batch, SpoolError
from cluster.queue.usage import UsageEntry, UsageLedger
from cluster.users import (
    Account,
    AuthOutcome,
    UserDatabase,
    UsersFileError,
    add_user,
    hash_password,
    set_active,
)

HASH = hash_password("x" * 8, salt=b"s" * 16)


def test_old_line_format_still_loads_and_is_rewritten_as_toml(tmp_path: Path) -> None:
    path = tmp_path / "users"
    path.write_text(f"# old file\nalice@example.org:{hash_password('old password')}\n")
    database = UserDatabase(str(path))
    assert database.authenticate("alice@example.org", "old password") is AuthOutcome.OK
    add_user(str(path), "bob", "bob password", addresses=("bob@example.org",), messages_per_day=5)
    text = path.read_text()
    assert '[users."alice@example.org"]' in text and '[users."bob"]' in text
    bob = database.get("BOB")
    assert bob is not None and bob.addresses == ("bob@example.org",) and bob.messages_per_day == 5
    assert database.authenticate("alice@example.org", "old password") is AuthOutcome.OK


def test_disabled_account_and_why_logins_fail(tmp_path: Path) -> None:
    path = str(tmp_path / "users")
    add_user(path, "alice@example.org", "right password")
    database = UserDatabase(path)
    assert database.authenticate("alice@example.org", "wrong password") is AuthOutcome.BAD_PASSWORD
    assert database.authenticate("nobody@example.org", "right password") is AuthOutcome.UNKNOWN_USER
    assert set_active(path, "alice@example.org", False)
    assert database.authenticate("alice@example.org", "right password") is AuthOutcome.DISABLED
    assert not database.verify("alice@example.org", "right password")
    assert set_active(path, "alice@example.org", True)
    assert database.verify("alice@example.org", "right password")
    assert not set_active(path, "nobody", True)


@pytest.mark.parametrize(("text", "why"), [
    ('[users."a"]\npassword = "plain"\n', "password"),
    (f'[users."a"]\npassword = "{HASH}"\nactive = "yes"\n', "active"),
    (f'[users."a"]\npassword = "{HASH}"\naddresses = ["no at sign"]\n', "addresses"),
    (f'[users."a"]\npassword = "{HASH}"\nmessages_per_day = -1\n', "messages_per_day"),
    (f'[users."a"]\npassword = "{HASH}"\nquota = 5\n', "unknown keys"),
    (f'[users."a"]\npassword = "{HASH}"\nmailbox_quota = "lots"\n', "mailbox_quota"),
    ("[other]\n", "unknown tables"),
    ("alice:plaintext\n", ":1:"),
    ("users = [", "not valid TOML"),
])
def test_malformed_users_file_says_where(tmp_path: Path, text: str, why: str) -> None:
    path = tmp_path / "users"
    path.write_text(text)
    with pytest.raises(UsersFileError, match=why):
        UserDatabase(str(path)).get("a")


def test_toml_fields_and_quota(tmp_path: Path) -> None:
    path = tmp_path / "users"
    path.write_text(f'[users."admin@example.org"]\npassword = "{HASH}"\naddresses = ["@example.net"]\n'
                    f'recipients_per_day = 0\nmailbox_quota = "1GiB"\n')
    account = UserDatabase(str(path)).get("admin@example.org")
    assert account is not None
    assert account.recipients_per_day == 0 and account.messages_per_day is None
    assert account.mailbox_quota == 1024**3
    assert account.sender_addresses() == ("admin@example.org", "@example.net")


def test_may_send_as() -> None:
    alice = Account("alice@example.org", HASH, addresses=("alias@example.net", "@Example.COM"))
    assert alice.may_send_as("Alice@EXAMPLE.org")
    assert alice.may_send_as("alias@example.net")
    assert alice.may_send_as("anyone@example.com")
    assert not alice.may_send_as("bob@example.org")
    assert not alice.may_send_as("anyone@sub.example.com")
    assert not alice.may_send_as("")
    bare = Account("alice", HASH)
    assert not bare.may_send_as("alice@example.org")  # a name without a domain is not an address


def test_local_recipients(tmp_path: Path) -> None:
    path = str(tmp_path / "users")
    add_user(path, "alice@example.org", "x" * 8, addresses=("a.smith@example.org",))
    add_user(path, "carol", "x" * 8)
    router = Router(DeliveryConfig(transports=MappingProxyType({"example.org": "local", ".local.test": "local"})))
    check = LocalRecipients(router, UserDatabase(path),
                            MappingProxyType({"sales@example.org": ("alice@example.org",)})).check
    for exists in ("alice@example.org", "A.Smith@example.org", "Postmaster@example.org", "sales@EXAMPLE.org",
                   "carol@example.org", "postmaster@x.local.test", "anyone@elsewhere.test"):
        assert check(exists) is None, exists
    refusal = check("bob@example.org")
    assert refusal is not None
    assert str(refusal) == "550 5.1.1 <bob@example.org>: Recipient address rejected: User unknown"
    Path(path).write_text("garbage = [")
    unavailable = check("bob@example.org")
    assert unavailable is not None and unavailable.code == 451


ZONE = """
mail.test MX 10 mx.mail.test
mx.mail.test A 127.0.0.1
aonly.test A 127.0.0.2
v6only.test AAAA ::1
nullmx.test MX 0 .
nodata.test MX 10 .example
servfail.test SERVFAIL
exists.test TXT
"""


@pytest.mark.parametrize(("domain", "expected"), [
    ("mail.test", None), ("aonly.test", None), ("v6only.test", None), ("[127.0.0.1]", None),
    ("nxdomain.test", "550 5.1.8"), ("nullmx.test", "550 5.7.27"), ("servfail.test", "450 4.1.8"),
])
async def test_sender_domain(domain: str, expected: str | None) -> None:
    resolver = StaticMxResolver.from_zone_text("\n".join(line for line in ZONE.splitlines()
                                                         if "TXT" not in line and "nodata" not in line))
    reply = await check_sender_domain(resolver, domain)
    assert (None if reply is None else f"{reply.code} {reply.enhanced}") == expected


def test_usage_ledger_rolling_window() -> None:
    ledger = UsageLedger(window=100.0)
    ledger.add(UsageEntry("a", "Alice", 10.0, 1, 3))
    ledger.add(UsageEntry("b", "alice", 50.0, 1, 2))
    assert ledger.usage("ALICE", 60.0) == (2, 5)
    assert ledger.fits("alice", 1, 0, 2, 0, 60.0) == "messages"
    assert ledger.fits("alice", 1, 1, 3, 5, 60.0) == "recipients"
    assert ledger.fits("alice", 1, 1, 0, 0, 60.0) is None  # 0 = no limit
    assert ledger.usage("alice", 110.0) == (1, 2)  # "a" left the window
    assert ledger.expired(110.0) == ["a"]
    assert ledger.remove("a") is not None and ledger.remove("a") is None
    assert len(ledger) == 1


def test_auth_failure_counter_blocks_until_the_window_passes() -> None:
    counter = AuthFailureCounter()
    assert counter.record("192.0.2.1", 0, 60, 3, 0.0) == (0, 0.0)
    assert counter.record("192.0.2.1", 1, 60, 3, 0.0) == (1, 0.0)
    assert counter.record("192.0.2.1", 1, 60, 3, 10.0) == (2, 0.0)
    assert counter.record("192.0.2.1", 1, 60, 3, 20.0) == (3, 40.0)
    assert counter.record("192.0.2.2", 0, 60, 3, 20.0) == (0, 0.0)  # per address
    assert counter.record("192.0.2.1", 0, 60, 3, 59.0) == (3, 1.0)
    assert counter.record("192.0.2.1", 0, 60, 3, 60.5) == (2, 0.0)


def test_accounts_messages_round_trip_and_are_checked() -> None:
    for message in (Reserve(1, "alice", 1, 3, 10, 0, "e1"), Granted(1, "e1", 1, 3), Refused(2, "messages", 10, 9),
                    Release(3, "e1"), Released(3, True), AuthFailures(4, "192.0.2.1", 1, 900.0, 10),
                    AuthStatus(4, 10, 12.5)):
        assert decode(message.encode()) == message
    with pytest.raises(SchemaError):
        decode(Reserve(1, "alice", 1, -1, 10, 0).encode())
    with pytest.raises(SchemaError):
        decode(Reserve(1, "alice", 1, ["x"], 10, 0).encode())  # type: ignore[arg-type]


def test_shard_for_key_ignores_case() -> None:
    shards = [f"tcp://127.0.0.1:{port}" for port in range(5570, 5575)]
    assert shard_for_key("Alice@Example.org", shards) == shard_for_key("alice@example.org", shards)
    assert len({shard_for_key(f"user{n}", shards) for n in range(50)}) == 5


async def test_account_counters_race_and_spool_failure() -> None:
    committed: list[Batch] = []
    fail = False

    async def commit(batch: Batch) -> None:
        await asyncio.sleep(0)  # the commit takes a while: concurrent reservations run meanwhile
        if fail:
            raise SpoolError("disk on fire")
        committed.append(batch)

    counters = AccountCounters("0", commit, lambda: 1000.0)
    answers = await asyncio.gather(*(counters.handle(Reserve(n, "alice", 1, 2, 3, 0, f"e{n}")) for n in range(6)))
    assert [type(a).__name__ for a in answers].count("Granted") == 3
    assert sum(len(b.usage_adds) for b in committed) == 3
    assert counters.usage("alice") == {"messages": 3, "recipients": 6}
    check = await counters.handle(Reserve(9, "alice", 1, 0, 3, 0))
    assert isinstance(check, Refused) and check.reason == "messages"
    released = await counters.handle(Release(10, "e0"))
    assert released == Released(10, True)
    assert await counters.handle(Release(11, "e0")) == Released(11, False)
    fail = True
    answer = await counters.handle(Reserve(12, "alice", 1, 1, 3, 0, "e12"))
    assert answer.TYPE == "error" and counters.usage("alice")["messages"] == 2


def test_accounts_configuration_keys() -> None:
    from cluster.config import ConfigError, config_from_dict

    config = config_from_dict({"delivery": {"nameservers": ["127.0.0.1:5353"]},
                               "aliases": {"Postmaster@Example.org": "alice@example.org"},
                               "limits": {"messages_per_day": 0}}, environ={})
    assert config.dns.nameservers == ("127.0.0.1:5353",)  # delivery.nameservers is the older name
    assert dict(config.aliases) == {"postmaster@example.org": ("alice@example.org",)}
    assert (config.limits.messages_per_day, config.limits.recipients_per_day) == (0, 5000)
    assert (config.smtp.spf, config.smtp.reject_unknown_sender_domain, config.auth.sender_login_match) == (
        "reject", True, True)
    for raw, key in (({"smtp": {"spf": "maybe"}}, "smtp.spf"),
                     ({"dns": {"nameservers": ["ns.example"]}}, "dns.nameservers"),
                     ({"dns": {"nameservers": ["127.0.0.1"]}, "delivery": {"nameservers": ["127.0.0.2"]}},
                      "delivery.nameservers"),
                     ({"aliases": {"sales": ["a@example.org"]}}, "aliases.sales"),
                     ({"aliases": {"sales@example.org": []}}, "aliases.sales@example.org"),
                     ({"limits": {"recipients_per_day": -1}}, "limits.recipients_per_day"),
                     ({"auth": {"failure_window": 0}}, "auth.failure_window")):
        with pytest.raises(ConfigError) as refused:
            config_from_dict(raw, environ={})
        assert refused.value.key == key, raw
