"""The frontend cuts a message in one part per shard owning some of its recipients (ARCHITECTURE.md contract 3):
the ring is asked once per domain, and every recipient still lands in its own domain's part, in order."""

from __future__ import annotations

import pytest

from cluster.bus.ring import shard_for_address
from cluster.bus.schemas import InjectRefused, Stored
from cluster.frontend.injector import ShardClient


async def test_each_recipient_goes_to_the_shard_owning_its_domain(monkeypatch: pytest.MonkeyPatch) -> None:
    client = ShardClient([f"tcp://127.0.0.1:{port}" for port in (1, 2, 3, 4)], 1.0)
    client.excluded = frozenset({3})
    sent: dict[int, list[str]] = {}

    async def inject_one(index: int, sender: str, part: list[str], body: bytes,
                         facts: dict[str, str]) -> Stored | InjectRefused | None:
        sent[index] = part
        return Stored(0, f"Q{index}")

    monkeypatch.setattr(client, "_inject_one", inject_one)
    # A bare name is no domain: "d3.test" alone goes to the first shard, "x@d3.test" to d3.test's owner.
    bare = [f"d{i}.test" for i in range(7)]
    recipients = [*bare, *(f"u{i}@d{i % 7}.test" for i in range(40)), "postmaster", "x@", "y@D1.TEST", "z@d1.test."]
    try:
        reply, queue_ids = await client.inject("s@a.test", recipients, b"body", {})
    finally:
        await client.close()
    expected: dict[int, list[str]] = {}
    for recipient in recipients:
        expected.setdefault(shard_for_address(recipient, client.shards, client.excluded), []).append(recipient)
    assert sent == expected and len(expected) > 1 and 3 not in sent
    assert reply.is_positive and sorted(queue_ids) == sorted(f"Q{index}" for index in expected)
