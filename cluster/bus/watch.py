"""Waiting for frames on a ZeroMQ socket that is used directly, without pyzmq's asyncio layer.

The shard's ROUTER socket (cluster/queue/shard.py) and the worker's links in direct mode (cluster/bus/client.py)
send and read without blocking on a plain socket and wait for input through this one piece: a reader on the
socket's descriptor, no Future per frame, no asyncio poll.

ZeroMQ's rule for its descriptor (ZMQ_FD): it is edge-triggered, it only says that the socket's state may have
changed, and reading ZMQ_EVENTS both answers "does a frame wait?" and re-arms it. A send may process the socket's
pending commands, the notice that frames arrived among them, and the descriptor then does not signal those
frames again. So:
- `readable()` asks with a zero-timeout `zmq_poll` of the one socket (it reads ZMQ_EVENTS as getsockopt does,
  without pyzmq's option and flag enums: about 2 us instead of 3.6);
- the descriptor's reader always reads the events (else the loop would see the descriptor ready over and over)
  and wakes a waiter when frames wait;
- `sent()`, called after every send, makes one look per turn of the event loop once that turn's sends are done,
  while somebody waits; a wait that starts later looks first by itself.

Inputs: the plain socket (a shadow of an asyncio socket, or a plain one); the running loop at the first wait.
Outputs: `readable()`; `await wait(deadline)`: True once frames wait, False when the loop's clock reached
`deadline` (`loop.time()` units; None: no limit); waits for the same deadline share one timer (the shard waits
for its next tick many times per tick), and so do waits for deadlines within TIMER_SLACK of the pending timer's
(the worker waits for its next heartbeat, a deadline it works out again from another clock each time): such a
wait may end up to TIMER_SLACK early. A wait woken by the descriptor or the look after sends, which found frames
waiting, returns True without asking again. `wake()` ends a waiting `wait` early (it then looks again);
`close()`.
Failure modes: after `close()` the socket may be gone, so `readable()` raises ZMQError(ENOTSUP) instead of
touching it, and so does a `wait` woken by the close; ZeroMQ errors of the poll are raised to the caller. A
socket that cannot be read any more (its context torn down without closing it) is logged once and its
descriptor no longer watched; the waiting `wait` is woken and raises the error.
"""

from __future__ import annotations

import asyncio
import logging

import zmq

log = logging.getLogger(__name__)

_POLLIN = int(zmq.POLLIN)
# Seconds within which a wait's deadline counts as the pending timer's (see the module docstring).
TIMER_SLACK = 0.005


class FrameWatch:
    def __init__(self, socket: zmq.Socket[bytes]) -> None:
        self._socket = socket
        self._items = [(socket, _POLLIN)]
        self._loop: asyncio.AbstractEventLoop | None = None
        self._descriptor = -1
        # The waiting `wait`'s future: its result is True when the waker found frames waiting.
        self._waiter: asyncio.Future[bool] | None = None
        self._look_pending = False
        self._closed = False
        self._unwatched = False  # the descriptor's reader was removed because the socket cannot be read
        # The timer of the last deadline waited for; None once it fired (or before any).
        self._timer: asyncio.TimerHandle | None = None
        self._deadline: float | None = None

    def readable(self) -> bool:
        """Whether a frame waits to be read (and the descriptor re-armed)."""
        if self._closed:  # the socket may be closed and freed: never touch it
            raise zmq.ZMQError(zmq.ENOTSUP)
        return bool(zmq.zmq_poll(self._items, 0))

    def sent(self) -> None:
        """Call after each send: frames whose notice the send took in are looked for once this turn is done."""
        if self._waiter is not None and not self._look_pending:
            self._look_pending = True
            assert self._loop is not None
            self._loop.call_soon(self._look)

    def _look(self) -> None:
        self._look_pending = False
        self._on_descriptor()

    def _on_descriptor(self) -> None:
        try:
            if not self._closed and self.readable():
                self.wake(True)
        except zmq.ZMQError as exc:
            # The socket cannot be read any more (its context torn down without closing it): every look fails
            # and the descriptor stays readable, so the loop would call this (and report it) at every turn.
            if self._loop is not None and not self._unwatched:
                self._unwatched = True
                log.error("bus socket (descriptor %d) cannot be read (%s); it is no longer watched",
                          self._descriptor, exc)
                if not self._loop.is_closed():
                    self._loop.remove_reader(self._descriptor)
            self.wake()  # the waiting `wait` looks again, and raises the error

    def wake(self, readable: bool = False) -> None:
        """End a waiting `wait`; `readable`: frames were just seen waiting (else the wait looks again)."""
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(readable)

    def _time_up(self) -> None:
        # A flag (the timer gone), not a look at the clock: uvloop may run a timer a little before loop.time()
        # reaches it.
        self._timer = None
        self.wake()

    async def wait(self, deadline: float | None = None) -> bool:
        """Wait until frames wait to be read (True) or the loop's clock reaches `deadline` (False)."""
        if self.readable():
            return True
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
            self._descriptor = self._socket.fileno()
            loop.add_reader(self._descriptor, self._on_descriptor)
        if deadline is not None:
            timer = self._timer
            if timer is None:
                if deadline == self._deadline:  # this deadline's timer fired
                    return False
                self._arm(loop, deadline)
            elif self._deadline is None or abs(deadline - self._deadline) > TIMER_SLACK:
                timer.cancel()
                self._arm(loop, deadline)
        while True:
            if deadline is not None and self._timer is None:  # this deadline's timer fired
                return False
            waiter: asyncio.Future[bool] = loop.create_future()
            self._waiter = waiter
            try:
                seen = await waiter
            finally:
                self._waiter = None
            if seen or self.readable():
                return True

    def _arm(self, loop: asyncio.AbstractEventLoop, deadline: float) -> None:
        self._deadline = deadline
        self._timer = loop.call_at(deadline, self._time_up)

    def close(self) -> None:
        """Stop watching (before the socket is closed); a waiting `wait` is woken and raises ZMQError."""
        if self._closed:
            return
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._loop is not None and not self._loop.is_closed() and not self._unwatched:
            self._loop.remove_reader(self._descriptor)
        self.wake()
