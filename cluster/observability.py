"""Observability shared by every role: common metrics and the HTTP endpoint for /metrics, /healthz, /readyz.

Inputs: a listen address ("host:port", "[v6]:port", parsed by `cluster.config.split_host_port`; port 0 picks
a free port, for tests: the configuration refuses it), the role name, and a `ready()` callable owned by the
role (frontend: every shard reachable; shard: spool open and recovered; worker: connected to every shard).

Outputs: an `asyncio.Server` (its `sockets[0].getsockname()` gives the bound port) answering, over HTTP/1.1
(RFC 9112), one request per connection (`Connection: close`):

    GET /metrics   200, Prometheus text format of the default registry (`CONTENT_TYPE_LATEST`)
    GET /healthz   200 "ok" for as long as the event loop serves requests (liveness)
    GET /readyz    200 "ready" when ready() is true, else 503 "not ready" (readiness)
    HEAD           same as GET without a body
    other paths    404; other methods 405 (with `Allow`)

Failure modes: a malformed request line or header block gets 400, a request head over `MAX_REQUEST_HEAD` bytes
gets 431, a client that does not finish its request head within `READ_TIMEOUT` gets 408, a client that does not
read the answer within `WRITE_TIMEOUT` is dropped. At most `MAX_CONNECTIONS` connections are kept: when a new
one arrives, the connection idle the longest (no complete request yet, or already answered) is closed to make
room, so clients that connect and send nothing cannot starve the liveness probe; only when every connection is
busy being answered does the newcomer get 503 at once.
Input the client sent beyond its request head is drained (bounded) before the close, so the answer is not lost
to a TCP reset. A connection still open when the event loop stops is aborted quietly.
Nothing a client sends raises out of the handler; a `ready()` that raises is logged and reported as not ready.

Common metrics: `mtacluster_build_info{version,role}` (always 1) and `mtacluster_up_ready{role}` (0/1, refreshed
on every /readyz and /metrics request); the process and platform collectors come with prometheus_client.
`domain_label()` bounds destination-domain label values to the configured top domains.

`count(series, amount)` adds to a counter (or gauge) series without touching it, for per-message counts (the
frontend's and the worker's; `on_collect` adds a role's own tallies, such as the frontend's per verb): the amounts are
kept as plain numbers and added to their series when the registry is read (a scrape of /metrics, or
`REGISTRY.get_sample_value`) by `PENDING`, a collector registered when this module is first imported, so ahead
of every series of a metrics module that imports it before making its series (a collection reaches it first: a
read sees every count made before it). A locked increment costs more than the dict update.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable, Collection, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Counter, Gauge, generate_latest
from prometheus_client.metrics_core import Metric

from cluster.config import split_host_port
from cluster.domains import domain_key
from cluster.version import VERSION

log = logging.getLogger(__name__)


class _PendingCounts:
    """Amounts for counter and gauge series, added to them when the registry is collected (module docstring)."""

    def __init__(self) -> None:
        self.amounts: dict[Counter | Gauge, float] = {}
        self.tallies: list[Callable[[], None]] = []  # `on_collect`

    def describe(self) -> list[Metric]:
        return []  # no series of its own (and registering it does not collect it)

    def collect(self) -> Iterator[Metric]:
        self.flush()
        return iter(())

    def flush(self) -> None:
        for tally in self.tallies:
            tally()
        amounts, self.amounts = self.amounts, {}
        for series, amount in amounts.items():
            series.inc(amount)


# Registered before the series of the modules that import this one: a collection reaches it first.
PENDING = _PendingCounts()
REGISTRY.register(PENDING)


def count(series: Counter | Gauge, amount: float = 1.0) -> None:
    """Add `amount` to a counter (or gauge: negative amounts too) series, without a lock (module docstring)."""
    amounts = PENDING.amounts
    amounts[series] = amounts.get(series, 0.0) + amount


def on_collect(flush: Callable[[], None]) -> None:
    """Call `flush` (it adds a role's own tallies to their series) whenever the registry is read, as `count`'s
    amounts are added."""
    PENDING.tallies.append(flush)

BUILD_INFO = Gauge("mtacluster_build_info", "Build of this process: always 1, labelled with the version and role.",
                   ["version", "role"])
UP_READY = Gauge("mtacluster_up_ready", "1 when this process answers /readyz with 200, else 0.", ["role"])

OTHER_DOMAIN = "other"

# Limits for the HTTP endpoint: probes and scrapes send a few hundred bytes and read at once.
MAX_REQUEST_HEAD = 8192
READ_TIMEOUT = 5.0
WRITE_TIMEOUT = 10.0
MAX_CONNECTIONS = 64
# After answering, read and drop what the client still sends (up to this much, for this long) before closing:
# closing a socket with unread input sends a TCP reset, which can destroy the answer before the client reads it.
LINGER_BYTES = 256 * 1024
LINGER_TIMEOUT = 2.0

_ALLOWED_METHODS = ("GET", "HEAD")
# RFC 9112 section 3: request-line = method SP request-target SP HTTP-version.
_REQUEST_LINE = re.compile(rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+) (\S+) HTTP/(\d)\.(\d)")
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 408: "Request Timeout",
            431: "Request Header Fields Too Large", 503: "Service Unavailable", 505: "HTTP Version Not Supported"}


def domain_label(domain: str, top_domains: Collection[str]) -> str:
    """The label value for a destination domain: the domain itself when it is a top domain, else "other".

    The domain is compared in its `cluster.domains.domain_key` form, which `top_domains` should hold.
    """
    name = domain_key(domain)
    return name if name and name in top_domains else OTHER_DOMAIN


class _Endpoint:
    """Answers one HTTP request per connection; see the module docstring for the routes."""

    def __init__(self, role: str, ready: Callable[[], bool]) -> None:
        self._role = role
        self._ready = ready
        # Every connection kept, and those idle (waiting for a request head, or lingering), oldest first.
        self._open: set[asyncio.StreamWriter] = set()
        self._idle: dict[asyncio.StreamWriter, None] = {}

    def is_ready(self) -> bool:
        try:
            ready = bool(self._ready())
        except Exception:  # the role's readiness check is not ours to crash on; report it and say "not ready"
            log.exception("readiness check of role %s raised", self._role)
            ready = False
        UP_READY.labels(role=self._role).set(1 if ready else 0)
        return ready

    def _make_room(self) -> bool:
        """Close idle connections, oldest first, until a new one fits; False when all are busy."""
        while len(self._open) >= MAX_CONNECTIONS and self._idle:
            oldest = next(iter(self._idle))
            del self._idle[oldest]
            self._open.discard(oldest)
            oldest.transport.abort()
        return len(self._open) < MAX_CONNECTIONS

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if not self._make_room():
                await self._respond(writer, 503, b"too many connections\n", head_only=False)
            else:
                self._open.add(writer)
                self._idle[writer] = None
                status, body, extra, head_only = await self._answer(reader)
                if writer not in self._open:
                    return  # closed to make room for a newer client
                del self._idle[writer]
                await self._respond(writer, status, body, head_only=head_only, extra=extra)
                self._idle[writer] = None
                await self._linger(reader, writer)
            writer.close()
            await asyncio.wait_for(writer.wait_closed(), WRITE_TIMEOUT)
        except (ConnectionError, TimeoutError) as exc:
            log.debug("metrics client went away: %r", exc)
            writer.transport.abort()
        except asyncio.CancelledError:
            # The event loop is shutting down: drop the connection at once. Not re-raised: this task is a leaf
            # nobody awaits, and on Python 3.11 asyncio's done-callback for a cancelled stream handler logs a
            # spurious traceback.
            writer.transport.abort()
        finally:
            self._open.discard(writer)
            self._idle.pop(writer, None)

    @staticmethod
    async def _linger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Half-close, then drain the client's leftover input until it closes (bounded in bytes and time)."""
        if writer.can_write_eof():
            writer.write_eof()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + LINGER_TIMEOUT
        discarded = 0
        while discarded < LINGER_BYTES and (remaining := deadline - loop.time()) > 0:
            chunk = await asyncio.wait_for(reader.read(65536), remaining)
            if not chunk:
                return
            discarded += len(chunk)

    async def _answer(self, reader: asyncio.StreamReader) -> tuple[int, bytes, dict[str, str], bool]:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT)
        except TimeoutError:
            return 408, b"request timeout\n", {}, False
        except asyncio.LimitOverrunError:
            return 431, b"request head too large\n", {}, False
        except asyncio.IncompleteReadError as exc:
            if len(exc.partial) >= MAX_REQUEST_HEAD:
                return 431, b"request head too large\n", {}, False
            return 400, b"incomplete request\n", {}, False
        request_line = head.split(b"\r\n", 1)[0]
        m = _REQUEST_LINE.fullmatch(request_line)
        if m is None:
            return 400, b"malformed request line\n", {}, False
        method, target, major = m.group(1).decode("ascii"), m.group(2), m.group(3)
        if major != b"1":
            return 505, b"only HTTP/1.x\n", {}, False
        if method not in _ALLOWED_METHODS:
            return 405, b"method not allowed\n", {"Allow": ", ".join(_ALLOWED_METHODS)}, False
        head_only = method == "HEAD"
        path = target.split(b"?", 1)[0]
        if path == b"/metrics":
            self.is_ready()
            return 200, generate_latest(), {"Content-Type": CONTENT_TYPE_LATEST}, head_only
        if path == b"/healthz":
            return 200, b"ok\n", {}, head_only
        if path == b"/readyz":
            if self.is_ready():
                return 200, b"ready\n", {}, head_only
            return 503, b"not ready\n", {}, head_only
        return 404, b"not found\n", {}, head_only

    @staticmethod
    async def _respond(writer: asyncio.StreamWriter, status: int, body: bytes, *, head_only: bool,
                       extra: dict[str, str] | None = None) -> None:
        headers = {"Content-Type": "text/plain; charset=utf-8", **(extra or {}),
                   "Content-Length": str(len(body)), "Connection": "close"}
        lines = [f"HTTP/1.1 {status} {_REASONS[status]}"] + [f"{k}: {v}" for k, v in headers.items()]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("ascii"))
        if not head_only:
            writer.write(body)
        await asyncio.wait_for(writer.drain(), WRITE_TIMEOUT)


async def serve_http(listen: str, role: str, ready: Callable[[], bool]) -> asyncio.Server:
    """Start the /metrics, /healthz, /readyz endpoint for `role` on `listen`; close() the server to stop it.

    Raises ValueError for a malformed address and OSError when the address cannot be bound.
    """
    host, port = split_host_port(listen, key="metrics.listen", any_port=True)
    BUILD_INFO.labels(version=VERSION, role=role).set(1)
    endpoint = _Endpoint(role, ready)
    endpoint.is_ready()
    return await asyncio.start_server(endpoint.handle, host, port, limit=MAX_REQUEST_HEAD, reuse_address=True)
