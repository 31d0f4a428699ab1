"""The SMTP client session and a delivery attempt against a scripted SMTP server (asyncio, real sockets) for the
cases smtp-sink cannot play: a 5xx for one recipient of three, SIZE, EHLO refused, greeting 4xx, a cached
connection closed by the server while idle, STARTTLS (opportunistic and verified), malformed replies."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import trustme

from cluster.bus.schemas import Deliver, Outcome
from cluster.config import Config, config_from_dict
from cluster.delivery.connections import ConnectionCache
from cluster.delivery.deliver import Deliverer
from cluster.delivery.mx import StaticMxResolver
from cluster.delivery.session import SessionSettings
from tests.support.tooling import free_port

pytestmark = pytest.mark.integration

BODY = b"Received: from test\r\nSubject: session\r\n\r\n.dotted\r\nhello \xc3\xa9\r\n"


@dataclass
class Script:
    """How the scripted server answers. Each field is the reply line(s) to send, without CRLF."""

    greeting: str = "220 scripted.test ESMTP"
    ehlo: list[str] = field(default_factory=lambda: ["250-scripted.test", "250-PIPELINING", "250-8BITMIME",
                                                     "250 SIZE 1000000"])
    helo: str = "250 scripted.test"
    mail: str = "250 2.1.0 ok"
    rcpt: Callable[[str], str] = lambda address: "250 2.1.5 ok"
    data: str = "354 go ahead"
    final: str = "250 2.0.0 queued"
    close_after_transaction: bool = False
    # Close the connection, without a word, on the MAIL of its second transaction: an idle connection the
    # server dropped just as we reused it (its FIN crossing our pipelined MAIL/RCPT/DATA on the wire).
    drop_on_reuse: bool = False
    tls: ssl.SSLContext | None = None
    # Say this (a 421, say) after the final reply, with the connection left open: a server talking out of turn
    # to a connection that sits idle in the client's cache.
    after_final: str = ""
    # Seconds to wait after 354 before reading the message (a slow reader: the client must wait for the socket
    # to drain); None: never read it (the client's write times out).
    read_body_after: float | None = 0.0
    # Never answer the end of the message (the client's wait for the final reply times out).
    silent_final: bool = False


class ScriptedServer:
    def __init__(self, script: Script, host: str = "127.0.0.1", port: int = 0) -> None:
        self.script = script
        self.host = host
        self.connections = 0
        self.messages: list[tuple[str, list[str], bytes]] = []
        self.commands: list[str] = []
        self._writers: list[asyncio.StreamWriter] = []
        self._handlers: list[asyncio.Task[Any]] = []
        self._server: asyncio.Server | None = None
        self._stopping = asyncio.Event()
        self.port = port

    async def start(self) -> ScriptedServer:
        self._server = await asyncio.start_server(self._handle, self.host, self.port, limit=64 * 1024 * 1024)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        assert self._server is not None
        self._stopping.set()
        self._server.close()
        for writer in self._writers:
            writer.close()
        await asyncio.wait_for(asyncio.gather(*self._handlers, return_exceptions=True), 5)
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.append(writer)
        task = asyncio.current_task()
        assert task is not None
        self._handlers.append(task)
        script = self.script
        sender, recipients = "", []
        transactions = 0

        def say(*lines: str) -> None:
            writer.write("".join(line + "\r\n" for line in lines).encode())

        try:
            say(script.greeting)
            while line := await reader.readline():
                command = line.decode().rstrip("\r\n")
                verb = command.split(" ", 1)[0].upper()
                self.commands.append(verb)
                if verb == "EHLO":
                    caps = list(script.ehlo)
                    if script.tls is not None and not writer.get_extra_info("sslcontext"):
                        caps = [c.replace("250 ", "250-") for c in caps] + ["250 STARTTLS"]
                    say(*caps)
                elif verb == "HELO":
                    say(script.helo)
                elif verb == "STARTTLS" and script.tls is not None:
                    say("220 2.0.0 ready")
                    await writer.drain()
                    await writer.start_tls(script.tls)
                elif verb == "MAIL":
                    transactions += 1
                    if script.drop_on_reuse and transactions == 2:
                        writer.close()
                        return
                    sender, recipients = command.split("<", 1)[1].split(">")[0], []
                    say(script.mail)
                elif verb == "RCPT" and not script.mail.startswith("250"):
                    say("503 5.5.1 need MAIL first")
                elif verb == "RCPT":
                    address = command.split("<", 1)[1].split(">")[0]
                    reply = script.rcpt(address)
                    if reply.startswith("2"):
                        recipients.append(address)
                    say(reply)
                elif verb == "DATA":
                    if not recipients:
                        say("554 5.5.1 no valid recipients")
                        continue
                    say(script.data)
                    if not script.data.startswith("354"):
                        continue
                    await writer.drain()
                    if script.read_body_after is None:
                        writer.transport.pause_reading()  # nothing more taken from the socket
                        await self._stopping.wait()
                        return
                    await asyncio.sleep(script.read_body_after)
                    first = await reader.readline()
                    body = first if first == b".\r\n" else first + await reader.readuntil(b"\r\n.\r\n")
                    self.messages.append((sender, recipients, body))
                    if script.silent_final:
                        continue
                    say(script.final, *([script.after_final] if script.after_final else []))
                    if script.close_after_transaction:
                        await writer.drain()
                        writer.close()
                        return
                elif verb == "RSET":
                    say("250 2.0.0 ok")
                elif verb == "QUIT":
                    say("221 2.0.0 bye")
                    await writer.drain()
                    writer.close()
                    return
                else:
                    say("502 5.5.2 not implemented")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            writer.close()


_deliverers: list[Deliverer] = []


def made(deliverer: Deliverer) -> Deliverer:
    _deliverers.append(deliverer)
    return deliverer


@pytest.fixture
async def servers() -> AsyncIterator[list[ScriptedServer]]:
    started: list[ScriptedServer] = []
    yield started
    while _deliverers:  # close the client side first: the servers then see their connections end
        _deliverers.pop().cache.close_all()
    for server in started:
        await server.stop()


async def serve(servers: list[ScriptedServer], script: Script, host: str = "127.0.0.1",
                port: int = 0) -> ScriptedServer:
    server = await ScriptedServer(script, host, port).start()
    servers.append(server)
    return server


def config_for(**delivery: Any) -> Config:
    return config_from_dict({"smtp": {"hostname": "client.test"}, "delivery": {"connect_timeout": 2, **delivery},
                             "metrics": {"listen": ""}}, environ={})


async def run(deliverer: Deliverer, *recipients: str, body: bytes = BODY) -> list[Outcome]:
    job = Deliver(job_id="j", queue_id="q", sender="s@origin.test", recipients=list(recipients),
                  domain=recipients[0].rpartition("@")[2], body=body, attempt=1)
    return await deliverer.deliver(job)


def smarthost(server: ScriptedServer, **delivery: Any) -> Deliverer:
    config = config_for(smarthost=f"{server.host}:{server.port}", **delivery)
    return made(Deliverer(config, StaticMxResolver({}), ConnectionCache(30, 100)))


async def test_one_of_three_recipients_refused_others_delivered(servers: list[ScriptedServer]) -> None:
    server = await serve(servers, Script(rcpt=lambda a: "550 5.1.1 no such user" if a.startswith("bad") else
                                         "250 2.1.5 ok"))
    deliverer = smarthost(server)
    outcomes = await run(deliverer, "a@d.test", "bad@d.test", "c@d.test")
    assert [(o.kind, o.code, o.enhanced) for o in outcomes] == [
        ("delivered", 250, "2.0.0"), ("failed", 550, "5.1.1"), ("delivered", 250, "2.0.0")]
    assert outcomes[1].text == "no such user"
    assert outcomes[1].remote == "127.0.0.1[127.0.0.1]"
    (sender, recipients, wire) = server.messages[0]
    assert (sender, recipients) == ("s@origin.test", ["a@d.test", "c@d.test"])
    assert wire == b"Received: from test\r\nSubject: session\r\n\r\n..dotted\r\nhello \xc3\xa9\r\n.\r\n"
    deliverer.cache.close_all()


async def test_each_recipient_keeps_its_own_outcome_when_replies_repeat(servers: list[ScriptedServer]) -> None:
    """Recipients sharing a reply share the making of its outcome, never each other's address or words."""
    server = await serve(servers, Script(rcpt=lambda a: "550 5.1.1 no such user" if a.startswith("bad") else
                                         "451 4.2.0 later" if a.startswith("later") else "250 2.1.5 ok"))
    recipients = ["a@d.test", "bad1@d.test", "later1@d.test", "b@d.test", "bad2@d.test", "later2@d.test", "c@d.test"]
    outcomes = await run(smarthost(server), *recipients)
    assert [o.recipient for o in outcomes] == recipients
    delivered = (250, outcomes[0].text)
    assert [(o.code, o.text) for o in outcomes] == [delivered, (550, "no such user"), (451, "later")] * 2 + [delivered]
    assert len({id(o) for o in outcomes}) == len(recipients)


async def test_recipients_of_one_domain_in_any_spelling_share_a_transaction(servers: list[ScriptedServer]) -> None:
    """Recipients are grouped by domain key (lower case, no final dot): each spelling's key is worked out once per
    job, and every spelling of one domain goes in the same transaction; outcomes keep the job's order."""
    server = await serve(servers, Script())
    recipients = ["a@D.Test", "b@d.test", "c@Other.test", "d@other.TEST", "e@d.test.", "f@D.TEST"]
    outcomes = await run(smarthost(server), *recipients)
    assert [(o.recipient, o.kind) for o in outcomes] == [(r, "delivered") for r in recipients]
    assert sorted(sorted(message[1]) for message in server.messages) == [
        ["a@D.Test", "b@d.test", "e@d.test.", "f@D.TEST"], ["c@Other.test", "d@other.TEST"]]


async def test_4xx_for_some_recipients_defers_only_those(servers: list[ScriptedServer]) -> None:
    server = await serve(servers, Script(rcpt=lambda a: "452 4.2.2 mailbox full" if a.startswith("full") else
                                         "250 ok"))
    outcomes = await run(smarthost(server), "full@d.test", "b@d.test")
    assert [(o.kind, o.code) for o in outcomes] == [("deferred", 452), ("delivered", 250)]


async def test_message_over_the_servers_size_fails_without_sending(servers: list[ScriptedServer]) -> None:
    server = await serve(servers, Script(ehlo=["250-scripted.test", "250 SIZE 100"]))
    outcomes = await run(smarthost(server), "a@d.test", body=b"x" * 200 + b"\r\n")
    assert [(o.kind, o.code, o.enhanced) for o in outcomes] == [("failed", 552, "5.3.4")]
    assert "MAIL" not in server.commands


async def test_mail_from_rejected_permanently_fails_every_recipient(servers: list[ScriptedServer]) -> None:
    server = await serve(servers, Script(mail="553 5.7.1 sender refused"))
    outcomes = await run(smarthost(server), "a@d.test", "b@d.test")
    assert [(o.kind, o.code, o.text) for o in outcomes] == [("failed", 553, "sender refused")] * 2


async def test_ehlo_refused_falls_back_to_helo(servers: list[ScriptedServer]) -> None:
    server = await serve(servers, Script(ehlo=["500 5.5.1 what?"]))
    outcomes = await run(smarthost(server), "a@d.test")
    assert outcomes[0].kind == "delivered"
    assert server.commands[:2] == ["EHLO", "HELO"]


async def test_4xx_data_reply_and_final_5xx(servers: list[ScriptedServer]) -> None:
    busy = await serve(servers, Script(data="451 4.3.0 try later"))
    assert [(o.kind, o.code) for o in await run(smarthost(busy), "a@d.test")] == [("deferred", 451)]
    refuses = await serve(servers, Script(final="554 5.6.0 content rejected"))
    outcome = (await run(smarthost(refuses), "a@d.test"))[0]
    assert (outcome.kind, outcome.code, outcome.text) == ("failed", 554, "content rejected")


async def test_backup_used_when_primary_greets_with_4xx_or_breaks_protocol(servers: list[ScriptedServer]) -> None:
    port = free_port("127.0.0.33")
    good = await serve(servers, Script(), host="127.0.0.33", port=port)
    busy = await serve(servers, Script(greeting="421 4.3.2 too busy"), host="127.0.0.31", port=port)
    garbage = await serve(servers, Script(ehlo=["this is not smtp"]), host="127.0.0.32", port=port)
    for primary in (busy, garbage):
        zone = {"d.test": {"MX": [(10, "primary.d.test"), (20, "backup.d.test")]},
                "primary.d.test": {"A": [primary.host]}, "backup.d.test": {"A": [good.host]}}
        deliverer = made(Deliverer(config_for(port=port), StaticMxResolver(zone), ConnectionCache(30, 100)))
        outcomes = await run(deliverer, "a@d.test")
        assert outcomes[0].kind == "delivered", outcomes
        assert outcomes[0].remote == f"backup.d.test[{good.host}]"
        assert primary.connections == 1
        deliverer.cache.close_all()


async def test_stale_cached_connection_is_replaced_once(servers: list[ScriptedServer]) -> None:
    server = await serve(servers, Script(close_after_transaction=True))
    deliverer = smarthost(server)
    assert (await run(deliverer, "a@d.test"))[0].kind == "delivered"
    # The server closed the connection after the transaction; the cache notices (or the reuse fails) and
    # a fresh connection carries the second message.
    assert (await run(deliverer, "b@d.test"))[0].kind == "delivered"
    assert server.connections == 2
    assert len(server.messages) == 2


async def test_messages_to_one_destination_share_one_connection(servers: list[ScriptedServer]) -> None:
    server = await serve(servers, Script())
    deliverer = smarthost(server)
    for number in range(20):
        assert (await run(deliverer, f"r{number}@d.test"))[0].kind == "delivered"
    assert (server.connections, deliverer.connections_opened) == (1, 1)
    assert [recipients for _, recipients, _ in server.messages] == [[f"r{n}@d.test"] for n in range(20)]
    # Each transaction after the first began with MAIL on the same connection (no new greeting or EHLO).
    assert server.commands.count("EHLO") == 1 and server.commands.count("MAIL") == 20


async def test_connection_dropped_as_it_is_reused_loses_and_doubles_nothing(servers: list[ScriptedServer]) -> None:
    server = await serve(servers, Script(drop_on_reuse=True))
    deliverer = smarthost(server)
    assert (await run(deliverer, "a@d.test"))[0].kind == "delivered"
    # The cached connection is taken (it looks alive), the server drops it at MAIL: one fresh connection
    # carries the message, and the recipient gets exactly one outcome, from that connection.
    outcomes = await run(deliverer, "b@d.test")
    assert [(o.recipient, o.kind, o.code) for o in outcomes] == [("b@d.test", "delivered", 250)]
    assert server.connections == 2 and deliverer.connections_opened == 2
    assert [recipients for _, recipients, _ in server.messages] == [["a@d.test"], ["b@d.test"]]


async def test_malformed_reply_defers_with_a_clear_text(servers: list[ScriptedServer]) -> None:
    server = await serve(servers, Script(mail="250-ok\r\n550 mixed codes"))
    (outcome,) = await run(smarthost(server), "a@d.test")
    assert outcome.kind == "deferred" and outcome.code == 451
    assert "protocol error" in outcome.text and "550" in outcome.text


def server_tls(ca: trustme.CA, name: str) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(name).configure_cert(context)
    return context


async def test_opportunistic_starttls_without_certificate_check(servers: list[ScriptedServer],
                                                                ca: trustme.CA) -> None:
    server = await serve(servers, Script(tls=server_tls(ca, "other-name.test")))
    deliverer = smarthost(server)
    (outcome,) = await run(deliverer, "a@d.test")
    assert outcome.kind == "delivered", outcome
    assert "STARTTLS" in server.commands and server.commands.count("EHLO") == 2
    deliverer.cache.close_all()


async def test_verified_tls_checks_the_certificate(servers: list[ScriptedServer],
                                                   ca: trustme.CA) -> None:
    server = await serve(servers, Script(tls=server_tls(ca, "127.0.0.1")))
    config = config_for(smarthost=f"127.0.0.1:{server.port}", tls="verify")
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    trusted = made(Deliverer(config, StaticMxResolver({}), ConnectionCache(30, 100),
                             settings=SessionSettings.from_config(config.delivery, "client.test", client_context)))
    assert (await run(trusted, "a@d.test"))[0].kind == "delivered"
    trusted.cache.close_all()
    # The system trust store does not know the test CA: the host is unusable and the mail deferred.
    untrusted = made(Deliverer(config, StaticMxResolver({}), ConnectionCache(30, 100)))
    (outcome,) = await run(untrusted, "a@d.test")
    assert (outcome.kind, outcome.enhanced) == ("deferred", "4.7.5"), outcome


async def test_verified_tls_refuses_a_server_without_starttls(servers: list[ScriptedServer]) -> None:
    server = await serve(servers, Script())
    (outcome,) = await run(smarthost(server, tls="verify"), "a@d.test")
    assert (outcome.kind, outcome.enhanced) == ("deferred", "4.7.10")
    assert "MAIL" not in server.commands


async def test_a_reply_that_never_comes_defers_after_its_timeout(servers: list[ScriptedServer]) -> None:
    server = await serve(servers, Script(silent_final=True))
    (outcome,) = await run(smarthost(server, data_done_timeout=0.3), "a@d.test")
    assert (outcome.kind, outcome.code) == ("deferred", 451)
    assert "timeout after 0.3s waiting for the reply to message" in outcome.text


async def test_a_reply_sent_to_an_idle_connection_retires_it(servers: list[ScriptedServer]) -> None:
    server = await serve(servers, Script(after_final="421 4.4.2 idle too long, closing soon"))
    deliverer = smarthost(server)
    assert (await run(deliverer, "a@d.test"))[0].kind == "delivered"
    # The 421 came while the connection sat in the cache: it is not reused, and a fresh one carries the next
    # message once (the stray reply is never taken as the answer to its MAIL).
    outcomes = await run(deliverer, "b@d.test")
    assert [(o.recipient, o.kind, o.code) for o in outcomes] == [("b@d.test", "delivered", 250)]
    assert server.connections == 2 and server.commands.count("MAIL") == 2


BIG = ["250-scripted.test", "250-PIPELINING", "250 SIZE 100000000"]


async def test_a_large_message_to_a_slow_reader_waits_for_the_socket(servers: list[ScriptedServer]) -> None:
    server = await serve(servers, Script(read_body_after=0.3, ehlo=BIG))
    body = b"".join(b"line %07d of a long message\r\n" % n for n in range(200_000))  # 6.6 MB
    (outcome,) = await run(smarthost(server), "a@d.test", body=body)
    assert outcome.kind == "delivered"
    assert server.messages[0][2] == body + b".\r\n"


async def test_a_message_nobody_reads_times_out_while_sending(servers: list[ScriptedServer]) -> None:
    server = await serve(servers, Script(read_body_after=None, ehlo=BIG))
    body = b"".join(b"line %07d of a long message\r\n" % n for n in range(1_000_000))  # 33 MB
    (outcome,) = await run(smarthost(server, data_block_timeout=0.3), "a@d.test", body=body)
    assert (outcome.kind, outcome.code) == ("deferred", 451)
    assert "timeout writing to" in outcome.text
