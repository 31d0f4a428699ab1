"""Run one role of the cluster (frontend, queue shard, worker, mailbox) in this process: what `mtacluster serve` does.

Sets up uvloop, turns SIGTERM/SIGINT into a graceful stop, SIGHUP into a reload of what the role can take
without a restart (frontends and workers: `queue.shards`, read again from the configuration file), and does the
same when the file's content changes (checked every CONFIG_POLL seconds: a stat, and a read only when the stat
changed; a Kubernetes ConfigMap update swaps the mounted file, so it is enough), starts the role's
/metrics /healthz /readyz HTTP listener, prints one startup line once the role is ready, and returns the process
exit code.
Failure modes: a configuration the role cannot use (port taken, spool unreadable) ends with a one-line error
on stderr and exit code 1, never a traceback.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable
from typing import Protocol

import uvloop

from cluster import logs
from cluster.config import Config, ConfigError, load_config

ROLES = ("frontend", "queue", "worker", "mailbox")
# How often (seconds) a role that takes a new `queue.shards` looks whether its configuration file changed.
CONFIG_POLL = 2.0
log = logging.getLogger("mtacluster")


class Service(Protocol):
    async def run(self, stop: asyncio.Event) -> None: ...

    def is_ready(self) -> bool: ...


def build_service(role: str, config: Config, shard: int, node: int = 0) -> tuple[Service, str]:
    """The role's service object and a short description of where it listens, for the startup line."""
    if role == "frontend":
        from cluster.frontend.server import Frontend

        smtp = config.smtp
        where = [f"{name}={','.join(addresses)}" for name, addresses in
                 (("smtp", smtp.listen), ("submission", smtp.submission_listen),
                  ("submissions", smtp.submissions_listen)) if addresses]
        return Frontend(config), " ".join(where)
    if role == "queue":
        from cluster.queue.shard import Shard

        if not 0 <= shard < len(config.queue.shards):
            raise ValueError(f"--shard {shard}: queue.shards has {len(config.queue.shards)} entries")
        return Shard(config, shard), f"shard={shard} endpoint={config.queue.shards[shard]}"
    if role == "worker":
        from cluster.delivery.worker import Worker

        return Worker(config), f"shards={len(config.queue.shards)}"
    if role == "mailbox":
        from cluster.mailbox.service import MailboxServer

        m = config.mailbox
        return MailboxServer(config, node), (f"node={node} lmtp={','.join(m.lmtp_listen)} "
                                             f"pop3={','.join(m.pop3_listen)} pop3s={','.join(m.pop3s_listen)}")
    raise ValueError(f"unknown role {role!r} (roles: {', '.join(ROLES)})")


async def _reload(service: object, path: str | None, why: str = "SIGHUP") -> None:
    """Read the configuration again and hand a role that can take it the new `queue.shards`."""
    reload_shards = getattr(service, "reload_shards", None)
    if reload_shards is None:
        log.info("%s: this role takes no configuration change without a restart", why)
        return
    try:
        config = load_config(path)
    except ConfigError as exc:
        log.error("%s: configuration not reloaded, keeping the old one: %s", why, exc)
        return
    await reload_shards(list(config.queue.shards))


def _file_stamp(path: str) -> tuple[int, int, int] | None:
    try:
        status = os.stat(path)
    except OSError:
        return None
    return status.st_mtime_ns, status.st_size, status.st_ino


async def _watch_config(service: object, path: str, interval: float = CONFIG_POLL) -> None:
    """Reload (as on SIGHUP) whenever the configuration file's content changes."""
    stamp = _file_stamp(path)
    content = _read(path)
    while True:
        await asyncio.sleep(interval)
        now = _file_stamp(path)
        if now is None or now == stamp:
            continue
        stamp = now
        new = _read(path)
        if new is None or new == content:
            continue
        content = new
        log.info("configuration file %s changed: reloading", path)
        await _reload(service, path, "configuration file changed")


def _read(path: str) -> bytes | None:
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError:
        return None


async def _serve(role: str, config: Config, shard: int, node: int, path: str | None = None) -> int:
    from cluster.observability import serve_http

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    for note in config.deprecations:
        log.warning("configuration: %s", note)
    service, where = build_service(role, config, shard, node)
    reloads: set[asyncio.Task[None]] = set()

    def on_hangup() -> None:
        task = asyncio.create_task(_reload(service, path))
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, on_hangup)
    watcher = None
    if path is not None and hasattr(service, "reload_shards"):
        watcher = asyncio.create_task(_watch_config(service, path))
    http = None
    metrics_where = "metrics=off"
    if config.metrics.listen:
        http = await serve_http(config.metrics.listen, role, service.is_ready)
        host, port = http.sockets[0].getsockname()[:2]
        metrics_where = f"metrics={host}:{port}"
    task = asyncio.create_task(service.run(stop))
    announced = asyncio.create_task(_announce_when_ready(service.is_ready, f"{role} pid={os.getpid()} {where} "
                                                         f"{metrics_where}"))
    try:
        await task
    finally:
        announced.cancel()
        if watcher is not None:
            watcher.cancel()
        if http is not None:
            http.close()
    return 0


async def _announce_when_ready(ready: Callable[[], bool], line: str) -> None:
    while not ready():
        await asyncio.sleep(0.05)
    print(f"mtacluster: ready role={line}", flush=True)


def serve(role: str, config: Config, shard: int = 0, node: int = 0, path: str | None = None) -> int:
    """Run one role until SIGTERM/SIGINT (SIGHUP: reload what the role can, from `path`); return the exit code."""
    logs.configure(role, config.log.format, config.log.level)
    try:
        return uvloop.run(_serve(role, config, shard, node, path))
    except (OSError, ValueError) as exc:
        print(f"mtacluster serve {role}: {exc}", file=sys.stderr)
        return 1
