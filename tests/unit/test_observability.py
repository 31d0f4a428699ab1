"""cluster/observability.py: domain labels and the /metrics /healthz /readyz endpoint over real sockets."""

from __future__ import annotations

import asyncio
import logging
import socket
import subprocess
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CONTENT_TYPE_LATEST

from cluster import observability
from cluster.observability import domain_label, serve_http
from cluster.version import VERSION
from tests.support.tooling import require_tool

# -- domain_label -------------------------------------------------------------------------------------------------

TOP = frozenset({"gmail.com", "example.org"})


@pytest.mark.parametrize(
    ("domain", "label"),
    [("gmail.com", "gmail.com"), ("GMail.COM", "gmail.com"), ("gmail.com.", "gmail.com"),
     ("example.net", "other"), ("", "other"), ("sub.gmail.com", "other")],
)
def test_domain_label(domain: str, label: str) -> None:
    assert domain_label(domain, TOP) == label


def test_domain_label_without_top_domains_is_always_other() -> None:
    assert domain_label("gmail.com", ()) == "other"


@given(st.text(max_size=80))
def test_domain_label_values_are_bounded(domain: str) -> None:
    assert domain_label(domain, TOP) in TOP | {"other"}


# -- the HTTP endpoint --------------------------------------------------------------------------------------------

@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes


class Readiness:
    """A ready() callable the test flips."""

    def __init__(self) -> None:
        self.ready = False

    def __call__(self) -> bool:
        return self.ready


@dataclass
class Endpoint:
    port: int
    readiness: Readiness


@pytest.fixture
async def endpoint() -> AsyncIterator[Endpoint]:
    readiness = Readiness()
    server = await serve_http("127.0.0.1:0", "frontend", readiness)
    try:
        yield Endpoint(server.sockets[0].getsockname()[1], readiness)
    finally:
        server.close()
        await server.wait_closed()


async def exchange(port: int, raw: bytes) -> Response:
    """Send `raw`, read until the server closes, parse the HTTP/1.1 response."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
        await writer.wait_closed()
    return parse_response(data)


def parse_response(data: bytes) -> Response:
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("ascii").split("\r\n")
    version, status, _reason = status_line.split(" ", 2)
    assert version == "HTTP/1.1"
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    assert int(headers["content-length"]) == len(body) or not body
    assert headers["connection"] == "close"
    return Response(int(status), headers, body)


def get(path: str, method: str = "GET") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: test\r\nUser-Agent: pytest\r\n\r\n".encode("ascii")


async def test_healthz_answers_ok(endpoint: Endpoint) -> None:
    response = await exchange(endpoint.port, get("/healthz"))
    assert (response.status, response.body) == (200, b"ok\n")


async def test_readyz_follows_the_ready_callable_and_the_gauge_mirrors_it(endpoint: Endpoint) -> None:
    gauge = observability.UP_READY.labels(role="frontend")
    assert (await exchange(endpoint.port, get("/readyz"))).status == 503
    assert gauge._value.get() == 0
    endpoint.readiness.ready = True
    response = await exchange(endpoint.port, get("/readyz"))
    assert (response.status, response.body) == (200, b"ready\n")
    assert gauge._value.get() == 1
    endpoint.readiness.ready = False
    assert (await exchange(endpoint.port, get("/readyz?verbose=1"))).status == 503
    assert gauge._value.get() == 0


async def test_metrics_serves_the_default_registry_with_common_metrics(endpoint: Endpoint) -> None:
    endpoint.readiness.ready = True
    response = await exchange(endpoint.port, get("/metrics"))
    assert response.status == 200
    assert response.headers["content-type"] == CONTENT_TYPE_LATEST
    text = response.body.decode("utf-8")
    assert f'mtacluster_build_info{{role="frontend",version="{VERSION}"}} 1.0' in text
    assert 'mtacluster_up_ready{role="frontend"} 1.0' in text
    assert "# HELP mtacluster_up_ready " in text
    assert "process_cpu_seconds_total" in text or "python_info" in text


async def test_metrics_output_passes_promtool_check_metrics(endpoint: Endpoint) -> None:
    promtool = require_tool("promtool")
    response = await exchange(endpoint.port, get("/metrics"))
    check = await asyncio.to_thread(subprocess.run, [promtool, "check", "metrics"], input=response.body,
                                    capture_output=True, timeout=30)
    assert check.returncode == 0, check.stdout.decode() + check.stderr.decode()


async def test_head_answers_headers_without_a_body(endpoint: Endpoint) -> None:
    response = await exchange(endpoint.port, get("/healthz", "HEAD"))
    assert (response.status, response.body, response.headers["content-length"]) == (200, b"", "3")


async def test_unknown_path_is_404(endpoint: Endpoint) -> None:
    assert (await exchange(endpoint.port, get("/"))).status == 404
    assert (await exchange(endpoint.port, get("/metrics/x"))).status == 404


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "OPTIONS", "TRACE"])
async def test_other_methods_are_405_with_allow(endpoint: Endpoint, method: str) -> None:
    response = await exchange(endpoint.port, get("/metrics", method))
    assert response.status == 405
    assert response.headers["allow"] == "GET, HEAD"


@pytest.mark.parametrize(
    ("raw", "status"),
    [(b"garbage\r\n\r\n", 400), (b"\x00\xff\xfe binary \x80\r\n\r\n", 400), (b"GET /metrics\r\n\r\n", 400),
     (b"GET  /metrics HTTP/1.1\r\n\r\n", 400), (b"GET /metrics HTTP/2.0\r\n\r\n", 505),
     (b"GET /metrics HTTP/1.1\r\n", 400)],
)
async def test_malformed_requests_get_a_clear_status(endpoint: Endpoint, raw: bytes, status: int) -> None:
    # The last case ends the stream before the blank line that closes the request head.
    if raw.endswith(b"HTTP/1.1\r\n"):
        reader, writer = await asyncio.open_connection("127.0.0.1", endpoint.port)
        writer.write(raw)
        writer.write_eof()
        response = parse_response(await asyncio.wait_for(reader.read(), 10))
        writer.close()
        await writer.wait_closed()
    else:
        response = await exchange(endpoint.port, raw)
    assert response.status == status


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=300).map(lambda head: head + b"\r\n\r\n"))
def test_any_request_head_gets_an_http_answer_and_the_server_keeps_serving(head: bytes) -> None:
    async def scenario() -> tuple[int, int]:
        server = await serve_http("127.0.0.1:0", "queue", lambda: True)
        port = server.sockets[0].getsockname()[1]
        try:
            first = await exchange(port, head)
            second = await exchange(port, get("/healthz"))
            return first.status, second.status
        finally:
            server.close()
            await server.wait_closed()

    status, health = asyncio.run(scenario())
    assert status in (200, 400, 404, 405, 505)
    assert health == 200


async def test_answer_survives_input_the_server_did_not_read(endpoint: Endpoint) -> None:
    # Bytes after the request head are drained before the close, so no TCP reset destroys the answer.
    response = await exchange(endpoint.port, get("/healthz") + b"x" * 100_000)
    assert (response.status, response.body) == (200, b"ok\n")


def test_loop_shutdown_with_a_connection_open_logs_no_error(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        server = await serve_http("127.0.0.1:0", "worker", lambda: True)
        port = server.sockets[0].getsockname()[1]
        _reader, idle = await asyncio.open_connection("127.0.0.1", port)
        idle.write(b"GET /metr")
        await idle.drain()
        # Connections are accepted in order: once a later one is answered, the idle one has its handler.
        assert (await exchange(port, get("/healthz"))).status == 200
        server.close()
        # Returning leaves the idle connection's handler waiting for the rest of its request: asyncio.run
        # cancels it. (The client side is dropped at the same moment, so the test leaks no socket.)
        idle.transport.abort()

    with caplog.at_level(logging.DEBUG, logger="asyncio"):
        asyncio.run(scenario())
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


async def test_oversized_request_head_is_431(endpoint: Endpoint) -> None:
    raw = b"GET /metrics HTTP/1.1\r\nX-Filler: " + b"a" * (observability.MAX_REQUEST_HEAD * 2) + b"\r\n\r\n"
    response = await exchange(endpoint.port, raw)
    assert response.status == 431


async def test_slow_client_gets_408(endpoint: Endpoint, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(observability, "READ_TIMEOUT", 0.2)
    response = await exchange(endpoint.port, b"GET /metrics HTTP/1.1\r\nHost:")
    assert response.status == 408


async def test_200_idle_connections_do_not_starve_the_liveness_probe(endpoint: Endpoint) -> None:
    """Issue 8, found 6: 64 idle connections made /healthz answer 503 (and a liveness probe restart the pod)."""
    idle = []
    try:
        for _ in range(200):
            idle.append(await asyncio.open_connection("127.0.0.1", endpoint.port))
        for _ in range(3):
            assert (await exchange(endpoint.port, get("/healthz"))).status == 200
        # The oldest idle connections were closed to make room; at most MAX_CONNECTIONS are kept.
        closed = 0
        for reader, _writer in idle:
            try:
                closed += await asyncio.wait_for(reader.read(), 5) == b""
            except ConnectionError:
                closed += 1
            if closed >= 200 - observability.MAX_CONNECTIONS + 1:
                break
        assert closed >= 200 - observability.MAX_CONNECTIONS + 1
    finally:
        for _reader, writer in idle:
            writer.close()


async def test_a_newcomer_gets_503_only_when_every_connection_is_busy(
        endpoint: Endpoint, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(observability, "MAX_CONNECTIONS", 1)
    blocked = asyncio.Event()

    def slow_ready() -> bool:
        blocked.set()
        return True

    server = await serve_http("127.0.0.1:0", "queue", slow_ready)
    port = server.sockets[0].getsockname()[1]
    try:
        # A connection busy being answered is never closed for a newcomer: fill the one slot with a client that
        # sent its request and does not read a large /metrics answer, then check the newcomer gets 503.
        monkeypatch.setattr(observability, "generate_latest", lambda: b"x" * 50_000_000)
        busy_reader, busy = await asyncio.open_connection("127.0.0.1", port)
        busy.write(get("/metrics"))
        await busy.drain()
        await asyncio.wait_for(blocked.wait(), 5)
        assert (await exchange(port, get("/healthz"))).status == 503
        busy.close()
        monkeypatch.setattr(observability, "generate_latest", lambda: b"")

        async def healthy() -> bool:
            return (await exchange(port, get("/healthz"))).status == 200

        await wait_until(healthy, "the busy connection to be released")
        del busy_reader
    finally:
        server.close()
        await server.wait_closed()


async def test_client_that_vanishes_leaves_the_server_serving(
        endpoint: Endpoint, caplog: pytest.LogCaptureFixture) -> None:
    with socket.create_connection(("127.0.0.1", endpoint.port)) as sock:
        sock.sendall(b"GET /metr")
        # RST on close: the server's read fails with a connection reset.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    with socket.create_connection(("127.0.0.1", endpoint.port)) as sock:
        sock.sendall(get("/metrics"))
        sock.shutdown(socket.SHUT_RDWR)
    with caplog.at_level(logging.ERROR):
        assert (await exchange(endpoint.port, get("/healthz"))).status == 200
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_ready_callable_that_raises_is_not_ready(caplog: pytest.LogCaptureFixture) -> None:
    def broken() -> bool:
        raise RuntimeError("boom")

    server = await serve_http("127.0.0.1:0", "worker", broken)
    try:
        with caplog.at_level(logging.ERROR, logger="cluster.observability"):
            response = await exchange(server.sockets[0].getsockname()[1], get("/readyz"))
        assert response.status == 503
        assert "readiness check of role worker raised" in caplog.text
    finally:
        server.close()
        await server.wait_closed()


async def test_address_in_use_raises_oserror(endpoint: Endpoint) -> None:
    with pytest.raises(OSError):
        server = await serve_http(f"127.0.0.1:{endpoint.port}", "queue", lambda: True)
        server.close()


async def test_malformed_listen_address_raises_valueerror() -> None:
    with pytest.raises(ValueError, match=r"metrics\.listen"):
        await serve_http("nonsense", "queue", lambda: True)


async def wait_until(condition: Callable[[], object], what: str, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = condition()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)
