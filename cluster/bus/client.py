"""The one bus client: a DEALER connection to one shard, used by frontends, workers, the bounce forwarder and the CLI.

`BusLink(endpoint, keys, name=...)` owns one ZeroMQ DEALER socket connected to one shard's ROUTER endpoint
(protocol: cluster/bus/schemas.py), CURVE-secured when the cluster has a key pair (cluster/bus/security.py).

- Requests: `await link.request(lambda req: Inject(req, ...), timeout)` numbers the request, sends it, and returns
  the answer that carries the same `req` (Stored, InjectRefused, AdminReply, or an Error naming that req). Answers
  may come in any order; an answer that arrives after its request gave up is dropped (logged at debug level).
  No answer in time raises `NoAnswer`, whose `sent` says whether the request ever left (False: the shard was not
  connected during the whole wait, i.e. it is down or unreachable).
- Other traffic (a worker's Deliver and HeartbeatAck, an Error about no request): `await link.send(message)`
  never blocks and returns False when the shard is not connected; `await link.receive(timeout)` returns the
  frames that are not answers to requests, so a caller can keep its own loop (the worker handles a batch of
  frames, then heartbeats). `link.start(on_message)` runs that loop in the background instead; `request`
  needs one of the two running.
- Reconnection: ZeroMQ reconnects by itself (every `RECONNECT_INTERVAL_MS`) after the shard goes away or
  restarts, CURVE handshake included. Nothing is queued for a shard that is not connected (ZMQ_IMMEDIATE): a
  restarted shard never receives a burst of stale requests whose senders already gave up.
- Direct mode (`direct=True`, the worker's and the frontend's links): sends go to ZeroMQ without the asyncio
  layer (`send_now`; a request's send too), and `receive` waits on the socket's descriptor through `FrameWatch`
  (cluster/bus/watch.py, the piece the shard's socket uses too: its own reader, and one look per loop turn
  after sends for frames whose notification a send took in). That saves the asyncio layer's Future, poll and
  flag arithmetic per frame (a send 2 us instead of 10). A request to a shard that is not connected waits in
  the link's list of unsent frames: one timer per link tries the oldest every CONNECT_POLL seconds and sends
  the waiting frames in order once the socket takes them, so an outage costs the same wakeups whether 1 or
  300 requests wait (the asyncio layer would wait for the descriptor). A request that gives up (its own
  bound) leaves the list at once: its frame is never sent later.
- Liveness: `last_heard` is when the shard last sent anything; `heard_within(s)` tells callers (readiness
  probes) whether it is alive. With `liveness=S`, ZeroMQ heartbeats the connection itself (ZMTP PING every S/3)
  and drops it after S seconds of silence, so a paused shard or a cut link is noticed even when TCP is not
  told: the requests still in the old connection are discarded (their callers time out), and a new
  connection is made when the shard is back.

Failure modes: an undecodable frame is logged and dropped, never raised; a send error is logged and reported
as False / NoAnswer; an `on_message` handler that raises is logged and the reception goes on; closing cancels
the background loop and fails the requests still waiting with NoAnswer.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import cast

import zmq
import zmq.asyncio

from cluster.bus.schemas import BusMessage, Error, SchemaError, decode
from cluster.bus.security import CurveKeys, secure_client
from cluster.bus.watch import FrameWatch

log = logging.getLogger(__name__)

# ZeroMQ tries to reconnect to a vanished peer this often (milliseconds).
RECONNECT_INTERVAL_MS = 100
# Frames read from the socket in one `receive` call before other tasks get a turn.
FRAMES_PER_TURN = 100
# Direct mode: how often the link tries to send its waiting requests while its shard is not connected (seconds).
CONNECT_POLL = 0.01
# Direct mode: a request frame of at least this many octets is handed to ZeroMQ without a copy (pyzmq's
# zero-copy send costs more than copying a small frame).
ZERO_COPY_FRAME = 64 * 1024
# A plain int: pyzmq's flag enums cost a Python-level enum operation each time they meet an int.
_NOBLOCK = int(zmq.NOBLOCK)

OnMessage = Callable[[BusMessage], Awaitable[None]]


class NoAnswer(Exception):
    """A request got no answer in time. `sent` is False when the shard was never connected during the wait."""

    def __init__(self, link: BusLink, timeout: float, sent: bool, why: str = "") -> None:
        self.endpoint = link.endpoint
        self.name = link.name
        self.timeout = timeout
        self.sent = sent
        if not why:
            why = (f"did not answer within {timeout:g}s" if sent
                   else f"is unreachable (no connection within {timeout:g}s)")
        super().__init__(f"{link.name} ({link.endpoint}) {why}")


class BusLink:
    """One DEALER socket to one shard: requests matched to answers by `req`, plus one-way traffic."""

    def __init__(self, endpoint: str, keys: CurveKeys | None, *, name: str,
                 context: zmq.asyncio.Context | None = None, liveness: float | None = None,
                 direct: bool = False) -> None:
        self.endpoint = endpoint
        self.name = name
        context = context or zmq.asyncio.Context.instance()
        self.socket: zmq.asyncio.Socket = context.socket(zmq.DEALER)
        secure_client(cast("zmq.Socket[bytes]", self.socket), keys)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.IMMEDIATE, 1)
        self.socket.setsockopt(zmq.RECONNECT_IVL, RECONNECT_INTERVAL_MS)
        if liveness is not None:
            milliseconds = max(1, int(liveness * 1000))
            self.socket.setsockopt(zmq.HEARTBEAT_IVL, max(1, milliseconds // 3))
            self.socket.setsockopt(zmq.HEARTBEAT_TIMEOUT, milliseconds)
            self.socket.setsockopt(zmq.HEARTBEAT_TTL, milliseconds)
        self.socket.connect(endpoint)
        # The same socket without the asyncio layer: frames already waiting are read without a Future each.
        self._plain: zmq.Socket[bytes] = zmq.Socket.shadow(self.socket.underlying)
        self._watch = FrameWatch(self._plain)
        self.last_heard = float("-inf")
        self._numbers = itertools.count(1)
        self._pending: dict[int, asyncio.Future[BusMessage]] = {}
        self._receiver: asyncio.Task[None] | None = None
        self._closed = False
        self._direct = direct  # see the module's docstring
        # Direct mode: requests whose frame waits for a connection, oldest first (by req), and the one timer
        # that retries them (None when nothing waits).
        self._unsent: dict[int, tuple[bytes, asyncio.Future[None]]] = {}
        self._retry: asyncio.TimerHandle | None = None

    def heard_within(self, seconds: float) -> bool:
        return time.monotonic() - self.last_heard < seconds

    # -- sending ---------------------------------------------------------------------------------------------

    async def send(self, message: BusMessage | bytes) -> bool:
        """Send without waiting; False when the shard is not connected or the socket refused."""
        frame = message if isinstance(message, bytes) else message.encode()
        if self._direct:
            return self.send_now(frame)
        try:
            await self.socket.send(frame, flags=zmq.NOBLOCK, copy=False)
        except zmq.ZMQError as exc:
            return self._not_sent(exc)
        return True

    def _not_sent(self, exc: zmq.ZMQError) -> bool:
        """A send that failed: logged (at debug level when the shard is just not connected); False."""
        if isinstance(exc, zmq.Again):
            log.debug("%s (%s): not connected, frame not sent", self.name, self.endpoint)
        else:
            log.warning("%s (%s): cannot send: %s", self.name, self.endpoint, exc)
        return False

    def send_now(self, frame: bytes) -> bool:
        """`send` without the asyncio layer (direct mode): the frame goes to ZeroMQ at once; False when the
        shard is not connected or the socket refused."""
        try:
            self._plain.send(frame, _NOBLOCK)
        except zmq.ZMQError as exc:
            return self._not_sent(exc)
        self._watch.sent()  # a send may take in the notice of frames waiting (bus/watch.py)
        return True

    async def request(self, build: Callable[[int], BusMessage | bytes], timeout: float, *,
                      connect_timeout: float | None = None) -> BusMessage:
        """Send `build(req)` (a message, or its encoded frame) and return the answer carrying `req`; raise
        NoAnswer after `timeout` seconds.

        The send itself waits (within the timeout) for a connection, so a shard that is just restarting gets
        the request as soon as it is back. With `connect_timeout`, a shard not connected within that long is
        reported unreachable at once (NoAnswer.sent False) instead of at the end of `timeout`.
        """
        if self._closed:  # the process is stopping: the caller answers as for a shard that is away
            raise NoAnswer(self, 0.0, False, "is closed (this process is stopping)")
        if self._receiver is None or self._receiver.done():
            raise RuntimeError(f"{self.name}: request() needs start() to be running")
        req = next(self._numbers)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[BusMessage] = loop.create_future()
        self._pending[req] = future
        built = build(req)
        frame = built if isinstance(built, bytes) else built.encode()
        connect_within = timeout if connect_timeout is None else min(timeout, connect_timeout)
        started = time.monotonic()
        try:
            if self._direct:
                await self._send_when_connected(req, frame, connect_within)
            elif not await self._send_within(frame, connect_within):
                raise NoAnswer(self, connect_within, False)
            # A timer on the answer itself rather than asyncio.timeout, which needs the caller to run in a task
            # (the frontend's sessions start their policy checks outside any task).
            timer = loop.call_later(max(0.0, timeout - (time.monotonic() - started)), _expire, future)
            try:
                return await future
            finally:
                timer.cancel()
        except TimeoutError:
            raise NoAnswer(self, timeout, True) from None
        except zmq.ZMQError as exc:
            log.warning("%s (%s): cannot send a request: %s", self.name, self.endpoint, exc)
            raise NoAnswer(self, timeout, False, f"cannot take the request: {exc}") from None
        finally:
            self._pending.pop(req, None)

    async def _send_within(self, frame: bytes, within: float) -> bool:
        """Through the asyncio layer: send now, or (not connected) once the shard is connected; False when the
        frame did not leave within `within` seconds (it is then withdrawn and never sent).

        Bounded as a whole: pyzmq queues a send behind another one waiting for the connection, the NOBLOCK one
        too. The bound does not cancel the send it waits for (asyncio.wait_for did): pyzmq may send the frame in
        the loop turn in which the bound passes, and a cancellation arriving after that would report a frame
        that left as never sent. A send still pending at the bound is withdrawn (pyzmq skips a cancelled one; it
        sends and settles its Future in one step, so a pending one has not left); a settled one is looked at."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        # pyzmq's asyncio sends return a Future (typed as an Awaitable).
        sending = cast("asyncio.Future[object]", self.socket.send(frame, flags=zmq.NOBLOCK, copy=False))
        waited_for_connection = False
        while True:
            if not sending.done():
                try:
                    await asyncio.wait((sending,), timeout=max(0.0, deadline - loop.time()))
                except asyncio.CancelledError:
                    sending.cancel()  # the caller gave up: a frame not yet sent stays unsent
                    raise
            if not sending.done():
                sending.cancel()
                # pyzmq drops the cancelled send from its queue in a done callback: let it run, or the next send
                # (a NOBLOCK one too) would queue behind it and wait for a connection.
                await asyncio.sleep(0)
                return False
            error = sending.exception()
            if error is None:
                return True
            if isinstance(error, zmq.Again) and not waited_for_connection:
                # Not connected: wait for the connection, within the same bound.
                waited_for_connection = True
                sending = cast("asyncio.Future[object]", self.socket.send(frame, copy=False))
                continue
            raise error

    async def _send_when_connected(self, req: int, frame: bytes, within: float) -> None:
        """Direct mode: send `frame` now, or join the waiting frames that the link's timer sends in order once the
        shard is connected; NoAnswer (not sent) after `within` seconds, or once the link is closed."""
        if not self._unsent:  # frames already waiting go first
            try:
                self._plain.send(frame, _NOBLOCK, copy=len(frame) < ZERO_COPY_FRAME)
            except zmq.Again:
                pass
            else:
                self._watch.sent()  # a send may take in the notice of frames waiting (bus/watch.py)
                return
        if within <= 0:
            raise NoAnswer(self, within, False)
        loop = asyncio.get_running_loop()
        sent: asyncio.Future[None] = loop.create_future()
        self._unsent[req] = (frame, sent)
        if self._retry is None:
            self._retry = loop.call_later(CONNECT_POLL, self._send_waiting)
        # Giving up takes the frame off the list in the same step, so the timer can never send it afterwards.
        expiry = loop.call_later(within, self._give_up, req, NoAnswer(self, within, False))
        try:
            await sent
        finally:
            expiry.cancel()
            self._unsent.pop(req, None)  # the caller was cancelled: its frame goes nowhere either

    def _give_up(self, req: int, why: Exception) -> None:
        entry = self._unsent.pop(req, None)
        if entry is not None and not entry[1].done():
            entry[1].set_exception(why)

    def _send_waiting(self) -> None:
        """The retry timer (direct mode): send the waiting frames, oldest first, until the socket refuses one;
        try again in CONNECT_POLL seconds while any still wait."""
        self._retry = None
        took = False
        while self._unsent:
            req = next(iter(self._unsent))
            frame, sent = self._unsent[req]
            if sent.done():  # its caller was cancelled this turn
                del self._unsent[req]
                continue
            try:
                self._plain.send(frame, _NOBLOCK, copy=len(frame) < ZERO_COPY_FRAME)
            except zmq.Again:
                break
            except zmq.ZMQError as exc:  # the request reports it (NoAnswer: cannot take the request)
                del self._unsent[req]
                sent.set_exception(exc)
                continue
            del self._unsent[req]
            sent.set_result(None)
            took = True
        if took:
            self._watch.sent()  # a send may take in the notice of frames waiting (bus/watch.py)
        if self._unsent:
            self._retry = asyncio.get_running_loop().call_later(CONNECT_POLL, self._send_waiting)

    # -- receiving -------------------------------------------------------------------------------------------

    async def receive(self, timeout: float | None, limit: int = FRAMES_PER_TURN) -> list[BusMessage]:
        """Wait up to `timeout` seconds (None: forever) for frames, read at most `limit` of those waiting, settle
        the answers to requests, and return the other messages in arrival order."""
        plain = self._plain
        others: list[BusMessage] = []
        # Direct mode: the wait looks first and says whether a frame waits (one EVENTS look less per frame).
        known = False
        if self._direct:
            if not await self._wait_readable(timeout):
                return []
            known = True
        elif not self._readable():  # nothing waiting: wait for up to `timeout`
            if timeout is None:
                # With no timeout, the wait is the read of the next frame: one Future, where the asyncio poll
                # makes a poller and several (this runs once per answer a frontend waits for).
                frames = await self.socket.recv_multipart()
                self.last_heard = time.monotonic()
                message = self._decode(frames[-1])
                if message is not None and not self._settle(message):
                    others.append(message)
                limit -= 1
            elif not await self.socket.poll(timeout=max(0, int(timeout * 1000))):
                return []
        for _ in range(limit):
            # Non-blocking reads, as the asyncio layer's own NOBLOCK reads are: EVENTS says whether one waits.
            if not known and not self._readable():
                break
            known = False
            try:
                frames = plain.recv_multipart(_NOBLOCK)
            except zmq.Again:
                break
            self.last_heard = time.monotonic()
            message = self._decode(frames[-1])
            if message is not None and not self._settle(message):
                others.append(message)
        return others

    async def _wait_readable(self, timeout: float | None) -> bool:
        """Direct mode: wait up to `timeout` for frames (True when they wait: looked at first), woken by the
        descriptor or by a send that took in their notification (bus/watch.py: it may end a little early)."""
        if timeout is not None and timeout <= 0:
            return self._readable()
        deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
        return await self._watch.wait(deadline)

    def _readable(self) -> bool:
        # Raises ZMQError once the link is closed (the shadow does not know the socket is gone).
        return self._watch.readable()

    def _decode(self, frame: bytes) -> BusMessage | None:
        try:
            return decode(frame)
        except SchemaError as exc:
            log.warning("%s (%s) sent an undecodable frame: %s", self.name, self.endpoint, exc)
            return None

    def _settle(self, message: BusMessage) -> bool:
        """Give an answer to the request waiting for it; True when the message was an answer (even a late one)."""
        req = getattr(message, "req", None)
        if not isinstance(req, int) or (isinstance(message, Error) and req == 0):
            return False
        future = self._pending.pop(req, None)
        if future is None:
            log.debug("%s: answer to request %d came after it gave up; dropped", self.name, req)
        elif not future.done():
            future.set_result(message)
        return True

    def start(self, on_message: OnMessage | None = None) -> None:
        """Receive in the background: answers settle requests, everything else goes to `on_message`."""
        if self._receiver is None or self._receiver.done():
            self._receiver = asyncio.create_task(self._receive_forever(on_message or self._unexpected))

    async def _receive_forever(self, on_message: OnMessage) -> None:
        while True:
            for message in await self.receive(None):
                try:
                    await on_message(message)
                except Exception:  # a handler's bug must not stop the answers to every later request
                    log.exception("%s (%s): handling a %s failed", self.name, self.endpoint, message.TYPE)
            await asyncio.sleep(0)  # a burst of frames must not starve the other tasks

    async def _unexpected(self, message: BusMessage) -> None:
        if isinstance(message, Error):
            log.warning("%s (%s) reports an error: %s", self.name, self.endpoint, message.text)
        else:
            log.warning("%s (%s) sent an unexpected %s", self.name, self.endpoint, message.TYPE)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        for req, (_, sent) in list(self._unsent.items()):  # never sent: they fail as for a shard that is away
            self._pending.pop(req, None)
            if not sent.done():
                sent.set_exception(NoAnswer(self, 0.0, False, "is closed (this process is stopping)"))
        self._unsent.clear()
        if self._receiver is not None:
            self._receiver.cancel()
            await asyncio.gather(self._receiver, return_exceptions=True)
        for future in self._pending.values():
            if not future.done():
                future.set_exception(NoAnswer(self, 0.0, True, "was closed before it answered"))
        self._pending.clear()
        self._watch.close()  # and a waiting receive is woken (it raises ZMQError)
        self.socket.close(linger=0)


def _expire(future: asyncio.Future[BusMessage]) -> None:
    if not future.done():
        future.set_exception(TimeoutError())


async def ask_all(links: list[BusLink], build: Callable[[int], BusMessage], timeout: float, *,
                  connect_timeout: float | None = None) -> list[BusMessage | NoAnswer]:
    """The same request to every link at once: one answer (or NoAnswer) per link, in the links' order."""

    async def one(link: BusLink) -> BusMessage | NoAnswer:
        try:
            return await link.request(build, timeout, connect_timeout=connect_timeout)
        except NoAnswer as missing:
            return missing

    return list(await asyncio.gather(*(one(link) for link in links)))


def links_to(endpoints: list[str], keys: CurveKeys | None, *, context: zmq.asyncio.Context | None = None,
             liveness: float | None = None) -> list[BusLink]:
    """One link per shard endpoint, named "shard N" after the endpoint's index in `queue.shards`."""
    return [BusLink(endpoint, keys, name=f"shard {index}", context=context, liveness=liveness)
            for index, endpoint in enumerate(endpoints)]
