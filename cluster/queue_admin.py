"""`mtacluster queue ...`: ask every shard, print one table (or JSON).

Sends one `AdminRequest` to every shard in `queue.shards` at once (cluster/bus/client.py) and waits up to
`--timeout` seconds for their `AdminReply`. Commands on one message (show, hold, release, delete, bounce) go to every
shard, and the shard that holds the id answers; the others answer "unknown queue id". An unreachable shard
is reported on stderr and makes the exit code 1, while the answers of the others are still printed.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import sys
from typing import Any

import zmq.asyncio

from cluster.bus.client import ask_all, links_to
from cluster.bus.schemas import AdminReply, AdminRequest
from cluster.bus.security import cluster_keys
from cluster.config import Config


def ask_shards(config: Config, op: str, args: dict[str, Any], timeout: float) -> list[tuple[int, AdminReply | str]]:
    """(shard index, reply or error text) for every shard, all asked at once."""
    return asyncio.run(_ask_shards(config, op, args, timeout))


async def _ask_shards(config: Config, op: str, args: dict[str, Any],
                      timeout: float) -> list[tuple[int, AdminReply | str]]:
    keys = cluster_keys(config.bus)
    context = zmq.asyncio.Context()
    links = links_to(list(config.queue.shards), keys, context=context)
    try:
        for link in links:
            link.start()
        replies = await ask_all(links, lambda req: AdminRequest(req=req, op=op, args=args), timeout)
    finally:
        for link in links:
            await link.close()
        context.term()
    answers: list[tuple[int, AdminReply | str]] = []
    for index, reply in enumerate(replies):
        if isinstance(reply, AdminReply):
            answers.append((index, reply))
        else:
            answers.append((index, f"shard {index} answered {reply}" if not isinstance(reply, Exception)
                            else str(reply)))
    return answers


def _when(timestamp: object) -> str:
    if not isinstance(timestamp, int | float) or timestamp <= 0:
        return "-"
    return datetime.datetime.fromtimestamp(timestamp, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S")


def _print_messages(messages: list[dict[str, Any]]) -> None:
    if not messages:
        print("queue is empty")
        return
    print(f"{'QUEUE ID':<24} {'SIZE':>8} {'ARRIVED (UTC)':<19}  SENDER")
    for message in messages:
        print(f"{message.get('queue_id', '?'):<24} {message.get('size', 0):>8} {_when(message.get('arrival')):<19}  "
              f"<{message.get('sender', '')}>")
        for rcpt in message.get("recipients", []):
            state = rcpt.get("state", "?")
            extra = ""
            if state == "deferred":
                extra = f" next={_when(rcpt.get('next_attempt'))}"
            last = rcpt.get("last_reply") or ""
            print(f"    {state:<9} {rcpt.get('address', '?')}  attempts={rcpt.get('attempts', 0)}{extra}"
                  f"{'  ' + last if last else ''}")
    print(f"-- {len(messages)} message(s)")


def run_queue_command(config: Config, args: argparse.Namespace) -> int:
    op = args.queue_command
    request: dict[str, Any] = {}
    if op == "list":
        request = {"domain": args.domain, "deferred_only": args.deferred}
    elif op == "flush":
        request = {"domain": args.domain}
    else:
        request = {"queue_id": args.queue_id}
    answers = ask_shards(config, op, {k: v for k, v in request.items() if v not in (None, False)}, args.timeout)
    failed = False
    results: list[Any] = []
    found_one = False
    for index, answer in answers:
        if isinstance(answer, str):
            print(f"mtacluster queue: {answer}", file=sys.stderr)
            failed = True
        elif answer.ok:
            found_one = True
            data = answer.data
            if isinstance(data, list):
                results.extend(data)
            elif data is not None:
                results.append({"shard": index, **data} if isinstance(data, dict) else data)
    if not found_one:
        # Nobody answered yes: every shard was unreachable (already said), or none holds the queue id.
        errors = {a.error for _, a in answers if isinstance(a, AdminReply) and a.error}
        if errors or not failed:
            print(f"mtacluster queue {op}: {'; '.join(sorted(errors)) or 'no shard accepted the request'}",
                  file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(results, indent=2, sort_keys=True, default=str))
    elif op in ("list", "show"):
        _print_messages([r for r in results if isinstance(r, dict)])
        for message in results:
            if op == "show" and isinstance(message, dict) and message.get("headers"):
                print(f"\n{str(message['headers']).rstrip()}")
    else:
        summary = ", ".join(json.dumps(r, sort_keys=True, default=str) for r in results)
        print(f"{op}: done{' (' + summary + ')' if summary else ''}")
    return 1 if failed else 0
