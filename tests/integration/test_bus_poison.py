"""A poison Inject (an envelope the SMTP server would refuse) is refused by a real shard's bus decoder and never
stored, so no worker ever has to deliver it; the refusal names the request, so a bus client stops waiting at
once instead of timing out."""

from __future__ import annotations

import time

import pytest

from cluster.bus.client import BusLink
from cluster.bus.schemas import AdminReply, AdminRequest, Error, Inject, Stored
from tests.support.shard import BODY, RunningShard, inject

pytestmark = pytest.mark.integration


@pytest.mark.parametrize(("sender", "recipients"), [
    ("\x00@\x00", ["r@h.test"]),
    ("a@sender.test", ["r@h.test", "bad\x00@h.test"]),
    ("a@sender.test", ["r@h.test\r\nDATA"]),
])
async def test_poison_inject_is_refused_and_not_stored(running_shard: RunningShard, sender: str,
                                                       recipients: list[str]) -> None:
    client = running_shard.client()
    await client.send(Inject(7, sender, recipients, BODY, {}))
    refused = await client.recv()
    assert isinstance(refused, Error) and "invalid" in refused.text
    await client.send(AdminRequest(8, "list"))
    listing = await client.recv_type(AdminReply)
    assert listing.ok
    assert (listing.data if isinstance(listing.data, list) else listing.data["messages"]) == []
    # The shard is not harmed: the next good message is stored.
    assert isinstance(await inject(client, 9, "a@sender.test", ["r@h.test"], BODY), Stored)


async def test_the_refusal_answers_the_request_at_once(running_shard: RunningShard) -> None:
    link = BusLink(running_shard.endpoint, None, name="shard 0")
    link.start()
    try:
        started = time.monotonic()
        answer = await link.request(lambda req: Inject(req, "\x00@\x00", ["r@h.test"], BODY, {}), 30)
        assert isinstance(answer, Error) and "invalid sender" in answer.text and answer.req == 1
        assert time.monotonic() - started < 5
    finally:
        await link.close()
