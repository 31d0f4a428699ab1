"""Traffic shaping on a virtual clock: rates ("N/min"), which entries apply, mx rollups, reactions; the
scheduler keeps rate-limited mail ready (no attempt counted) and starts it when its slot frees."""

from __future__ import annotations

import random

import pytest
from prometheus_client import REGISTRY

from cluster.config import ConfigError, config_from_dict, parse_rate
from cluster.queue.records import Message, Recipient, State
from cluster.queue.scheduler import Scheduler, SchedulerLimits
from cluster.queue.shaping import Shaper


def shaper_for(shaping: dict[str, dict[str, object]]) -> Shaper:
    config = config_from_dict({"shaping": shaping}, environ={})
    return Shaper(config.shaping, config.delivery.destination_concurrency,
                  config.delivery.max_recipients_per_transaction)


def test_rates_parse() -> None:
    assert parse_rate("10/min", "k") == (10, 60.0)
    assert parse_rate("5/s", "k") == (5, 1.0)
    assert parse_rate("1000/h", "k") == (1000, 3600.0)
    assert parse_rate(" 7 / d ", "k") == (7, 86400.0)
    for bad in ("10", "10/week", "0/s", "x/s"):
        with pytest.raises(ConfigError):
            parse_rate(bad, "k")


@pytest.mark.parametrize(("shaping", "key"), [
    ({"a.test": {"max_message_rate": "fast"}}, "shaping.a.test.max_message_rate"),
    ({"a.test": {"connection_limit": -1}}, "shaping.a.test.connection_limit"),
    ({"a.test": {"rules": [{"match": "(", "action": "suspend"}]}}, "shaping.a.test.rules[0].match"),
    ({"a.test": {"rules": [{"match": "x", "action": "explode"}]}}, "shaping.a.test.rules[0].action"),
    ({"a.test": {"rules": [{"match": "x", "action": "rate", "rate": "soon"}]}}, "shaping.a.test.rules[0].rate"),
    ({"a.test": {"rules": [{"match": "x", "scope": "planet"}]}}, "shaping.a.test.rules[0].scope"),
    ({"bad name!": {}}, "shaping.bad name!"),
    ({"a.test": {"speed": 1}}, "shaping.a.test.speed"),
])
def test_bad_shaping_configuration_names_the_key(shaping: dict[str, dict[str, object]], key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        config_from_dict({"shaping": shaping}, environ={})
    assert caught.value.key == key


def test_entries_apply_from_default_to_the_domain() -> None:
    shaper = shaper_for({"default": {"connection_limit": 7, "max_message_rate": "100/s"},
                         ".example": {"max_message_rate": "50/s", "max_recipients_per_transaction": 5},
                         "a.example": {"max_message_rate": "10/s"},
                         "mx:hoster.test": {"connection_limit": 2}})
    limits = shaper.limits("a.example")
    assert limits.entries == ("default", ".example", "a.example")
    assert (limits.connection_limit, limits.message_rate, limits.max_recipients) == (7, (10, 1.0), 5)
    assert shaper.limits("b.example").message_rate == (50, 1.0) and shaper.limits("b.example").bucket == "b.example"
    # Once the MX host is known, the rollup applies and its counters are shared by every domain it serves.
    shaper.learn_mx("one.test", "mx1.hoster.test")
    shaper.learn_mx("two.test", "MX2.hoster.test.")
    assert shaper.limits("one.test").bucket == shaper.limits("two.test").bucket == "mx:hoster.test"
    assert shaper.limits("one.test").connection_limit == 2
    assert shaper.started("one.test", 0.0) == shaper.started("two.test", 0.0) == "mx:hoster.test"
    assert not shaper.may_start("one.test", 0.0)  # 2 in flight in the shared bucket
    shaper.finished("mx:hoster.test")
    assert shaper.may_start("two.test", 0.0)
    # A configured entry overrides the shipped provider defaults key by key.
    assert shaper_for({}).limits("x.test").max_deliveries_per_connection == 0
    google = shaper_for({"mx:google.com": {"connection_limit": 9}})
    google.learn_mx("gmail.com", "gmail-smtp-in.l.google.com")
    assert (google.limits("gmail.com").connection_limit,
            google.limits("gmail.com").max_deliveries_per_connection) == (9, 50)


def test_ten_per_minute_on_a_virtual_clock() -> None:
    """25 messages to a destination limited to 10/min: at most 10 start in any minute, all are delivered, and
    waiting costs no attempt."""
    config = config_from_dict({"shaping": {"slow.test": {"max_message_rate": "10/min"}}}, environ={})
    shaper = Shaper(config.shaping, 20, 50)
    scheduler = Scheduler(SchedulerLimits(20, 50, 600, 10), shaper=shaper)
    messages = [Message(f"q{i:02d}", "s@x.test", 0.0, [Recipient(0, f"r{i}@slow.test")], 10) for i in range(25)]
    for message in messages:
        scheduler.add_message(message)
    scheduler.heartbeat("w", b"w", 100, [], 0.0)
    starts: list[float] = []
    wakeups = 0
    now = 0.0
    while len(starts) < 25 and now < 600:
        for job in scheduler.dispatch(now):
            starts.append(now)
            message = scheduler.messages[job.queue_id]
            recipient = message.recipients[0]
            assert recipient.attempts == 0 and job.attempt == 1  # waiting cost no attempt
            scheduler.finish_job(job.job_id)
            scheduler.set_state(message, recipient, State.DELIVERED)
        now += 1.0
        if shaper.due(now):
            wakeups += 1
        scheduler.heartbeat("w", b"w", 100, [], now)
    assert len(starts) == 25
    assert max(sum(1 for t in starts if start <= t < start + 60) for start in starts) == 10
    assert starts[9] == 0.0 and starts[10] == 60.0 and starts[20] == 120.0
    assert wakeups >= 2  # the shard is told when the waiting mail may go
    assert scheduler.recipient_counts[State.READY] == 0


def test_reactions_suspend_or_slow_a_destination() -> None:
    shaper = shaper_for({"slow.test": {"rules": [{"match": "try later", "action": "rate", "rate": "1/min",
                                                  "duration": "10m"}]}})
    # Shipped: Yahoo's [TS04] suspends for 2 hours.
    shaper.learn_mx("yahoo.com", "mta5.am0.yahoodns.net")
    rule = shaper.react("yahoo.com", "421 4.7.0 [TS04] Messages from 192.0.2.1 temporarily deferred", 100.0)
    assert rule is not None and rule.action == "suspend"
    assert not shaper.may_start("yahoo.com", 100.0 + 7199) and shaper.may_start("yahoo.com", 100.0 + 7200)
    (row,) = [r for r in shaper.status(200.0) if r["destination"] == "yahoo.com"]
    assert row["suspended_until"] == 7300.0 and "[TS04]" in row["reason"] and row["bucket"] == "mx:yahoodns.net"
    assert shaper.react("slow.test", "250 ok", 0.0) is None
    assert shaper.react("slow.test", "451 4.7.1 please try later", 0.0) is not None
    shaper.started("slow.test", 0.0)
    shaper.finished("slow.test")
    assert not shaper.may_start("slow.test", 30.0) and shaper.may_start("slow.test", 60.0)
    assert shaper.may_start("slow.test", 601.0)  # the override is over


def test_two_rates_with_different_periods_both_hold() -> None:
    shaper = shaper_for({"both.test": {"max_message_rate": "2/s", "max_connection_rate": "3/min"}})
    starts = []
    now = 0.0
    while now < 130:
        if shaper.may_start("both.test", now):
            shaper.finished(shaper.started("both.test", now))
            starts.append(now)
        now += 0.5
    # Three starts in the first minute (3/min), then nothing until each leaves the minute: the 2/s window
    # forgetting them must not let more through.
    assert starts[:3] == [0.0, 0.5, 1.0]
    assert starts[3:7] == [60.0, 60.5, 61.0, 120.0]


POOLED_EGRESS = {"sources": {"a": {"address": "127.0.0.7"}, "b": {"address": "127.0.0.8"}},
                 "pools": {"bulk": ["a", "b"], "solo": ["a"]}}


def pooled_shaper(shaping: dict[str, dict[str, object]]) -> Shaper:
    config = config_from_dict({"shaping": shaping, "egress": POOLED_EGRESS}, environ={})
    return Shaper(config.shaping, 20, 50, egress=config.egress, rng=random.Random(3))


def test_two_sources_of_a_pool_each_get_the_destination_rate() -> None:
    """Limits hold per (source, destination): two sources limited to 5/s each start 10 jobs a second in total,
    5 from each, and the job carries the source chosen; mail without a pool keeps the destination's own 5/s."""
    shaper = pooled_shaper({"fast.test": {"max_message_rate": "5/s"}})
    scheduler = Scheduler(SchedulerLimits(20, 50, 600, 10), shaper=shaper)
    messages = [Message(f"q{i:02d}", "s@x.test", 0.0, [Recipient(0, f"r{i}@fast.test")], 10,
                        {"pool": "bulk"} if i < 40 else {}) for i in range(50)]
    for message in messages:
        scheduler.add_message(message)
    scheduler.heartbeat("w", b"w", 100, [], 0.0)
    starts: list[tuple[float, str, str]] = []
    now = 0.0
    while len(starts) < 50 and now < 30:
        for job in scheduler.dispatch(now):
            pool = scheduler.messages[job.queue_id].client.get("pool", "")
            starts.append((now, job.source, pool))
            scheduler.finish_job(job.job_id)
            message = scheduler.messages[job.queue_id]
            scheduler.set_state(message, message.recipients[0], State.DELIVERED)
        now = round(now + 0.25, 2)
        scheduler.heartbeat("w", b"w", 100, [], now)
    assert len(starts) == 50
    pooled = [(t, source) for t, source, pool in starts if pool]
    assert {source for _, source in pooled} == {"a", "b"}
    assert all(source == "" for _, source, pool in starts if not pool)
    first_second = [source for t, source in pooled if t < 1.0]
    assert len(first_second) == 10 and first_second.count("a") == first_second.count("b") == 5
    for source in ("a", "b"):
        times = [t for t, s in pooled if s == source]
        assert max(sum(1 for t in times if start <= t < start + 1.0) for start in times) == 5
    # The 40 pooled messages took 4 seconds (10/s), not 8: the limit is per source.
    assert max(t for t, _ in pooled) < 4.0


def test_a_suspension_through_one_source_leaves_the_others_unless_the_rule_says_destination() -> None:
    shaper = pooled_shaper({"r.test": {"rules": [
        {"match": "TS04", "action": "suspend", "duration": "1h"},
        {"match": "blocked", "action": "suspend", "duration": "1h", "scope": "destination"}]}})
    assert shaper.react("r.test", "421 4.7.0 [TS04] deferred", 0.0, "a") is not None
    assert {shaper.choose("r.test", 10.0, "bulk") for _ in range(50)} == {"b"}  # a is suspended, b is not
    assert shaper.choose("r.test", 10.0, "solo") is None  # its only source is suspended
    assert shaper.choose("r.test", 10.0) == ""  # mail without a pool counts apart
    rows = {row["source"]: row for row in shaper.status(10.0) if row["destination"] == "r.test"}
    assert rows["a"]["suspended_until"] == 3600.0 and "TS04" in rows["a"]["reason"]
    assert rows["b"]["suspended_until"] is None and rows[""]["suspended_until"] is None
    # A rule scoped to the destination stops every source, whichever it came through.
    assert shaper.react("r.test", "554 5.7.1 blocked", 20.0, "b") is not None
    assert shaper.choose("r.test", 30.0, "bulk") is None and shaper.choose("r.test", 30.0) is None
    assert shaper.choose("r.test", 3620.0, "bulk") in ("a", "b")


def test_connection_limit_is_per_source_with_a_pool() -> None:
    shaper = pooled_shaper({"c.test": {"connection_limit": 1}})
    first = shaper.choose("c.test", 0.0, "bulk")
    assert first in ("a", "b")
    bucket = shaper.started("c.test", 0.0, first)
    second = shaper.choose("c.test", 0.0, "bulk")
    assert second is not None and second != first
    shaper.started("c.test", 0.0, second)
    assert shaper.choose("c.test", 0.0, "bulk") is None  # both sources at their one connection
    shaper.finished(bucket, first)
    assert shaper.choose("c.test", 0.0, "bulk") == first
    # A pool this shard does not know, without a "default" pool: the destination's own counters.
    assert shaper.choose("c.test", 0.0, "renamed") == ""


def test_shaping_metrics_carry_the_source() -> None:
    """Delays and suspensions are counted per (destination, egress source): source "" for mail without a pool
    and for a suspension of the whole destination."""
    def sample(name: str, destination: str, source: str) -> float:
        return REGISTRY.get_sample_value(f"mtacluster_shaping_{name}_total",
                                         {"destination": destination, "source": source}) or 0.0

    shaper = pooled_shaper({"m.test": {"max_message_rate": "1/min", "rules": [
        {"match": "TS04", "action": "suspend", "duration": "1h"},
        {"match": "blocked", "action": "suspend", "duration": "1h", "scope": "destination"}]}})
    before = {(name, source): sample(name, "m.test", source)
              for name in ("delays", "suspensions") for source in ("a", "b", "")}
    shaper.started("m.test", 0.0, "a")
    assert shaper.choose("m.test", 1.0, "solo") is None  # source a has used its 1/min
    assert shaper.choose("m.test", 1.0, "bulk") == "b"
    shaper.started("m.test", 1.0, "")
    assert shaper.choose("m.test", 2.0) is None
    assert sample("delays", "m.test", "a") == before[("delays", "a")] + 1
    assert sample("delays", "m.test", "b") == before[("delays", "b")]
    assert sample("delays", "m.test", "") == before[("delays", "")] + 1
    shaper.react("m.test", "421 [TS04] deferred", 3.0, "b")
    shaper.react("m.test", "554 blocked", 4.0, "a")
    assert sample("suspensions", "m.test", "b") == before[("suspensions", "b")] + 1
    assert sample("suspensions", "m.test", "a") == before[("suspensions", "a")]
    assert sample("suspensions", "m.test", "") == before[("suspensions", "")] + 1


def test_a_pool_held_back_at_a_destination_does_not_hold_back_another_pools_mail_there() -> None:
    """No head-of-line blocking between pools: "slow"'s source is suspended at h.test and its mail was queued
    first; "fast"'s mail (another source) and mail without a pool go at once, and "slow"'s waits, ready, with
    no attempt counted, until its suspension ends."""
    config = config_from_dict({"egress": {"sources": {"a": {"address": "127.0.0.7"}, "b": {"address": "127.0.0.8"}},
                                          "pools": {"slow": ["a"], "fast": ["b"]}},
                               "shaping": {"h.test": {"rules": [{"match": "TS04", "action": "suspend",
                                                                 "duration": "1h"}]}}}, environ={})
    shaper = Shaper(config.shaping, 20, 50, egress=config.egress)
    scheduler = Scheduler(SchedulerLimits(20, 50, 600, 10), shaper=shaper)
    pools = ["slow"] * 30 + ["fast"] * 5 + [""] * 2
    for i, pool in enumerate(pools):
        scheduler.add_message(Message(f"q{i:02d}", "s@x.test", 0.0, [Recipient(0, f"r{i}@h.test")], 10,
                                      {"pool": pool} if pool else {}))
    assert shaper.react("h.test", "421 4.7.0 [TS04] deferred", 0.0, "a") is not None
    scheduler.heartbeat("w", b"w", 100, [], 0.0)
    jobs = scheduler.dispatch(1.0)
    started = {(scheduler.messages[job.queue_id].pool, job.source) for job in jobs}
    assert len(jobs) == 7 and started == {("fast", "b"), ("", "")}
    assert scheduler.recipient_counts[State.READY] == 30
    assert all(m.recipients[0].attempts == 0 for m in scheduler.messages.values() if m.pool == "slow")
    later = scheduler.dispatch(3601.0)  # the suspension of source a is over: its 20 connections start
    assert len(later) == 20 and {job.source for job in later} == {"a"}
    # A destination backoff holds off every lane of it, and the gauge counts them all.
    scheduler.note_destination("h.test", True, 3601.0, 600.0)
    scheduler.note_destination("h.test", True, 3601.0, 600.0)
    assert scheduler.note_destination("h.test", True, 3601.0, 600.0)
    assert scheduler.held_off_messages() == 10
    assert scheduler.dispatch(3602.0) == []
