"""TLS peers for MTA-STS tests: an HTTPS server for policy files and an SMTP server offering STARTTLS.

`PolicyServer(ca, policies)`: HTTPS on 127.0.0.1 (a free port) with one certificate from the test CA naming
`mta-sts.<domain>` for every domain of `policies`; GET /.well-known/mta-sts.txt answers the policy of the
domain in the Host header (text/plain), anything else 404. Runs in a thread; `requests` counts the GETs.
`StartTlsSmtp(host, port, context)`: aiosmtpd (a real SMTP server) offering STARTTLS with `context`;
`messages` holds (recipients, whether the session was encrypted) of what it accepted.
Both stop on `stop()` and work with `tests.support.harness.running`.
"""

from __future__ import annotations

import http.server
import ssl
import threading
from dataclasses import dataclass, field
from typing import Any

import trustme
from aiosmtpd.controller import Controller

from tests.support.tooling import free_port


class PolicyServer:
    def __init__(self, ca: trustme.CA, policies: dict[str, str]) -> None:
        self.policies = policies
        self.port = free_port()
        self.requests = 0
        self._context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert(*(f"mta-sts.{domain}" for domain in policies)).configure_cert(self._context)
        self._server: http.server.ThreadingHTTPServer | None = None

    def start(self) -> PolicyServer:
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                owner.requests += 1
                domain = self.headers.get("Host", "").split(":")[0].removeprefix("mta-sts.")
                policy = owner.policies.get(domain)
                if self.path != "/.well-known/mta-sts.txt" or policy is None:
                    self.send_error(404)
                    return
                body = policy.encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                return

        server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        server.socket = self._context.wrap_socket(server.socket, server_side=True)
        self._server = server
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


@dataclass
class StartTlsSmtp:
    host: str
    port: int
    context: ssl.SSLContext | None
    messages: list[tuple[list[str], bool]] = field(default_factory=list)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append((list(envelope.rcpt_tos), session.ssl is not None))
        return "250 2.0.0 Ok: queued"

    def start(self) -> StartTlsSmtp:
        self._controller = Controller(self, hostname=self.host, port=self.port, tls_context=self.context,
                                      server_hostname=f"{self.host}")
        self._controller.start()
        return self

    def stop(self) -> None:
        self._controller.stop()
