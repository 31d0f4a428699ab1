"""A scripted queue shard for frontend tests: a real ZeroMQ ROUTER socket speaking the real bus schemas.

`ScriptedShard(endpoint, answer)` binds the endpoint, records every Inject it receives, and answers each with what
the test's `answer` function returns (Stored, InjectRefused, or None for no answer at all); admin pings are
answered "ready" so the frontend's readiness check passes. `stored` is the answer of a shard that stored the part.
"""

from __future__ import annotations

from collections.abc import Callable

import zmq
import zmq.asyncio

from cluster.bus.schemas import AdminReply, AdminRequest, BusMessage, Inject, Stored, decode

Answer = Callable[[Inject], BusMessage | None]


class ScriptedShard:
    def __init__(self, endpoint: str, answer: Answer) -> None:
        self.socket = zmq.asyncio.Context.instance().socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.bind(endpoint)
        self.answer = answer
        self.injects: list[Inject] = []

    async def serve(self) -> None:
        while True:
            identity, frame = await self.socket.recv_multipart()
            message = decode(frame)
            if isinstance(message, AdminRequest):
                ping = {"shard": 0, "epoch": "e", "ready": True}
                reply: BusMessage | None = AdminReply(req=message.req, ok=True, data=ping)
            elif isinstance(message, Inject):
                self.injects.append(message)
                reply = self.answer(message)
            else:
                reply = None
            if reply is not None:
                await self.socket.send_multipart([identity, reply.encode()])


def stored(message: Inject) -> BusMessage:
    return Stored(req=message.req, queue_id=f"Q{message.req}")
