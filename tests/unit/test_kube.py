"""The queue pods' preStop decision (cluster/kube.py, `shard drain N --if-scaled-in STATEFULSET`).

A real HTTPS server (certificate from trustme) stands for the Kubernetes API: it answers the StatefulSet with
its `spec.replicas` to the right bearer token only. The hook drains shard N only when the desired replicas no
longer include ordinal N; on a restart or rolling update (N still wanted) it exits 0 without asking the shard;
when the API cannot tell, it does not drain and says why (exit 1).
"""

from __future__ import annotations

import json
import ssl
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import trustme

from cluster import kube
from cluster.cli import main
from cluster.kube import KubeError, desired_replicas
from tests.support.tooling import free_port

PATH = "/apis/apps/v1/namespaces/mail/statefulsets/mta-queue"


class FakeApi:
    def __init__(self, directory: Path) -> None:
        self.replicas = 3
        ca = trustme.CA()
        self.account = directory / "serviceaccount"
        self.account.mkdir()
        (self.account / "token").write_text("secret-token\n")
        (self.account / "namespace").write_text("mail")
        ca.cert_pem.write_to_path(str(self.account / "ca.crt"))
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ca.issue_cert("127.0.0.1").configure_cert(context)
        api = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.headers.get("Authorization") != "Bearer secret-token":
                    self.send_response(401)
                    self.end_headers()
                    return
                if self.path != PATH:
                    self.send_response(404)
                    self.end_headers()
                    return
                body = json.dumps({"kind": "StatefulSet", "spec": {"replicas": api.replicas}}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                return None

        self.port = free_port()
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def api(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeApi]:
    fake = FakeApi(tmp_path)
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", str(fake.port))
    monkeypatch.setattr(kube, "SERVICE_ACCOUNT", fake.account)
    yield fake
    fake.stop()


def test_desired_replicas_from_the_api(api: FakeApi, tmp_path: Path) -> None:
    assert desired_replicas("mta-queue") == 3
    api.replicas = 1
    assert desired_replicas("mta-queue") == 1
    with pytest.raises(KubeError, match="404"):
        desired_replicas("other")
    (api.account / "token").write_text("wrong")
    with pytest.raises(KubeError, match="401"):
        desired_replicas("mta-queue")
    with pytest.raises(KubeError, match="service-account token"):
        desired_replicas("mta-queue", account=tmp_path / "nowhere")


def test_the_hook_drains_only_a_pod_being_scaled_away(api: FakeApi, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "c.toml"
    # Nothing listens on these: a drain that is attempted fails as unreachable.
    config.write_text(f'[queue]\nshards = ["tcp://127.0.0.1:{free_port()}", "tcp://127.0.0.1:{free_port()}", '
                      f'"tcp://127.0.0.1:{free_port()}"]\n')
    argv = ["shard", "drain", "2", "--wait", "--if-scaled-in", "mta-queue", "--config", str(config)]

    assert main(argv) == 0  # three replicas wanted: pod 2 stays (a restart), nothing asked of shard 2
    assert "not a scale-in, not draining" in capsys.readouterr().out

    api.replicas = 2  # scaled in: pod 2 goes, so it drains (and here fails: shard 2 does not answer)
    assert main(argv) == 1
    captured = capsys.readouterr()
    assert "draining shard 2" in captured.out and "unreachable" in captured.err

    (api.account / "token").write_text("wrong")
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "not draining: cannot tell whether shard 2 is being scaled away" in err and "Traceback" not in err
