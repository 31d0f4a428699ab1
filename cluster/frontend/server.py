"""The frontend role: SMTP listeners that hand every accepted message to the queue shards.

Three kinds of listener, each on every address of its key, all with SO_REUSEPORT (several frontend processes
on one host share a port and the kernel spreads connections over them):
- `smtp.listen` (port 25 style, mail from other MTAs): STARTTLS offered when `smtp.tls_cert_file` is set;
  relaying needs AUTH or a trusted network; messages are stored as they came;
- `smtp.submission_listen` (port 587 style, RFC 6409): STARTTLS offered, MAIL before AUTH gets 530 5.7.0,
  Message-ID and Date added when missing;
- `smtp.submissions_listen` (port 465 style, RFC 8314 3.3): as submission, with TLS from the first byte.
  These connections are accepted on a plain socket, the PROXY header (if any) is read from it exactly, and
  only then is the TLS handshake made, so a balancer's header and the client's handshake never mix.
AUTH PLAIN LOGIN is offered under TLS when `auth.users_file` is set (see `cluster.frontend.session`).

Enforces the connection limits (`smtp.max_connections` per process, `smtp.max_connections_per_client` per
client address, over all listeners) before any SMTP is spoken: a client over its limit gets 421 4.7.0 and
the connection is closed. Stateless: nothing is kept once a session ends.
Failure modes: an unusable certificate or key raises ConfigError at startup, naming the key; an address that
cannot be bound raises OSError at startup. The listeners are opened only once every shard answered a ping
(`_wait_for_shards` says why), so a frontend whose shards are not there takes no connection. Ready (for
/readyz) when every listener is up and every shard answers, and not stopping.

Stopping (SIGTERM), in this order, so that scaling frontends in refuses no connection and loses no message:
1. not ready at once (/readyz 503): a load balancer checking it stops sending new connections;
2. for `smtp.shutdown_grace` seconds, everything goes on as before: the listeners stay open (connections the
   balancer sent before it noticed are served) and open sessions are served normally;
3. the listeners close; sessions still open get 421 4.3.2 (replies.SHUTTING_DOWN), except those storing a
   message, which finish (up to `smtp.inject_timeout`) and answer 250 or 451;
4. only then are the shard links closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import socket
import ssl
import time
from collections import Counter

from cluster.accounts.checks import AccountChecks, ShardsLater
from cluster.accounts.policy import AccountPolicy
from cluster.accounts.recipients import LocalRecipients
from cluster.accounts.spf import DnsLookup, SpfChecker
from cluster.bus.security import cluster_keys
from cluster.config import Config, split_host_port
from cluster.delivery.mx import CachingMxResolver, DnsMxResolver
from cluster.delivery.routing import Router
from cluster.frontend import auth, metrics
from cluster.frontend.deadline import Deadlines
from cluster.frontend.injector import ShardClient
from cluster.frontend.outbound import Outbound
from cluster.frontend.policy import (
    SMTP,
    SUBMISSION,
    SUBMISSIONS,
    PolicyChain,
    RelayPolicy,
    SessionPolicy,
    SubmissionPolicy,
)
from cluster.frontend.session import PROXY_HEADER_MAX, PROXY_HEADER_TIMEOUT, InboundSession, Listener, Security
from cluster.smtp import replies
from cluster.smtp.proxy import V2_SIGNATURE, ProxyHeaderError, parse_proxy_header
from cluster.smtp.replies import Reply
from cluster.smtp.server import ServerSettings
from cluster.tls import server_context
from cluster.users import UserDatabase

log = logging.getLogger(__name__)

_BACKLOG = 1024
# Seconds between two sweeps of the sessions' read timeouts (at most; shorter when a timeout is short).
DEADLINE_SWEEP = 1.0
# While waiting for the shards before listening: how often to look, and how often to say so in the log.
SHARD_POLL = 0.05
SHARD_WAIT_WARNING = 10.0


class Frontend:
    def __init__(self, config: Config, checks: tuple[SessionPolicy, ...] = ()) -> None:
        """`checks` run before the built-in accounts, relay and submission checks at every decision point."""
        self.config = config
        self.relay = RelayPolicy(config.smtp.relay_networks, config.smtp.local_domains)
        self.settings, self.security = self._security(config)
        self.accounts = self._accounts(config, self.security.users)
        self.listeners = self._listeners(config, (*checks, AccountChecks(self.accounts)))
        self.shards: ShardClient | None = None
        self.servers: list[asyncio.Server] = []
        # Set when stopping: a connection accepted just before the listeners closed gets 421 at once (the shard
        # links close soon, so it could not store a message).
        self.stopping = False
        # Set at once on SIGTERM: /readyz says not ready while the shutdown grace runs.
        self.terminating = False
        self._server_kinds: list[str] = []  # the listener kind of each of self.servers
        self._tls_sockets: list[socket.socket] = []
        self._accept_loops: list[asyncio.Task[None]] = []
        self.per_client: Counter[str] = Counter()
        # The sessions that passed the connection limits, and the implicit-TLS connections still in their PROXY
        # header or TLS handshake (they count against smtp.max_connections too).
        self.sessions: dict[InboundSession, None] = {}
        self._handshakes: set[asyncio.Task[None]] = set()
        # The sessions' read timeouts: one sweep for all, a small fraction of the shortest timeout apart.
        shortest = min(config.smtp.command_timeout, config.smtp.data_timeout, PROXY_HEADER_TIMEOUT)
        self.deadlines = Deadlines(min(DEADLINE_SWEEP, shortest / 4))

    @staticmethod
    def _security(config: Config) -> tuple[ServerSettings, Security]:
        """The protocol settings before TLS, and what sessions need for STARTTLS and AUTH."""
        base = ServerSettings.from_config(config.smtp)
        context = server_context(config.smtp.tls_cert_file, config.smtp.tls_key_file, "smtp")
        users = UserDatabase(config.auth.users_file) if config.auth.users_file else None
        outbound = Outbound.from_config(config)
        # AUTH is a known verb whenever there are users: before TLS it gets 538 (RFC 4954 4), not 500.
        verbs = {"AUTH"} if users is not None else set()
        if context is None:
            if users is not None:
                log.warning("auth.users_file is set but smtp.tls_cert_file is not: SMTP AUTH needs STARTTLS, so "
                            "every AUTH gets 538 5.7.11")
            return (dataclasses.replace(base, extension_commands=frozenset(verbs)),
                    Security(users=users, outbound=outbound))
        before_tls = dataclasses.replace(base, extra_extensions=("STARTTLS",),
                                         extension_commands=frozenset(verbs | {"STARTTLS"}))
        after_tls = dataclasses.replace(base, extra_extensions=(auth.EHLO_KEYWORD,) if users is not None else (),
                                        extension_commands=frozenset(verbs | {"STARTTLS"}))
        return before_tls, Security(tls_context=context, tls_settings=after_tls, users=users, outbound=outbound)

    @staticmethod
    def _accounts(config: Config, users: UserDatabase | None) -> AccountPolicy:
        """Accounts, limits and the sender and recipient checks (cluster.accounts); its shard client comes with
        `run`."""
        spf = None
        if config.smtp.spf != "off":
            spf = SpfChecker(DnsLookup(config.dns.nameservers, config.dns.timeout), config.smtp.hostname,
                             config.dns.timeout)
        resolver = CachingMxResolver(DnsMxResolver(config.dns.nameservers, config.dns.timeout))
        recipients = LocalRecipients(Router(config.delivery), users, config.aliases)
        return AccountPolicy(config, users, ShardsLater(list(config.queue.shards)), resolver, recipients, spf)

    def _listeners(self, config: Config, checks: tuple[SessionPolicy, ...]) -> dict[str, Listener]:
        mta = PolicyChain((*checks, self.relay))
        submission = PolicyChain((SubmissionPolicy(), *checks, self.relay))
        listeners = {SMTP: Listener(SMTP, self.settings, mta),
                     SUBMISSION: Listener(SUBMISSION, self.settings, submission, complete_headers=True)}
        if self.security.tls_settings is not None:
            listeners[SUBMISSIONS] = Listener(SUBMISSIONS, self.security.tls_settings, submission,
                                              implicit_tls=True, complete_headers=True)
        return listeners

    def addresses(self, kind: str = SMTP) -> list[tuple[str, int]]:
        """The bound (host, port) of every listener of a kind (useful with port 0 in tests)."""
        if kind == SUBMISSIONS:
            return [sock.getsockname()[:2] for sock in self._tls_sockets]
        pairs = zip(self.servers, self._server_kinds, strict=True)
        return [server.sockets[0].getsockname()[:2] for server, server_kind in pairs
                if server.sockets and server_kind == kind]

    async def reload_shards(self, shards: list[str]) -> None:
        """A new `queue.shards` (SIGHUP): new mail is routed over it from now on."""
        if self.shards is not None:
            await self.shards.set_shards(shards)

    def is_ready(self) -> bool:
        listening = bool(self.servers) or bool(self._tls_sockets)
        return (listening and not self.terminating and self.shards is not None
                and self.shards.all_reachable())

    async def run(self, stop: asyncio.Event) -> None:
        self.shards = ShardClient(self.config.queue.shards, self.config.smtp.inject_timeout,
                                  cluster_keys(self.config.bus))
        self.shards.start()
        assert isinstance(self.accounts.shards, ShardsLater)
        self.accounts.shards.bind(self.shards)
        smtp = self.config.smtp
        try:
            if not await self._wait_for_shards(stop):
                return
            for kind, addresses in ((SMTP, smtp.listen), (SUBMISSION, smtp.submission_listen)):
                for address in addresses:
                    await self._listen(self.listeners[kind], address)
            for address in smtp.submissions_listen:
                self._listen_implicit_tls(self.listeners[SUBMISSIONS], address)
            await stop.wait()
        finally:
            await self._shutdown()

    async def _wait_for_shards(self, stop: asyncio.Event) -> bool:
        """Listen only once every shard has answered a ping as ready (False: stopped while waiting).

        A listener that greets with 220 and can only answer 451 after inject_timeout wastes the client's time;
        one that greets with 421 still takes its share of the connections the kernel spreads over the
        processes sharing the port (SO_REUSEPORT). Not listening leaves those connections to the frontends
        whose shards answer, and a TCP health check sees this one is not serving."""
        assert self.shards is not None
        started = time.monotonic()
        warned = started
        while not self.shards.all_reachable():
            if stop.is_set():
                return False
            if time.monotonic() - warned >= SHARD_WAIT_WARNING:
                warned = time.monotonic()
                log.warning("frontend: not listening yet: waiting %.0fs so far for shards %s to answer",
                            warned - started, ", ".join(self.shards.unreachable()))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), SHARD_POLL)
        return not stop.is_set()

    def _session(self, listener: Listener, *, proxy_protocol: bool = False, client_ip: str | None = None,
                 counted_already: bool = False) -> InboundSession:
        return InboundSession(self, config=self.config.smtp, listener=listener, security=self.security,
                              proxy_protocol=proxy_protocol, client_ip=client_ip, counted_already=counted_already)

    async def _listen(self, listener: Listener, address: str) -> None:
        host, port = split_host_port(address)
        proxy_protocol = self.config.smtp.proxy_protocol
        server = await asyncio.get_running_loop().create_server(
            lambda: self._session(listener, proxy_protocol=proxy_protocol), host, port, reuse_port=True,
            backlog=_BACKLOG)
        self.servers.append(server)
        self._server_kinds.append(listener.kind)

    def _listen_implicit_tls(self, listener: Listener, address: str) -> None:
        host, port = split_host_port(address)
        family, kind, proto, _, sockaddr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                              flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind(sockaddr)
            sock.listen(_BACKLOG)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self._tls_sockets.append(sock)
        self._accept_loops.append(asyncio.create_task(self._accept_loop(listener, sock)))

    async def _accept_loop(self, listener: Listener, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                connection, _ = await loop.sock_accept(sock)
            except OSError as exc:  # e.g. EMFILE: keep serving the connections we have
                log.warning("accept on %s failed: %s", sock.getsockname(), exc)
                await asyncio.sleep(0.1)
                continue
            connection.setblocking(False)
            task = asyncio.create_task(self._accept_implicit_tls(listener, connection))
            self._handshakes.add(task)
            task.add_done_callback(self._handshakes.discard)

    async def _accept_implicit_tls(self, listener: Listener, connection: socket.socket) -> None:
        """RFC 8314 3.3: the PROXY header (if any) in plaintext, then TLS, then SMTP."""
        loop = asyncio.get_running_loop()
        metrics.connections(listener.kind).inc()
        try:
            client_ip = str(connection.getpeername()[0])
        except OSError:
            client_ip = "unknown"
        proxy_ip: str | None = None
        context = self.security.tls_context
        assert context is not None
        try:
            if self.config.smtp.proxy_protocol:
                async with asyncio.timeout(PROXY_HEADER_TIMEOUT):
                    proxy_ip = await _read_proxy_header_exactly(loop, connection)
            session_ip = proxy_ip or client_ip
            await loop.connect_accepted_socket(
                lambda: self._session(listener, client_ip=session_ip, counted_already=True), connection,
                ssl=context, ssl_handshake_timeout=float(self.config.smtp.command_timeout))
        except (ProxyHeaderError, TimeoutError, ConnectionError, OSError) as exc:
            failed_handshake = isinstance(exc, ssl.SSLError) or not isinstance(exc, ProxyHeaderError)
            if failed_handshake:
                metrics.TLS_HANDSHAKES.labels(result="failure").inc()
            else:
                metrics.CONNECTIONS_REFUSED.labels(reason="proxy_header").inc()
            log.info("connection from %s on %s refused before SMTP: %s", client_ip, listener.kind, exc)
            connection.close()
            return
        metrics.TLS_HANDSHAKES.labels(result="success").inc()

    async def _shutdown(self) -> None:
        self.terminating = True
        grace = float(self.config.smtp.shutdown_grace)
        if grace > 0 and (self.servers or self._tls_sockets):
            log.info("frontend stopping: not ready from now on; still listening and serving %d sessions for the "
                     "shutdown grace of %gs", len(self.sessions), grace)
            await asyncio.sleep(grace)
        self.stopping = True
        for server in self.servers:
            server.close()
        for task in self._accept_loops:
            task.cancel()
        await asyncio.gather(*self._accept_loops, return_exceptions=True)
        for sock in self._tls_sockets:
            sock.close()
        # Idle sessions are told 421 and closed; sessions in the middle of storing a message get the chance to
        # finish and answer 250 (or 451), so that no client is left wondering whether its mail was taken, and
        # then 421. The shard links close only after that.
        told = 0
        for session in list(self.sessions):
            told += not session.storing
            session.stop()
        handshakes = list(self._handshakes)
        for task in handshakes:
            task.cancel()
        if told:
            log.info("frontend stopping: %d sessions still open answered 421 4.3.2", told)
        sessions = list(self.sessions)
        if sessions or handshakes:
            waits = [asyncio.ensure_future(session.wait_closed()) for session in sessions]
            _, pending = await asyncio.wait([*waits, *handshakes], timeout=self.config.smtp.inject_timeout)
            for session in sessions:
                session.abort()
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        self.deadlines.close()
        if self.shards is not None:
            await self.shards.close()
        if self.accounts.spf is not None:
            self.accounts.spf.close()

    # --- SessionHost: what each InboundSession asks of its frontend ---

    def admit(self, session: InboundSession, client_ip: str) -> Reply | None:
        """Apply the connection limits to a session about to start SMTP: None (registered) or the refusal."""
        others = len(self.sessions) + len(self._handshakes) - session.counted_already
        refusal = None
        if self.stopping:
            refusal, reason = replies.SHUTTING_DOWN, "shutting_down"
        elif others >= self.config.smtp.max_connections:
            refusal, reason = replies.TOO_MANY_CONNECTIONS, "max_connections"
        elif self.per_client[client_ip] >= self.config.smtp.max_connections_per_client:
            refusal, reason = replies.TOO_MANY_FROM_YOU, "per_client_limit"
        if refusal is not None:
            metrics.CONNECTIONS_REFUSED.labels(reason=reason).inc()
            return refusal
        self.sessions[session] = None
        self.per_client[client_ip] += 1
        return None

    def release(self, session: InboundSession) -> None:
        self.sessions.pop(session, None)
        client_ip = session.client_ip
        self.per_client[client_ip] -= 1
        if self.per_client[client_ip] <= 0:
            del self.per_client[client_ip]

    def may_relay(self, client_ip: str) -> bool:
        return self.relay.client_may_relay(client_ip)


async def _read_proxy_header_exactly(loop: asyncio.AbstractEventLoop, connection: socket.socket) -> str | None:
    """Read a PROXY header from a plain socket without reading one byte past it (the TLS handshake follows).

    v1 is one line: read it byte by byte up to its CRLF (at most 107 bytes). v2 is 16 bytes whose last two give
    the length of the rest. Returns the client address (None for LOCAL / UNKNOWN); raises ProxyHeaderError.
    """
    async def exactly(count: int) -> bytes:
        data = b""
        while len(data) < count:
            chunk = await loop.sock_recv(connection, count - len(data))
            if not chunk:
                raise ProxyHeaderError("connection closed before the PROXY header ended")
            data += chunk
        return data

    data = await exactly(6)
    if data == V2_SIGNATURE[:6]:
        data += await exactly(10)
        data += await exactly(int.from_bytes(data[14:16], "big"))
    else:
        while not data.endswith(b"\r\n"):
            if len(data) > PROXY_HEADER_MAX:
                raise ProxyHeaderError("PROXY header too long")
            data += await exactly(1)
    header = parse_proxy_header(data)
    if header is None or header.consumed != len(data):
        raise ProxyHeaderError("malformed PROXY header")
    return header.client_ip
