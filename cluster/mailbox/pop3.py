"""The mailbox role's POP3 listeners: users fetch the mail of their Maildir (RFC 1939, RFC 2449, RFC 2595), on
`mailbox.pop3_listen` (STLS) and `mailbox.pop3s_listen` (implicit TLS from the first byte, RFC 8314).

Each connection runs the sans-I/O machine of `cluster.mailbox.pop3_protocol` and answers its decisions:
- credentials: `UserDatabase.verify` on the `auth.users_file` (scrypt, so in a thread);
- the maildrop: user "alice@example.org" or "alice" owns the Maildir of local part "alice"
  (`<mailbox.maildir_root>/alice/`, the part before the last "@", as LMTP delivery writes it). When another
  node of `mailbox.nodes` owns that Maildir (`cluster.mailbox.ownership`), the session is handed to it
  (`cluster.mailbox.proxy`: same credentials, STLS when it is off loopback) and bytes are copied both ways.
  Opening a local maildrop takes an exclusive, non-blocking `flock` on `<maildir>/.pop3.lock` (RFC 1939 8: one
  session per maildrop, across processes; a second session gets "-ERR [IN-USE]"), moves new/ messages into
  cur/ with the ":2," info suffix (Maildir convention), and lists cur/ in delivery order. UIDL is the file's
  base name (the part before ":"), or a digest of it when the name is not 1-70 printable characters (RFC 1939 7);
- RETR/TOP read the file; QUIT's UPDATE unlinks the messages marked deleted. The lock is released when the
  session ends, however it ends; a dropped connection removes nothing.
Plaintext USER/PASS is accepted only under TLS (after STLS, or on the POP3S port) or from a loopback client
(`plaintext_login_allowed`): on loopback the password never leaves the machine, which is what local
development with `mtacluster up` needs; anyone else must use TLS (`mailbox.tls_cert_file` / `tls_key_file`)
or gets "-ERR [AUTH] Encryption required".

Limits: `mailbox.max_connections` per process ("-ERR [SYS/TEMP]" and close), `mailbox.idle_timeout` per read,
`mailbox.max_auth_failures` and `mailbox.max_errors` per session. Passwords are never logged.
Failure modes: a client that vanishes, times out or sends garbage ends its own session only; an unreadable
users file or Maildir, or an unreachable owner node, gets "-ERR [SYS/TEMP]"; a bad certificate stops the role
at start with `ConfigError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import ipaddress
import logging
import os
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from cluster.config import Config, is_loopback_host, split_host_port
from cluster.mailbox import metrics
from cluster.mailbox.maildir import MailboxNameError, MaildirStore
from cluster.mailbox.ownership import login_localpart, node_for_localpart
from cluster.mailbox.pop3_protocol import (
    CredentialCheck,
    CredentialsReceived,
    MaildropRequested,
    MessageInfo,
    MessageRequested,
    NeedData,
    Paused,
    Pop3Connection,
    Pop3Settings,
    SessionEnded,
    StartTlsRequested,
    UpdateRequested,
)
from cluster.mailbox.proxy import BackendError, open_backend, splice
from cluster.tls import cluster_client_context, server_context, start_tls
from cluster.users import AuthOutcome, UserDatabase, UsersFileError

log = logging.getLogger(__name__)

READ_SIZE = 64 * 1024
LOCK_FILE = ".pop3.lock"
TOO_MANY_CONNECTIONS = b"-ERR [SYS/TEMP] Too many connections, try again later\r\n"
SHUTTING_DOWN = b"-ERR [SYS/TEMP] Server shutting down\r\n"
_UID_CHARACTERS = frozenset(range(0x21, 0x7F))


def plaintext_login_allowed(client_ip: str) -> bool:
    """USER/PASS without TLS only from loopback (127.0.0.0/8, ::1, and ::ffff:127.x.y.z)."""
    try:
        address = ipaddress.ip_address(client_ip.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def uid_for(file_name: str) -> str:
    """RFC 1939 7 UIDL: 1 to 70 characters 0x21-0x7E, fixed for the message's life. The Maildir base name."""
    base = file_name.split(":", 1)[0]
    if 1 <= len(base) <= 70 and all(ord(ch) in _UID_CHARACTERS for ch in base):
        return base
    return "sha1-" + hashlib.sha1(base.encode("utf-8", "surrogateescape")).hexdigest()


def message_size(path: Path) -> int:
    """Octets of the message as POP3 sends it (CRLF line ends): the file size plus one per bare LF."""
    data = path.read_bytes()
    bare_lf = data.count(b"\n") - data.count(b"\r\n")
    bare_cr = data.count(b"\r") - data.count(b"\r\n")
    size = len(data) + bare_lf + bare_cr
    if data and not data.endswith((b"\n", b"\r")):
        size += 2
    return size


class MaildropLocked(Exception):
    """Another session holds this maildrop's lock."""


@dataclass
class Maildrop:
    """An opened, locked Maildir: its messages in order, and the lock file held until `close()`."""

    directory: Path
    lock: IO[bytes]
    paths: dict[str, Path] = field(default_factory=dict)  # uid -> file in cur/
    infos: list[MessageInfo] = field(default_factory=list)

    @classmethod
    def open(cls, directory: Path) -> Maildrop:
        """Lock and list the Maildir (blocking: call it in a thread). Raises MaildropLocked or OSError."""
        for sub in ("tmp", "new", "cur"):
            (directory / sub).mkdir(parents=True, exist_ok=True)
        lock = open(directory / LOCK_FILE, "ab")  # noqa: SIM115 - held until close()
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise MaildropLocked(str(directory)) from None
        except OSError:
            lock.close()
            raise
        drop = cls(directory, lock)
        try:
            drop._scan()
        except OSError:
            drop.close()
            raise
        return drop

    def _scan(self) -> None:
        # Maildir: a reader moves what it has seen from new/ to cur/, adding the ":2," info (no flags yet).
        for entry in os.scandir(self.directory / "new"):
            if entry.name.startswith(".") or not entry.is_file():
                continue
            with contextlib.suppress(FileNotFoundError):
                os.rename(entry.path, self.directory / "cur" / f"{entry.name}:2,")
        found = []
        for entry in os.scandir(self.directory / "cur"):
            if entry.name.startswith(".") or not entry.is_file():
                continue
            found.append((entry.stat().st_mtime_ns, entry.name, Path(entry.path)))
        for _, name, path in sorted(found):
            uid = uid_for(name)
            if uid in self.paths:
                continue  # two files with one base name (a copy): show the first only
            try:
                size = message_size(path)
            except FileNotFoundError:
                continue
            self.paths[uid] = path
            self.infos.append(MessageInfo(uid, size))

    def read(self, uid: str) -> bytes | None:
        try:
            return self.paths[uid].read_bytes()
        except (OSError, KeyError):
            return None

    def remove(self, uids: tuple[str, ...]) -> int:
        """Unlink the messages; return how many could not be removed (already gone counts as removed)."""
        failed = 0
        for uid in uids:
            try:
                self.paths[uid].unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.warning("cannot remove %s: %s", self.paths[uid], exc.strerror)
                failed += 1
        if uids:
            directory = os.open(self.directory / "cur", os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)
        return failed

    def close(self) -> None:
        self.lock.close()  # closing the descriptor releases the flock


@dataclass(frozen=True)
class Backends:
    """Where the other mailbox nodes serve POP3, for proxied logins."""

    node: int  # this node's index in mailbox.nodes
    hosts: tuple[str, ...]  # every node's host, in node order
    port: int  # the POP3 port every node uses
    implicit_tls: bool  # the port is a POP3S port (no pop3_listen configured)
    tls: ssl.SSLContext  # client context for nodes off loopback

    @classmethod
    def from_config(cls, config: Config, node: int) -> Backends:
        m = config.mailbox
        implicit = not m.pop3_listen
        port = split_host_port((m.pop3s_listen if implicit else m.pop3_listen)[0])[1]
        hosts = tuple(split_host_port(n)[0] for n in m.nodes)
        return cls(node, hosts, port, implicit, cluster_client_context(m.node_ca_file))


class Pop3Session:
    """One connection: feeds the socket to the protocol machine and answers its decisions."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, config: Config,
                 users: UserDatabase, store: MaildirStore, tls: ssl.SSLContext | None, client_ip: str,
                 backends: Backends, implicit_tls: bool = False) -> None:
        self.reader = reader
        self.writer = writer
        self.config = config
        self.users = users
        self.store = store
        self.tls = tls
        self.client_ip = client_ip
        self.backends = backends
        settings = Pop3Settings(hostname=config.smtp.hostname, max_errors=config.mailbox.max_errors,
                                max_auth_failures=config.mailbox.max_auth_failures,
                                tls_available=tls is not None and not implicit_tls)
        self.conn = Pop3Connection(settings, plaintext_auth_allowed=plaintext_login_allowed(client_ip))
        self.conn.tls_active = implicit_tls
        self.maildrop: Maildrop | None = None
        # "local" or "proxied" once logged in (for mtacluster_pop3_sessions_total).
        self.served = "none"
        # The checked password, kept only between PASS and the maildrop decision (a proxied login reuses it).
        self._password: str | None = None
        # True while QUIT's deletions run: a graceful shutdown lets them finish.
        self.updating = False

    async def _flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.writer.write(data)
            await self.writer.drain()

    async def run(self) -> None:
        try:
            await self._run()
        finally:
            self._password = None
            if self.maildrop is not None:
                self.maildrop.close()
                self.maildrop = None

    async def _run(self) -> None:
        self.conn.start()
        timeout = float(self.config.mailbox.idle_timeout)
        while not self.conn.closed:
            event = self.conn.next_event()
            if event is NeedData:
                await self._flush()
                try:
                    data = await asyncio.wait_for(self.reader.read(READ_SIZE), timeout)
                except asyncio.CancelledError:
                    self.writer.write(SHUTTING_DOWN)
                    raise
                except TimeoutError:
                    self.conn.timed_out()
                    continue
                self.conn.receive_data(data)
            elif event is Paused:  # cannot happen: every decision is answered below before the next call
                raise RuntimeError("POP3 session paused with no pending decision")
            elif isinstance(event, CredentialsReceived):
                result = await self._check(event)
                if result is CredentialCheck.OK:
                    self._password = event.password
                self.conn.credentials_checked(result)
            elif isinstance(event, MaildropRequested):
                password, self._password = self._password, None
                if await self._open_maildrop(event.username, password or ""):
                    return  # proxied: the owner served the session
            elif isinstance(event, MessageRequested):
                assert self.maildrop is not None
                content = await asyncio.to_thread(self.maildrop.read, event.uid)
                self.conn.message_loaded(content)
                if content is not None and event.top_lines is None:
                    metrics.MESSAGES_RETRIEVED.inc()
                # Send each message before the next pipelined command runs: output stays bounded by one message.
                await self._flush()
            elif isinstance(event, UpdateRequested):
                await self._update(event.uids)
            elif isinstance(event, StartTlsRequested):
                await self._start_tls()
            elif isinstance(event, SessionEnded):
                log.debug("pop3 session with %s ended: %s", self.client_ip, event.reason)
                break
        await self._flush()

    async def _check(self, event: CredentialsReceived) -> CredentialCheck:
        try:
            outcome = await asyncio.to_thread(self.users.authenticate, event.username, event.password)
        except UsersFileError as exc:
            log.error("pop3 login of %r: users file unusable: %s", event.username, exc)
            metrics.LOGINS.labels(result="error").inc()
            return CredentialCheck.UNAVAILABLE
        if outcome is not AuthOutcome.OK:
            # A disabled account gets the same answer as a wrong password (no enumeration); the log says why.
            metrics.LOGINS.labels(result="failed").inc()
            log.info("pop3 login failed user=%r client=%s reason=%s", event.username, self.client_ip, outcome.value)
            return CredentialCheck.INVALID
        return CredentialCheck.OK

    async def _open_maildrop(self, username: str, password: str) -> bool:
        """Open the local maildrop, or hand the session to the owning node. True when the session was proxied."""
        try:
            localpart = login_localpart(username)
            owner = node_for_localpart(localpart, self.backends.hosts)
            if owner != self.backends.node:
                return await self._proxy(username, password, owner)
            directory = self.store.mailbox(localpart)
            self.maildrop = await asyncio.to_thread(Maildrop.open, directory)
        except MaildropLocked:
            metrics.LOGINS.labels(result="in_use").inc()
            log.info("pop3 login user=%r client=%s: maildrop in use", username, self.client_ip)
            self.conn.maildrop_unavailable(in_use=True)
            return False
        except (OSError, MailboxNameError) as exc:
            metrics.LOGINS.labels(result="error").inc()
            log.warning("pop3 login user=%r: cannot open maildrop: %s", username, exc)
            self.conn.maildrop_unavailable(in_use=False)
            return False
        metrics.LOGINS.labels(result="ok").inc()
        self.served = "local"
        log.info("pop3 login user=%r client=%s messages=%d", username, self.client_ip, len(self.maildrop.infos))
        self.conn.maildrop_opened(self.maildrop.infos)
        return False

    async def _proxy(self, username: str, password: str, owner: int) -> bool:
        b = self.backends
        host = b.hosts[owner]
        secure = not is_loopback_host(host)
        timeout = float(self.config.delivery.connect_timeout)
        try:
            backend = await open_backend(host, b.port, username, password, tls=b.tls if secure or b.implicit_tls
                                         else None, implicit_tls=b.implicit_tls, timeout=timeout)
        except BackendError as exc:
            metrics.LOGINS.labels(result="proxy_error").inc()
            log.warning("pop3 login user=%r client=%s: owner node %d unavailable: %s", username, self.client_ip,
                        owner, exc)
            self.conn.maildrop_unavailable(in_use=False)
            return False
        reader, writer, ok = backend
        leftover = self.conn.maildrop_proxied()
        metrics.LOGINS.labels(result="ok").inc()
        self.served = "proxied"
        log.info("pop3 login user=%r client=%s proxied to node %d (%s)", username, self.client_ip, owner, host)
        self.writer.write(self.conn.data_to_send() + ok)
        if leftover:
            writer.write(leftover)
        await splice((self.reader, self.writer), (reader, writer), float(self.config.mailbox.idle_timeout))
        return True

    async def _update(self, uids: tuple[str, ...]) -> None:
        assert self.maildrop is not None
        self.updating = True
        try:
            not_removed = await asyncio.shield(asyncio.to_thread(self.maildrop.remove, uids))
        except OSError as exc:
            log.warning("pop3 update of %s failed: %s", self.maildrop.directory, exc)
            not_removed = len(uids)
        finally:
            self.updating = False
        metrics.MESSAGES_DELETED.inc(len(uids) - not_removed)
        self.conn.update_done(not_removed)

    async def _start_tls(self) -> None:
        assert self.tls is not None
        # "+OK Begin TLS negotiation" goes out in plain text, then the handshake (RFC 2595 4, CVE-2011-0411).
        try:
            await start_tls(self.reader, self.writer, self.tls, self.conn.data_to_send(),
                            float(self.config.mailbox.idle_timeout))
        except OSError as exc:  # ssl.SSLError, ConnectionError and handshake timeouts are all OSErrors
            log.info("pop3 STLS handshake with %s failed: %s", self.client_ip, exc)
            raise ConnectionError("TLS handshake failed") from None
        self.conn.tls_established()


class Pop3Server:
    """POP3 and POP3S listeners: `run(stop)` serves until `stop` is set; ready once listening."""

    def __init__(self, config: Config, users: UserDatabase | None = None, node: int = 0) -> None:
        self.config = config
        self.users = users or UserDatabase(config.auth.users_file)
        self.store = MaildirStore(config.mailbox.maildir_root, config.smtp.hostname)
        self.tls = server_context(config.mailbox.tls_cert_file, config.mailbox.tls_key_file, "mailbox")
        self.backends = Backends.from_config(config, node)
        self.servers: list[asyncio.Server] = []
        self.sessions: dict[asyncio.Task[None], Pop3Session | None] = {}
        for result in metrics.LOGIN_RESULTS:
            metrics.LOGINS.labels(result=result)  # every series exists from the start, at 0

    def is_ready(self) -> bool:
        return bool(self.servers)

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """The bound (host, port) of every listener, POP3 first, then POP3S (useful with port 0)."""
        return [server.sockets[0].getsockname()[:2] for server in self.servers if server.sockets]

    async def start(self) -> None:
        for address in self.config.mailbox.pop3_listen:
            host, port = split_host_port(address)
            self.servers.append(await asyncio.start_server(
                lambda r, w: self._accept(r, w, implicit_tls=False), host, port, reuse_address=True,
                limit=READ_SIZE))
        for address in self.config.mailbox.pop3s_listen:
            host, port = split_host_port(address)
            # RFC 8314 3.3: TLS from the first byte; the handshake is bounded like any read.
            self.servers.append(await asyncio.start_server(
                lambda r, w: self._accept(r, w, implicit_tls=True), host, port, reuse_address=True,
                limit=READ_SIZE, ssl=self.tls, ssl_handshake_timeout=60))

    async def run(self, stop: asyncio.Event) -> None:
        try:
            await self.start()
            await stop.wait()
        finally:
            await self.shutdown()

    async def shutdown(self) -> None:
        for server in self.servers:
            server.close()
        for task, session in list(self.sessions.items()):
            if session is None or not session.updating:
                task.cancel()
        if self.sessions:
            await asyncio.wait(list(self.sessions), timeout=30)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *,
                      implicit_tls: bool) -> None:
        peer = writer.get_extra_info("peername")
        client_ip = str(peer[0]) if peer else "unknown"
        if len(self.sessions) >= self.config.mailbox.max_connections:
            with contextlib.suppress(OSError, ConnectionError):
                writer.write(TOO_MANY_CONNECTIONS)
                await writer.drain()
            writer.close()
            return
        task = asyncio.current_task()
        assert task is not None
        self.sessions[task] = None
        metrics.CONNECTIONS_CURRENT.inc()
        session: Pop3Session | None = None
        try:
            session = Pop3Session(reader, writer, config=self.config, users=self.users, store=self.store,
                                  tls=self.tls, client_ip=client_ip, backends=self.backends,
                                  implicit_tls=implicit_tls)
            self.sessions[task] = session
            await session.run()
        except (ConnectionError, OSError) as exc:
            log.debug("pop3 session with %s ended: %s", client_ip, exc)
        except asyncio.CancelledError:
            pass  # shutdown: the session said so and dropped its lock; nothing was deleted
        finally:
            self.sessions.pop(task, None)
            metrics.CONNECTIONS_CURRENT.dec()
            metrics.SESSIONS.labels(listener="pop3s" if implicit_tls else "pop3",
                                    served=session.served if session is not None else "none").inc()
            writer.close()
            with contextlib.suppress(OSError, ConnectionError):
                await asyncio.wait_for(writer.wait_closed(), 5)
