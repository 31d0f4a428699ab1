"""The worker role: takes delivery jobs from every queue shard and sends back one Result per job.

Protocol (cluster/bus/schemas.py): one bus link (cluster/bus/client.py) per shard in `queue.shards`; the
protocol state of each is a `ShardSession` (delivery/shard_session.py). Every `queue.heartbeat_interval` the
worker sends it a Heartbeat (free slots, jobs held, Results kept, seen). Each link has at most
`delivery.concurrency` job runners (asyncio tasks made as the load needs them and kept): a Deliver goes to an
idle runner, or waits in the link's queue (FIFO) for the next runner that finishes. A runner waits for the
shard to be unfenced (acked within half of `queue.worker_timeout`), starts the job unless it was revoked
meanwhile, and delivers; its outcomes go back as Result(job_id, worker, outcomes), kept until the shard revokes
the job. An ack can drop jobs that have not started (revoked: no longer ours; a runner skips them) and ask for
lost Results again. A HeartbeatAck from a new shard epoch means the shard restarted and forgot us: the worker
heartbeats again at once so the shard learns its credits.

Failure modes: an undecodable or unexpected frame is logged and dropped (never a crash). A Deliver for a job
already held is ignored. A recipient (or sender) address the SMTP server would refuse fails at once with
553 5.1.3 (5.1.7), logged in one line. An unexpected error inside a delivery defers the job's recipients with
451 4.3.0 on its first attempts (one log line each) and fails them with 554 5.3.0 from attempt
`INTERNAL_ERROR_ATTEMPTS` on (traceback logged with that failure), so one poison message is bounced, not
retried with tracebacks for days. Nothing is queued for an unreachable shard (ZMQ_IMMEDIATE): a heartbeat or
Result that cannot be sent is skipped; the Result stays listed as finished, and the shard asks for it again (a
worker that dies meanwhile leaves the job to the shard's lease: a counted possible duplicate, never a loss).
A new `queue.shards` (`reload_shards`, SIGHUP or a changed file) is taken without a restart.
On stop, jobs that have not started are handed back at once (a last heartbeat without them), running jobs get
`SHUTDOWN_GRACE` seconds to finish, and the rest come back to the shard through their leases. A job whose run
raises unexpectedly outside the delivery (a bug) is logged with its queue id and dropped from our heartbeats,
so its shard hands it out again; the runner goes on with the next job.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import secrets
import socket
import time
from collections import deque

from cluster.bus.client import BusLink
from cluster.bus.schemas import (
    BusMessage,
    Deliver,
    Error,
    HeartbeatAck,
    Outcome,
    OutcomeKind,
    recipient_problem,
    result_frame,
    sender_problem,
)
from cluster.bus.security import cluster_keys
from cluster.config import Config
from cluster.delivery import metrics
from cluster.delivery.connections import ConnectionCache
from cluster.delivery.deliver import Deliverer
from cluster.delivery.mta_sts import MtaSts, verifying_context
from cluster.delivery.mx import CachingMxResolver, DnsMxResolver, MxResolver
from cluster.delivery.shard_session import ShardSession

log = logging.getLogger(__name__)

# Seconds that running jobs get to finish after stop is requested.
SHUTDOWN_GRACE = 5.0
# Frames handled from one shard before other tasks get a turn.
FRAMES_PER_TURN = 100
# How often idle cached connections are checked for expiry.
PRUNE_INTERVAL = 1.0
# The attempt at which a job whose delivery keeps raising unexpectedly fails instead of being deferred again.
INTERNAL_ERROR_ATTEMPTS = 3


class _ShardLink:
    """The bus link to one shard (cluster/bus/client.py) and the jobs taken from that shard."""

    def __init__(self, index: int, endpoint: str, config: Config) -> None:
        self.index = index
        self.endpoint = endpoint
        # ZMQ_IMMEDIATE (set by BusLink): nothing is queued for a shard that is not connected, so a burst of old
        # heartbeats (with old in_flight lists) never misleads it when it comes back. Results are kept in the
        # session until the shard revokes their jobs.
        # liveness: a connection silent for worker_timeout (a cut link, a paused shard) is dropped and made again,
        # instead of waiting for TCP retransmissions to resume after the cut heals.
        self.bus = _bus_link(index, endpoint, config)
        self.session = ShardSession(config.delivery.concurrency, config.queue.worker_timeout / 2)
        # The job runners: at most `concurrency` (bounds the deliveries running at once even if the shard sends
        # more jobs than it had credits for), made as jobs come and kept. A runner with nothing to do waits on a
        # future in `idle`; a job no runner is free for waits in `queue` with the time it was received.
        self.concurrency = config.delivery.concurrency
        self.runners: set[asyncio.Task[None]] = set()
        self.idle: list[asyncio.Future[tuple[Deliver, float] | None]] = []
        self.queue: deque[tuple[Deliver, float]] = deque()
        # Set when the worker stops: runners then take no further job and end.
        self.closing = False
        # Set by every ack: fenced jobs wait for it.
        self.acked = asyncio.Event()
        # The shard's last ack said it is drained (cluster/queue/drain.py).
        self.drained = False

    async def send(self, frame: bytes) -> bool:
        return await self.bus.send(frame)

    def held(self) -> int:
        """Jobs taken from this shard and not finished: waiting for a runner (or an ack) or running."""
        return len(self.session.waiting) + len(self.session.running)

    def next_job(self) -> tuple[Deliver, float] | None:
        """The next queued job for a runner that just finished one, or None (also once the link is closing)."""
        return self.queue.popleft() if self.queue and not self.closing else None

    def wake_idle(self) -> None:
        """Wake every idle runner with no job: it ends (the link is closing)."""
        idle, self.idle = self.idle, []
        for waiter in idle:
            if not waiter.done():
                waiter.set_result(None)


def _bus_link(index: int, endpoint: str, config: Config) -> BusLink:
    # direct: sends and waits on the socket itself, without pyzmq's asyncio layer (a Future and a poll per frame).
    return BusLink(endpoint, cluster_keys(config.bus), name=f"shard {index}", liveness=config.queue.worker_timeout,
                   direct=True)


class Worker:
    def __init__(self, config: Config, name: str | None = None, resolver: MxResolver | None = None) -> None:
        self.config = config
        self.name = name or f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self.resolver: MxResolver = resolver or CachingMxResolver(
            DnsMxResolver(config.dns.nameservers, config.dns.timeout))
        delivery = config.delivery
        self.cache = ConnectionCache(delivery.connection_idle_timeout, delivery.max_deliveries_per_connection)
        sts = config.mta_sts
        for result in metrics.MTA_STS_RESULTS:  # every series at zero, for dashboards and alerts
            metrics.MTA_STS.labels(result=result)
        sts_context = verifying_context(sts.ca_file) if sts.enabled else None
        # TXT lookups go to the same resolver as MX lookups (a test's static zone, or delivery.nameservers).
        txt = getattr(self.resolver, "txt", None) or DnsMxResolver(delivery.nameservers).txt
        mta_sts = MtaSts(txt, self._addresses, sts_context, sts.https_port,
                         sts.fetch_timeout) if sts_context is not None else None
        self.deliverer = Deliverer(config, self.resolver, self.cache, mta_sts=mta_sts, sts_context=sts_context)
        self._links: list[_ShardLink] = []
        self._serving: dict[int, asyncio.Task[None]] = {}  # the receive-and-heartbeat task of each link
        self._stopping = False

    async def _addresses(self, host: str) -> list[str]:
        return list((await self.resolver.addresses(host)).addresses)

    def _jobs_held(self) -> float:
        return float(sum(link.held() for link in self._links))

    def is_ready(self) -> bool:
        if not self._links:
            return False
        return self._shards_connected() == len(self._links)

    def _shards_connected(self) -> int:
        now = time.monotonic()
        window = self.config.queue.worker_timeout
        # A shard that last said it is drained holds no mail: gone (scaled away), it does not make us unready.
        connected = sum(1 for link in self._links if link.drained or now - link.session.last_ack < window)
        metrics.SHARDS_CONNECTED.set(connected)
        return connected

    async def run(self, stop: asyncio.Event) -> None:
        self._links = [_ShardLink(i, endpoint, self.config) for i, endpoint in enumerate(self.config.queue.shards)]
        # Read when scraped (two locked gauge updates per job otherwise): the jobs held, waiting or running.
        metrics.JOBS_IN_FLIGHT.set_function(self._jobs_held)
        for link in self._links:
            self._serving[link.index] = asyncio.create_task(self._serve_link(link))
        pruning = asyncio.create_task(self._prune_forever())
        try:
            await stop.wait()
        finally:
            self._stopping = True
            tasks = [*self._serving.values(), pruning]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self._hand_back_waiting()
            await self._finish_jobs()
            for link in self._links:
                for frame in link.session.results.values():
                    await link.send(frame)  # one last try; the shard's lease covers a failure
            self.cache.close_all()
            for link in self._links:
                await link.bus.close()
            metrics.SHARDS_CONNECTED.set(0)

    async def reload_shards(self, shards: list[str]) -> None:
        """A new `queue.shards` (SIGHUP or a changed configuration file, cluster/roles.py): take jobs from added
        shards; for a shard whose endpoint changed (a pod's new address), keep its jobs and Results and only
        connect anew; a shard no longer listed (a drained one forgotten) is left: its jobs not yet reported are
        dropped (their shard, if it still runs, takes them back through their leases)."""
        if self._stopping or not self._links or shards == [link.endpoint for link in self._links]:
            return
        changed = 0
        for index, endpoint in enumerate(shards):
            if index >= len(self._links):
                link = _ShardLink(index, endpoint, self.config)
                self._links.append(link)
                self._serving[index] = asyncio.create_task(self._serve_link(link))
                changed += 1
            elif self._links[index].endpoint != endpoint:
                link = self._links[index]
                await self._stop_serving(index)
                await link.bus.close()
                link.endpoint = endpoint
                link.bus = _bus_link(index, endpoint, self.config)
                self._serving[index] = asyncio.create_task(self._serve_link(link))
                changed += 1
        for link in self._links[len(shards):]:
            await self._stop_serving(link.index)
            link.closing = True
            link.wake_idle()
            for task in link.runners:
                task.cancel()
            await asyncio.gather(*link.runners, return_exceptions=True)
            await link.bus.close()
            changed += 1
        del self._links[len(shards):]
        log.info("queue.shards reloaded: %d shards (%d links made, moved or dropped)", len(shards), changed)

    async def _stop_serving(self, index: int) -> None:
        task = self._serving.pop(index, None)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _hand_back_waiting(self) -> None:
        """Drop the jobs that have not started and say so in a last heartbeat: their shards re-queue them now
        (they were never attempted: no duplicate possible)."""
        for link in self._links:
            waiting = list(link.session.waiting)
            for job_id in waiting:
                link.session.abandon(job_id)
            # No runner takes another job; idle ones end, one waiting for an ack finds its job gone.
            link.closing = True
            link.queue.clear()
            link.wake_idle()
            link.acked.set()
            link.acked.clear()
            if waiting:
                log.info("shard %d: handing back %d jobs not started", link.index, len(waiting))
            await link.send(link.session.heartbeat(self.name, time.monotonic()).encode())

    async def _finish_jobs(self) -> None:
        runners = [task for link in self._links for task in link.runners]
        if not runners:
            return
        await asyncio.wait(runners, timeout=SHUTDOWN_GRACE)
        abandoned = sum(len(link.session.running) for link in self._links)
        for task in runners:
            task.cancel()
        if abandoned:
            log.info("abandoned %d jobs at shutdown; their shards take them back when the leases expire",
                     abandoned)
        await asyncio.gather(*runners, return_exceptions=True)

    async def _heartbeat(self, link: _ShardLink) -> None:
        if self._stopping:
            return
        await link.send(link.session.heartbeat(self.name, time.monotonic()).encode())

    async def _prune_forever(self) -> None:
        while True:
            await asyncio.sleep(PRUNE_INTERVAL)
            self.cache.prune()

    async def _serve_link(self, link: _ShardLink) -> None:
        """Receive from one shard and heartbeat to it, in one loop: every heartbeat is sent after all the frames
        that had arrived were handled, so its in_flight list includes every Deliver already received (a shard
        re-queues jobs missing from it)."""
        interval = self.config.queue.heartbeat_interval
        next_beat = time.monotonic()
        handled = 0  # frames handled since this loop last gave the other tasks a turn on purpose
        while True:
            try:
                # A bounded batch, then the heartbeat check. A receive that finds no frame waits, which gives the
                # other tasks (the deliveries) their turn; after FRAMES_PER_TURN frames without such a wait
                # (frames kept coming), they get one on purpose.
                messages = await link.bus.receive(max(0.0, next_beat - time.monotonic()), FRAMES_PER_TURN)
                for message in messages:
                    await self._on_message(link, message)
                handled += len(messages)
                if handled >= FRAMES_PER_TURN:
                    handled = 0
                    await asyncio.sleep(0)
                if time.monotonic() >= next_beat:
                    await self._heartbeat(link)
                    self._shards_connected()
                    next_beat = time.monotonic() + interval
            except Exception:  # a bug must not silence this shard's link for good (nothing awaits this task)
                log.exception("shard %d: the link's loop failed; going on", link.index)
                await asyncio.sleep(min(interval, 1.0))

    async def _on_message(self, link: _ShardLink, message: BusMessage) -> None:
        if isinstance(message, HeartbeatAck):
            await self._on_ack(link, message)
        elif isinstance(message, Deliver):
            await self._on_deliver(link, message)
        elif isinstance(message, Error):
            log.warning("shard %d reports an error: %s", link.index, message.text)
        else:
            log.warning("shard %d sent an unexpected %s", link.index, message.TYPE)

    async def _on_ack(self, link: _ShardLink, ack: HeartbeatAck) -> None:
        link.drained = ack.state == "drained"
        # Revoked jobs leave the session's waiting jobs here: a runner skips them (`ShardSession.start`).
        actions = link.session.on_ack(ack, time.monotonic())
        if actions.dropped:
            log.info("shard %d revoked %d jobs we had not started (handed out again while we were cut off)",
                     link.index, len(actions.dropped))
        for frame in actions.resend:
            await link.send(frame)
        link.acked.set()
        link.acked.clear()
        if actions.restarted:
            log.info("shard %d restarted (new epoch %s): announcing ourselves again", link.index, ack.shard_epoch)
            await self._heartbeat(link)

    async def _on_deliver(self, link: _ShardLink, job: Deliver) -> None:
        if self._stopping:
            link.session.accept(job)
            link.session.abandon(job.job_id)
            return  # not in our heartbeats: the shard takes it back
        if not link.session.accept(job):
            log.warning("shard %d sent job %s again while we hold it; ignored", link.index, job.job_id)
            return
        entry = (job, time.perf_counter())
        idle = link.idle
        while idle:
            waiter = idle.pop()
            if not waiter.done():
                waiter.set_result(entry)
                return
        if len(link.runners) < link.concurrency:
            runner = asyncio.create_task(self._runner(link, entry))
            link.runners.add(runner)
            runner.add_done_callback(link.runners.discard)
        else:
            link.queue.append(entry)

    async def _runner(self, link: _ShardLink, entry: tuple[Deliver, float]) -> None:
        """Run jobs of one link one after the other: this one, then the queued ones, then whatever comes."""
        loop = asyncio.get_running_loop()
        while True:
            job, received = entry
            try:
                await self._run_job(link, job, received)
            except asyncio.CancelledError:
                link.session.abandon(job.job_id)  # not finished here: no longer ours to report
                raise
            except Exception:  # a bug outside the delivery: the shard hands the job out again; go on
                link.session.abandon(job.job_id)
                log.exception("queue_id=%s job=%s: running the job failed; handing it back", job.queue_id,
                              job.job_id)
            following = link.next_job()
            if following is None:
                if link.closing:
                    return
                waiter: asyncio.Future[tuple[Deliver, float] | None] = loop.create_future()
                link.idle.append(waiter)
                following = await waiter
                if following is None:
                    return  # woken to end: the worker stops
            entry = following

    async def _run_job(self, link: _ShardLink, job: Deliver, received: float) -> None:
        session = link.session
        job_id = job.job_id
        if session.fenced(time.monotonic()):
            while session.fenced(time.monotonic()) and job_id in session.waiting:
                await link.acked.wait()
        if not session.start(job_id):
            return  # revoked while it waited: another worker has it now (or handed back at a stop)
        outcomes = await self._outcomes(job) if job.recipients else []
        frame = result_frame(job_id, self.name, outcomes)
        session.finish(job_id, frame)
        await link.send(frame)
        metrics.DURATION.observe(time.perf_counter() - received)

    async def _outcomes(self, job: Deliver) -> list[Outcome]:
        """One outcome per recipient: bad addresses fail at once, the rest go to the deliverer."""
        refused = envelope_refusals(job)
        if refused:
            log.warning("queue_id=%s job=%s: %s", job.queue_id, job.job_id,
                        "; ".join(f"{o.recipient!r}: {o.code} {o.enhanced} {o.text}" for o in refused))
        if len(refused) == len(job.recipients):
            return refused
        deliverable = job if not refused else dataclasses.replace(
            job, recipients=[r for r in job.recipients if r not in {o.recipient for o in refused}])
        try:
            delivered = await self.deliverer.deliver(deliverable)
        except Exception as error:  # a bug in delivery must neither kill the worker nor retry the job forever
            delivered = internal_error_outcomes(deliverable, error)
        return refused + delivered


def envelope_refusals(job: Deliver) -> list[Outcome]:
    """Permanent failures for the recipients of a job that can never be delivered because an address is invalid
    (the bus checks Injects, but a spool may hold older mail): all of them for a bad sender."""
    problem = sender_problem(job.sender)
    if problem is not None:
        return [Outcome(recipient=r, kind=OutcomeKind.FAILED, code=553, enhanced="5.1.7", text=problem)
                for r in job.recipients]
    refused = []
    for recipient in job.recipients:
        problem = recipient_problem(recipient)
        if problem is not None:
            refused.append(Outcome(recipient=recipient, kind=OutcomeKind.FAILED, code=553, enhanced="5.1.3",
                                   text=problem))
    return refused


def internal_error_outcomes(job: Deliver, error: Exception) -> list[Outcome]:
    """Outcomes for a job whose delivery raised `error` unexpectedly (call from the except block).

    Early attempts defer (the cause may be passing); from attempt `INTERNAL_ERROR_ATTEMPTS` on the job fails, so
    a message that always trips the same bug is bounced instead of retried for the whole `queue.max_lifetime`.
    One line per attempt; the traceback only with the failure, so a poison message logs it once.
    """
    final = job.attempt >= INTERNAL_ERROR_ATTEMPTS
    log.error("queue_id=%s job=%s: internal error in delivery on attempt %d: %r; %s", job.queue_id, job.job_id,
              job.attempt, error, "failing its recipients (554 5.3.0)" if final else "deferring (451 4.3.0)",
              exc_info=final)
    if final:
        return [Outcome(recipient=r, kind=OutcomeKind.FAILED, code=554, enhanced="5.3.0",
                        text=f"Internal error in the delivery worker on {job.attempt} attempts; giving up")
                for r in job.recipients]
    return [Outcome(recipient=r, kind=OutcomeKind.DEFERRED, code=451, enhanced="4.3.0",
                    text="Internal error in the delivery worker") for r in job.recipients]
