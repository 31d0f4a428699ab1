"""`mtacluster queue list|show|flush|hold|release|delete|bounce`: the admin client of the queue shards.

Sends one `AdminRequest` to every shard in `queue.shards` at once (cluster/bus/client.py; the shard side and
its reply data are cluster/queue/admin.py) and prints what they answered: a table and a sentence, or `--json`.
Commands on one message go to every shard; the shard holding the queue id answers, the others say "unknown
queue id". `list` asks each shard for at most `--limit` messages, shows the oldest `--limit` of them all, and
always says how many are queued in total.

Failure modes (exit code 1, one line each on stderr, the other shards' answers still printed): a shard that is
not connected within `CONNECT_TIMEOUT` is unreachable; a shard that got the request but did not answer within
`--timeout` may still be carrying it out (said so, with how to check, so nobody repeats a flush blindly); a
shard that refused (spool error, bad argument) is named with its reason, and its refusal fails the command even
when other shards did their part. "Unknown queue id" from the shards that do not hold a message is not a
failure when one shard does.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import sys
from dataclasses import dataclass, field
from typing import Any

import zmq.asyncio

from cluster.bus.client import NoAnswer, ask_all, links_to
from cluster.bus.schemas import AdminReply, AdminRequest, BusMessage
from cluster.bus.security import cluster_keys
from cluster.cli.common import CommandFailed, add_config_option, add_option, load
from cluster.config import Config

# Seconds a shard gets to be connected before it is reported unreachable (the answer may take --timeout).
CONNECT_TIMEOUT = 3.0
# Seconds to wait for the answers: flush and bounce of a large queue take a while.
DEFAULT_TIMEOUT = 60.0
# Messages `queue list` shows unless --limit says otherwise.
DEFAULT_LIMIT = 1000
# Operations that change the queue: an unanswered one may still be running on the shard.
CHANGES = ("flush", "hold", "release", "delete", "bounce")


def register(commands: Any) -> None:
    group = commands.add_parser("queue", help="inspect and steer the queue on every shard")
    queue_commands = group.add_subparsers(dest="queue_command", required=True, metavar="COMMAND")
    listing = queue_commands.add_parser("list", help="list queued messages, oldest first")
    listing.add_argument("--domain", help="only messages with pending recipients in this domain")
    listing.add_argument("--deferred", action="store_true",
                         help="only messages with deferred recipients (or held off: their destination waits "
                         "after repeated connection failures)")
    listing.add_argument("--limit", type=_positive, default=DEFAULT_LIMIT, metavar="N",
                         help=f"show at most N messages (default {DEFAULT_LIMIT}); the total is always given")
    flush = queue_commands.add_parser("flush", help="retry deferred mail now")
    flush.add_argument("--domain", help="only this destination domain")
    leaves = [listing, flush]
    for name, text in (("show", "show one message, its recipients and headers"),
                       ("hold", "hold a message (no delivery until release)"),
                       ("release", "release a held message"),
                       ("delete", "delete a message without a bounce"),
                       ("bounce", "fail a message's pending recipients and bounce it to the sender")):
        one = queue_commands.add_parser(name, help=text)
        one.add_argument("queue_id")
        leaves.append(one)
    parsers = [group, *leaves]
    add_config_option(parsers)
    add_option(parsers, "--json", action="store_true", default=False, help="print JSON instead of text")
    add_option(parsers, "--timeout", type=_positive_float, default=DEFAULT_TIMEOUT, metavar="SECONDS",
               help=f"how long to wait for the shards' answers (default {DEFAULT_TIMEOUT:g})")
    group.set_defaults(func=run)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, not {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, not {text!r}")
    return value


# -- asking the shards ---------------------------------------------------------------------------------------


@dataclass
class Answers:
    """What the shards said: their successful data, their refusals, and the problems reaching them."""

    data: list[tuple[int, Any]] = field(default_factory=list)
    refusals: list[tuple[int, str]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    # Shards that do not hold the queue id asked about (normal for all but one of them).
    not_found: list[tuple[int, str]] = field(default_factory=list)


def ask_shards(config: Config, op: str, args: dict[str, Any], timeout: float) -> Answers:
    """Send one AdminRequest(op, args) to every shard at once and sort out the answers."""
    replies = asyncio.run(_ask(config, op, args, timeout))
    answers = Answers()
    for index, reply in enumerate(replies):
        if isinstance(reply, AdminReply) and reply.ok:
            answers.data.append((index, reply.data))
        elif isinstance(reply, AdminReply) and isinstance(reply.data, dict) and reply.data.get("not_found"):
            answers.not_found.append((index, reply.error))
        elif isinstance(reply, AdminReply):
            answers.refusals.append((index, reply.error or "refused without a reason"))
        elif isinstance(reply, NoAnswer):
            still_running = reply.sent and op in CHANGES
            answers.problems.append(f"{reply}" + (
                f"; the {op} may still be going on there: check with `mtacluster queue list` before repeating it"
                if still_running else ""))
        else:
            answers.problems.append(f"shard {index} answered with {reply.TYPE}: {getattr(reply, 'text', reply)}")
    return answers


async def _ask(config: Config, op: str, args: dict[str, Any], timeout: float) -> list[BusMessage | NoAnswer]:
    keys = cluster_keys(config.bus)
    context = zmq.asyncio.Context()
    links = links_to(list(config.queue.shards), keys, context=context)
    try:
        for link in links:
            link.start()
        return await ask_all(links, lambda req: AdminRequest(req=req, op=op, args=args), timeout,
                             connect_timeout=CONNECT_TIMEOUT)
    finally:
        for link in links:
            await link.close()
        context.term()


# -- the commands --------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    op: str = args.queue_command
    command = f"queue {op}"
    config = load(args)
    if op == "list":
        request: dict[str, Any] = {"domain": args.domain, "deferred_only": args.deferred, "limit": args.limit}
    elif op == "flush":
        request = {"domain": args.domain}
    else:
        request = {"queue_id": args.queue_id}
    answers = ask_shards(config, op, {k: v for k, v in request.items() if v not in (None, False)}, args.timeout)
    for problem in answers.problems:
        _warn(command, problem)
    if op == "list":
        for index, why in answers.refusals:
            _warn(command, f"shard {index} refused: {why}")
        _list(answers, args.limit, args.json, filtered=bool(args.domain or args.deferred))
        return 1 if answers.problems or answers.refusals else 0
    if not answers.data:
        return _nobody_did_it(command, answers)
    # A shard that holds the message (or, for flush, any shard) but could not change it: the change failed there
    # (e.g. its spool could not be written), whatever the others did.
    for index, why in answers.refusals:
        _warn(command, f"shard {index} failed: {why}")
    if op == "show":
        _show(answers, args.json)
    else:
        _changed(op, answers, args.json)
    return 1 if answers.problems or answers.refusals else 0


def _warn(command: str, text: str) -> None:
    print(f"mtacluster {command}: {text}", file=sys.stderr)


def _nobody_did_it(command: str, answers: Answers) -> int:
    reasons = "; ".join(sorted({why for _, why in answers.refusals or answers.not_found}))
    if reasons and answers.problems:
        raise CommandFailed(command, f"{reasons} (on the shards that answered)")
    if reasons:
        raise CommandFailed(command, reasons)
    if not answers.problems:
        raise CommandFailed(command, "no shard is configured")
    return 1  # every shard unreachable: already said


def _list(answers: Answers, limit: int, as_json: bool, filtered: bool = False) -> None:
    messages: list[dict[str, Any]] = []
    total = 0
    exact = True
    for index, data in answers.data:
        if isinstance(data, dict):  # {"messages": [...], "total": n}
            part = [{**m, "shard": index} for m in data.get("messages", []) if isinstance(m, dict)]
            count = data.get("total")
            total += count if isinstance(count, int) else len(part)
        else:  # a shard that sends the plain list: it may have stopped at the limit
            part = [{**m, "shard": index} for m in data if isinstance(m, dict)] if isinstance(data, list) else []
            total += len(part)
            exact = exact and len(part) < limit
        messages.extend(part)
    messages.sort(key=lambda m: (m.get("arrival") or 0, str(m.get("queue_id", ""))))
    shown = messages[:limit]
    total = max(total, len(messages))
    shards = f" on {_count(len(answers.data), 'shard')}"
    more = _more(len(shown), total, exact, shards)
    if as_json:
        print(json.dumps(shown, indent=2, sort_keys=True, default=str))
        if more:
            _warn("queue list", more)
        return
    if not answers.data:
        return  # nothing answered: the problems were said, and an unreachable queue is not an empty one
    if not shown:
        print("no message matches" if filtered else "queue is empty")
        return
    _print_messages(shown)
    print(f"-- {more}" if more else f"-- {_count(total, 'message')}{shards}")


def _more(shown: int, total: int, exact: bool, shards: str) -> str:
    """What to say when not every matching message is shown ("" when all are)."""
    if exact and shown >= total:
        return ""
    if exact:
        return f"showing the oldest {shown:,} of {total:,} messages{shards}; use --limit N to see more"
    # A shard that answers with a plain list stops at the limit without saying how many it has.
    return f"showing the oldest {shown:,} messages{shards}; there may be more: use --limit N to see more"


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def _when(timestamp: object) -> str:
    if not isinstance(timestamp, int | float) or timestamp <= 0:
        return "-"
    return datetime.datetime.fromtimestamp(timestamp, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S")


def _last_outcome(last: object) -> str:
    """A recipient's typed last outcome as one line: 'failed: 550 5.1.1 no such user (mx[192.0.2.1])'."""
    if not isinstance(last, dict):
        return ""
    reply = " ".join(str(part) for part in (last.get("code") or "", last.get("enhanced"), last.get("text")) if part)
    remote = f" ({last['remote']})" if last.get("remote") else ""
    return f"{last.get('kind', '?')}: {reply}{remote}"


def _print_messages(messages: list[dict[str, Any]]) -> None:
    print(f"{'QUEUE ID':<24} {'SIZE':>8} {'ARRIVED (UTC)':<19}  SENDER")
    for message in messages:
        print(f"{message.get('queue_id', '?'):<24} {message.get('size', 0):>8} {_when(message.get('arrival')):<19}  "
              f"<{message.get('sender', '')}>")
        for rcpt in message.get("recipients", []):
            state = rcpt.get("state", "?")
            extra = f" next={_when(rcpt.get('next_attempt'))}" if state == "deferred" else ""
            if state == "ready" and rcpt.get("held_off_until"):
                # the destination is held off as a whole after repeated connection failures
                state, extra = "held_off", f" until={_when(rcpt.get('held_off_until'))}"
            last = _last_outcome(rcpt.get("last"))
            print(f"    {state:<9} {rcpt.get('address', '?')}  attempts={rcpt.get('attempts', 0)}{extra}"
                  f"{'  ' + last if last else ''}")


def _show(answers: Answers, as_json: bool) -> None:
    found = [data for _, data in answers.data if isinstance(data, dict)]
    if as_json:
        print(json.dumps(found, indent=2, sort_keys=True, default=str))
        return
    for message in found:
        _print_messages([message])
        client = message.get("client")
        if isinstance(client, dict) and client:
            print("\nReceived from: " + ", ".join(f"{k}={v}" for k, v in sorted(client.items())))
        if message.get("headers"):
            print(f"\n{str(message['headers']).rstrip()}")


# Sentence per operation: (count key in the shard's answer, what happened to that many recipients).
_DONE = {
    "flush": ("flushed", "deferred recipient{s} will be retried now"),
    "hold": ("held", "recipient{s} held: no delivery until `mtacluster queue release`"),
    "release": ("released", "recipient{s} released for delivery"),
    "delete": ("deleted", "pending recipient{s} deleted, without a bounce"),
    "bounce": ("bounced", "pending recipient{s} failed; a bounce goes to the sender"),
}


def _changed(op: str, answers: Answers, as_json: bool) -> None:
    if as_json:
        print(json.dumps([{"shard": index, **data} if isinstance(data, dict) else data
                          for index, data in answers.data], indent=2, sort_keys=True, default=str))
        return
    key, sentence = _DONE[op]
    count = sum(data.get(key, 0) for _, data in answers.data
                if isinstance(data, dict) and isinstance(data.get(key, 0), int))
    ids = sorted({str(data["queue_id"]) for _, data in answers.data if isinstance(data, dict) and "queue_id" in data})
    subject = f"message {', '.join(ids)}: " if ids else ""
    print(f"{subject}{count:,} {sentence.format(s='' if count == 1 else 's')}")
