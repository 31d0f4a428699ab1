"""Messages for the scheduler's unit tests: `queued_message` builds a one-byte message from sender.test to the
given recipient addresses, arrived at time 0, as the scheduler tests queue them."""

from __future__ import annotations

from cluster.queue.records import Message, Recipient


def queued_message(queue_id: str, *recipients: str) -> Message:
    return Message(queue_id, "s@sender.test", 0.0, [Recipient(i, r) for i, r in enumerate(recipients)], 1)
