"""The frontend role: SMTP listeners that hand every accepted message to the queue shards.

Listens on every `smtp.listen` address with SO_REUSEPORT, so several frontend processes on one host share a
port and the kernel spreads connections over them. Enforces the connection limits (`smtp.max_connections`
per process, `smtp.max_connections_per_client` per client address) before any SMTP is spoken: a client over
its limit gets 421 4.7.0 and the connection is closed. Stateless: nothing is kept once a session ends.
STARTTLS is offered when `smtp.tls_cert_file`/`tls_key_file` are set (the TLS context is built once, here);
AUTH PLAIN LOGIN is offered after STARTTLS when `auth.users_file` is set (see `cluster.frontend.session`).
Failure modes: an unusable certificate or key raises ConfigError at startup, naming the key.
Ready (for /readyz) when every shard answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import socket
from collections import Counter

from cluster.bus.security import cluster_keys
from cluster.config import Config, split_host_port
from cluster.frontend import auth, metrics
from cluster.frontend.injector import ShardClient
from cluster.frontend.outbound import Outbound
from cluster.frontend.policy import RelayPolicy
from cluster.frontend.session import Security, SmtpSession
from cluster.smtp.proxy import ProxyHeaderError, parse_proxy_header
from cluster.smtp.reply import Reply
from cluster.smtp.server import ServerSettings
from cluster.tls import server_context
from cluster.users import UserDatabase

log = logging.getLogger(__name__)

TOO_MANY_FROM_YOU = Reply.of(421, "4.7.0", "Too many connections from your address, try again later")
TOO_MANY_CONNECTIONS = Reply.of(421, "4.7.0", "Too many connections, try again later")
# A PROXY v2 header is 16 bytes plus at most 65535; balancers send far less. Refuse anything bigger.
PROXY_HEADER_MAX = 4096
PROXY_HEADER_TIMEOUT = 10.0


class Frontend:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.settings, self.security = self._security(config)
        self.policy = RelayPolicy(config.smtp.relay_networks, config.smtp.local_domains)
        self.shards: ShardClient | None = None
        self.servers: list[asyncio.Server] = []
        self.per_client: Counter[str] = Counter()
        self.sessions: dict[asyncio.Task[None], SmtpSession | None] = {}

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

    def is_ready(self) -> bool:
        return bool(self.servers) and self.shards is not None and self.shards.all_reachable()

    async def run(self, stop: asyncio.Event) -> None:
        self.shards = ShardClient(self.config.queue.shards, self.config.smtp.inject_timeout,
                                  cluster_keys(self.config.bus))
        self.shards.start()
        try:
            for address in self.config.smtp.listen:
                host, port = split_host_port(address)
                server = await asyncio.start_server(self._accept, host, port, reuse_port=True, backlog=1024,
                                                    limit=self.config.smtp.max_text_line * 4)
                self.servers.append(server)
            await stop.wait()
        finally:
            await self._shutdown()

    async def _shutdown(self) -> None:
        for server in self.servers:
            server.close()
        # Idle sessions are told 421 and closed; sessions in the middle of storing a message get the chance to
        # finish and answer 250 (or 451), so that no client is left wondering whether its mail was taken.
        for task, session in list(self.sessions.items()):
            if session is None or not session.storing:
                task.cancel()
        if self.sessions:
            _, pending = await asyncio.wait(list(self.sessions), timeout=self.config.smtp.inject_timeout)
            for task in pending:
                task.cancel()
        if self.shards is not None:
            await self.shards.close()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        client_ip = str(peer[0]) if peer else "unknown"
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        metrics.CONNECTIONS.inc()
        leftover = b""
        if self.config.smtp.proxy_protocol:
            try:
                client_ip, leftover = await self._read_proxy_header(reader, client_ip)
            except (ProxyHeaderError, TimeoutError, ConnectionError, OSError) as exc:
                log.info("connection from %s refused: bad PROXY protocol header: %s", client_ip, exc)
                metrics.CONNECTIONS_REFUSED.labels(reason="proxy_header").inc()
                writer.close()
                return
        refusal = None
        if len(self.sessions) >= self.config.smtp.max_connections:
            refusal, reason = TOO_MANY_CONNECTIONS, "max_connections"
        elif self.per_client[client_ip] >= self.config.smtp.max_connections_per_client:
            refusal, reason = TOO_MANY_FROM_YOU, "per_client_limit"
        if refusal is not None:
            metrics.CONNECTIONS_REFUSED.labels(reason=reason).inc()
            with contextlib.suppress(OSError):
                writer.write(refusal.to_bytes())
                await writer.drain()
            writer.close()
            return
        assert self.shards is not None
        task = asyncio.current_task()
        assert task is not None
        self.sessions[task] = None
        self.per_client[client_ip] += 1
        metrics.CONNECTIONS_CURRENT.inc()
        try:
            session = SmtpSession(reader, writer, config=self.config.smtp, settings=self.settings,
                                  policy=self.policy, shards=self.shards, client_ip=client_ip,
                                  initial_data=leftover, security=self.security)
            self.sessions[task] = session
            await session.run()
        except (ConnectionError, OSError) as exc:
            log.debug("session with %s ended: %s", client_ip, exc)
        finally:
            self.sessions.pop(task, None)
            self.per_client[client_ip] -= 1
            if self.per_client[client_ip] <= 0:
                del self.per_client[client_ip]
            metrics.CONNECTIONS_CURRENT.dec()
            writer.close()
            with contextlib.suppress(OSError, ConnectionError):
                await writer.wait_closed()

    @staticmethod
    async def _read_proxy_header(reader: asyncio.StreamReader, peer_ip: str) -> tuple[str, bytes]:
        """The real client address from the load balancer's PROXY header, and the SMTP bytes after it."""
        data = b""
        async with asyncio.timeout(PROXY_HEADER_TIMEOUT):
            while (header := parse_proxy_header(data)) is None:
                if len(data) > PROXY_HEADER_MAX:
                    raise ProxyHeaderError("PROXY header too long")
                chunk = await reader.read(PROXY_HEADER_MAX)
                if not chunk:
                    raise ProxyHeaderError("connection closed before the PROXY header ended")
                data += chunk
        # LOCAL / UNKNOWN (health checks): the balancer speaks for itself.
        return header.client_ip or peer_ip, data[header.consumed:]
