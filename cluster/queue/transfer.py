"""A message with its state as it travels between shards (`Transfer`, cluster/bus/schemas.py), both ways.

`transfer_of(message, body, index, req)`: the Transfer that hands a stored message's pending recipients to
another shard (what outbox.py sends for forwarded DSNs and for the queue of a draining shard, drain.py).
`message_of(transfer)`: the message a receiving shard stores, recipients renumbered from 0 with their states,
attempts, next attempts and last outcomes. Pure functions; no failure modes (decode checked the Transfer).
"""

from __future__ import annotations

from cluster.bus.schemas import OutcomeKind, Transfer
from cluster.queue.records import LastOutcome, Message, Recipient, State


def transfer_of(message: Message, body: bytes, index: int, req: int) -> Transfer:
    """The Transfer that hands `message`'s pending recipients to another shard (what outbox.py sends)."""
    previous = message.client.get("hops", "0")
    hops = (int(previous) if previous.isdigit() else 0) + 1
    client = {**message.client, "hops": str(hops), "transferred_from": str(index)}
    recipients = [{"address": r.address, "state": State.READY.value if r.state is State.IN_FLIGHT else r.state.value,
                   "attempts": r.attempts, "next_attempt": r.next_attempt,
                   "last": None if r.last is None else r.last.as_dict()}
                  for r in message.recipients if not r.state.done]
    return Transfer(req, message.queue_id, hops, message.sender, message.arrival, message.warned, client,
                    recipients, body)


def message_of(transfer: Transfer) -> Message:
    recipients = []
    for number, item in enumerate(transfer.recipients):
        last = item.get("last")
        recipients.append(Recipient(
            number, item["address"], State(item["state"]), int(item.get("attempts", 0)),
            float(item.get("next_attempt", 0.0)),
            None if last is None else LastOutcome(OutcomeKind(last["kind"]), int(last.get("code", 0)),
                                                  str(last.get("enhanced", "")), str(last.get("text", "")),
                                                  str(last.get("remote", "")))))
    return Message(transfer.queue_id, transfer.sender, float(transfer.arrival), recipients, len(transfer.body),
                   dict(transfer.client), transfer.warned)
