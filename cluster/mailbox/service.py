"""The mailbox role (`mtacluster serve mailbox --node N`): node N of `mailbox.nodes` owns its users' Maildirs
under `mailbox.maildir_root`, takes their mail over LMTP and serves it over POP3 and POP3S.

Runs `cluster.mailbox.lmtp.LmtpListener` on every `mailbox.lmtp_listen` address and
`cluster.mailbox.pop3.Pop3Server` on `mailbox.pop3_listen` / `pop3s_listen`; ready once all listen. The quota
of a mailbox is `mailbox.quota` or the user's own (`cluster.mailbox.quota`).
Graceful stop (SIGTERM, e.g. a pod being replaced): stop accepting; LMTP sessions storing a message get up to
`STOP_GRACE` seconds to fsync it and send their replies; the rest are closed with 421 (the worker retries, and
nothing half-written is ever acknowledged); POP3 sessions end without UPDATE unless QUIT's deletions are running.
Failure modes: a port in use or a bad certificate ends the role at start (one line, exit code 1); a users file
that cannot be read means the default quota applies (and logins fail, as in the POP3 listener).
"""

from __future__ import annotations

import asyncio
import logging

from cluster.config import Config, split_host_port
from cluster.mailbox import metrics
from cluster.mailbox.lmtp import LmtpListener
from cluster.mailbox.maildir import MaildirStore
from cluster.mailbox.pop3 import Pop3Server
from cluster.mailbox.quota import effective_quota
from cluster.tls import server_context
from cluster.users import UserDatabase, UsersFileError

log = logging.getLogger(__name__)

STOP_GRACE = 30.0


class MailboxServer:
    def __init__(self, config: Config, node: int = 0, users: UserDatabase | None = None) -> None:
        if not 0 <= node < len(config.mailbox.nodes):
            raise ValueError(f"--node {node}: mailbox.nodes has {len(config.mailbox.nodes)} entries")
        self.config = config
        self.node = node
        self.users = users or UserDatabase(config.auth.users_file)
        self.store = MaildirStore(config.mailbox.maildir_root, config.smtp.hostname)
        tls = server_context(config.mailbox.tls_cert_file, config.mailbox.tls_key_file, "mailbox")
        self.lmtp = LmtpListener(config, node, self.store, tls, self.quota_of)
        self.pop3 = Pop3Server(config, self.users, node)
        self.lmtp_servers: list[asyncio.Server] = []
        for outcome in metrics.LMTP_OUTCOMES:
            metrics.LMTP_DELIVERIES.labels(outcome=outcome)  # every series exists from the start, at 0

    def quota_of(self, mailbox: str) -> int:
        try:
            return effective_quota(int(self.config.mailbox.quota), self.users, mailbox)
        except UsersFileError as exc:
            log.warning("quota of mailbox=%s: users file unusable, using mailbox.quota: %s", mailbox, exc)
            return int(self.config.mailbox.quota)

    def is_ready(self) -> bool:
        return bool(self.lmtp_servers) and self.pop3.is_ready()

    @property
    def lmtp_addresses(self) -> list[tuple[str, int]]:
        return [server.sockets[0].getsockname()[:2] for server in self.lmtp_servers if server.sockets]

    async def run(self, stop: asyncio.Event) -> None:
        try:
            for address in self.config.mailbox.lmtp_listen:
                host, port = split_host_port(address)
                self.lmtp_servers.append(await asyncio.start_server(self.lmtp.accept, host, port,
                                                                    reuse_address=True))
            await self.pop3.start()
            await stop.wait()
        finally:
            await self._shutdown()

    async def _shutdown(self) -> None:
        for server in self.lmtp_servers:
            server.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + STOP_GRACE
        while self.lmtp.storing and loop.time() < deadline:
            await asyncio.sleep(0.05)
        for task in list(self.lmtp.sessions):
            task.cancel()
        if self.lmtp.sessions:
            await asyncio.wait(list(self.lmtp.sessions), timeout=5)
        await self.pop3.shutdown()
