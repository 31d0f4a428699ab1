"""`mtacluster shard drain N [--wait] | undrain N | status [--json]`: take a shard out of the ring and back in.

`drain N` asks shard N to stop taking new mail and hand its queue to the shards that now own each recipient's
domain (the shard side is cluster/queue/drain.py; ARCHITECTURE.md contract 7); with `--wait` it polls until the
shard says it is drained and holds nothing, and fails (exit 1) when `--timeout` passes first. `undrain N` puts
it back in the ring. `drain N --if-scaled-in STATEFULSET` (the queue pods' preStop hook in the Helm chart)
drains only when the StatefulSet's desired replicas no longer include ordinal N, read from the Kubernetes API
(cluster/kube.py): a scale-in; a pod stopped for any other reason (rolling update, eviction) must not take its
shard out of the ring, so then it exits 0 at once. When the API cannot tell, it does not drain (exit 1, the
reason on stderr: the pod's stop shows a FailedPreStopHook event; the mail stays on the volume).
`status` asks every shard for its state (serving, draining, drained), its progress (moved, remaining), its
queue and outbox sizes, and shows the share of the domain ring each shard owns now (1/S for each of the S
serving shards, 0 for the others).

Failure modes (exit 1, one line on stderr): an unreachable shard, a shard that refuses, a shard number out of
range, a drain that did not finish within --timeout. Never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

import zmq.asyncio

from cluster.bus.client import BusLink, NoAnswer
from cluster.bus.schemas import AdminReply, AdminRequest
from cluster.bus.security import cluster_keys
from cluster.cli.common import CommandFailed, add_config_option, add_option, load
from cluster.cli.queue import CONNECT_TIMEOUT, ask_shards
from cluster.config import Config
from cluster.kube import KubeError, desired_replicas

# Seconds `drain --wait` waits by default, and `status` / one request waits for answers.
DEFAULT_WAIT = 3600.0
REQUEST_TIMEOUT = 10.0
POLL_INTERVAL = 0.5


def register(commands: Any) -> None:
    group = commands.add_parser("shard", help="drain a queue shard, put it back, show the shards' states")
    shard_commands = group.add_subparsers(dest="shard_command", required=True, metavar="COMMAND")
    drain = shard_commands.add_parser("drain", help="stop new mail to shard N and hand its queue to the others")
    drain.add_argument("shard", type=int, metavar="N")
    drain.add_argument("--wait", action="store_true", help="return only when the shard is drained")
    drain.add_argument("--timeout", type=float, default=DEFAULT_WAIT, metavar="SECONDS",
                       help=f"with --wait: give up after this long (default {DEFAULT_WAIT:g})")
    drain.add_argument("--if-scaled-in", metavar="STATEFULSET",
                       help="only when this StatefulSet's desired replicas (Kubernetes API) exclude ordinal N")
    undrain = shard_commands.add_parser("undrain", help="let shard N take new mail again")
    undrain.add_argument("shard", type=int, metavar="N")
    status = shard_commands.add_parser("status", help="each shard's state, progress, queue size and ring share")
    parsers = [group, drain, undrain, status]
    add_config_option(parsers)
    add_option(parsers, "--json", action="store_true", default=False, help="print JSON instead of text")
    group.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    config = load(args)
    command = f"shard {args.shard_command}"
    if args.shard_command == "status":
        return _status(config, args.json)
    index = args.shard
    if not 0 <= index < len(config.queue.shards):
        raise CommandFailed(command, f"no shard {index}: queue.shards has {len(config.queue.shards)} entries")
    if args.shard_command == "drain" and args.if_scaled_in and not _scaled_in(args.if_scaled_in, index, command):
        return 0
    op = "drain" if args.shard_command == "drain" else "undrain"
    data = asyncio.run(_one(config, index, op, command))
    if args.shard_command == "drain" and args.wait:
        data = asyncio.run(_wait(config, index, command, args.timeout))
    _print_one(data, args.json)
    return 0


def _scaled_in(statefulset: str, index: int, command: str) -> bool:
    """True when `statefulset` should now have at most `index` replicas: pod ordinal `index` is going away."""
    try:
        replicas = desired_replicas(statefulset)
    except KubeError as exc:
        raise CommandFailed(command, f"not draining: cannot tell whether shard {index} is being scaled away: "
                            f"{exc}") from None
    if replicas > index:
        print(f"shard {index}: statefulset {statefulset} keeps {replicas} replicas: not a scale-in, not draining",
              flush=True)
        return False
    print(f"shard {index}: statefulset {statefulset} scaled to {replicas} replicas: draining shard {index}",
          flush=True)
    return True


def _link(config: Config, index: int, context: zmq.asyncio.Context) -> BusLink:
    """A link to shard `index` only (a socket made for every shard but closed for one keeps context.term()
    waiting)."""
    return BusLink(config.queue.shards[index], cluster_keys(config.bus), name=f"shard {index}", context=context)


async def _one(config: Config, index: int, op: str, command: str) -> dict[str, Any]:
    context = zmq.asyncio.Context()
    link = _link(config, index, context)
    try:
        link.start()
        return await _ask(link, op, command)
    finally:
        await link.close()
        context.term()


async def _ask(link: BusLink, op: str, command: str) -> dict[str, Any]:
    try:
        reply = await link.request(lambda req: AdminRequest(req=req, op=op), REQUEST_TIMEOUT,
                                   connect_timeout=CONNECT_TIMEOUT)
    except NoAnswer as missing:
        raise CommandFailed(command, str(missing)) from None
    if not isinstance(reply, AdminReply) or not reply.ok or not isinstance(reply.data, dict):
        why = reply.error if isinstance(reply, AdminReply) else getattr(reply, "text", reply.TYPE)
        raise CommandFailed(command, f"{link.name} refused: {why}")
    return reply.data


async def _wait(config: Config, index: int, command: str, timeout: float) -> dict[str, Any]:
    context = zmq.asyncio.Context()
    link = _link(config, index, context)
    deadline = time.monotonic() + timeout
    try:
        link.start()
        while True:
            try:
                data = await _ask(link, "drain_status", command)
            except CommandFailed:
                if time.monotonic() >= deadline:
                    raise
                data = {}
            if data.get("state") == "drained" and not data.get("remaining"):
                return data
            if time.monotonic() >= deadline:
                raise CommandFailed(command, f"shard {index} is not drained after {timeout:g}s: "
                                    f"{data.get('remaining', '?')} messages still to hand over")
            await asyncio.sleep(POLL_INTERVAL)
    finally:
        await link.close()
        context.term()


def _print_one(data: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(data, indent=2, sort_keys=True))
    else:
        print(f"shard {data.get('shard')}: {data.get('state')} (moved {data.get('moved', 0)}, "
              f"remaining {data.get('remaining', 0)})")


def _status(config: Config, as_json: bool) -> int:
    answers = ask_shards(config, "drain_status", {}, REQUEST_TIMEOUT)
    found = {index: data for index, data in answers.data if isinstance(data, dict)}
    # A shard that did not answer is taken as serving for the ring share: frontends route to it the same way.
    serving = [i for i in range(len(config.queue.shards)) if found.get(i, {}).get("state", "serving") == "serving"]
    rows = []
    for index in range(len(config.queue.shards)):
        data = found.get(index)
        share = 1 / len(serving) if index in serving and serving else 0.0
        if data is None:
            rows.append({"shard": index, "state": "unreachable", "ring_share": share})
        else:
            rows.append({**data, "shard": index, "ring_share": share})
    if as_json:
        print(json.dumps(rows, indent=2, sort_keys=True))
    else:
        print(f"{'SHARD':<6} {'STATE':<12} {'QUEUED':>8} {'OUTBOX':>8} {'MOVED':>8} {'REMAINING':>10} {'RING':>7}")
        for row in rows:
            print(f"{row['shard']:<6} {row['state']:<12} {row.get('queued', '-'):>8} {row.get('outbox', '-'):>8} "
                  f"{row.get('moved', '-'):>8} {row.get('remaining', '-'):>10} {row['ring_share']:>7.1%}")
    problems = answers.problems + [f"shard {i} refused: {why}" for i, why in answers.refusals]
    if problems:
        raise CommandFailed("shard status", "; ".join(problems))
    return 0
