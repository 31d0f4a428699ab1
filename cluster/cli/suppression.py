"""`mtacluster suppression list [--json] | add ADDR | remove ADDR`: the shards' suppression lists.

Each shard keeps the list of the domains it owns (cluster/queue/suppression.py; the shard side is
cluster/queue/deliverability_admin.py). `list` asks every shard and prints every entry (address, category,
since, until, the reply that caused it); `add` and `remove` go to every shard and the owner of the address's
domain carries them out. Failure modes: an unreachable shard or a refusal (e.g. suppression.ttl = 0) is one
line on stderr and exit code 1; the other shards' answers are still printed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from typing import Any

from cluster.cli.common import CommandFailed, add_config_option, add_option, load
from cluster.cli.queue import ask_shards

TIMEOUT = 10.0


def register(commands: Any) -> None:
    group = commands.add_parser("suppression", help="the suppression list of hard-bounced recipients")
    sub = group.add_subparsers(dest="suppression_command", required=True, metavar="COMMAND")
    listing = sub.add_parser("list", help="every suppressed address, on every shard")
    add = sub.add_parser("add", help="suppress an address (for suppression.ttl)")
    add.add_argument("address")
    remove = sub.add_parser("remove", help="take an address off the list")
    remove.add_argument("address")
    parsers = [group, listing, add, remove]
    add_config_option(parsers)
    add_option(parsers, "--json", action="store_true", default=False, help="print JSON instead of text")
    group.set_defaults(func=run)


def _when(timestamp: float) -> str:
    return datetime.datetime.fromtimestamp(timestamp, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S")


def run(args: argparse.Namespace) -> int:
    op: str = args.suppression_command
    command = f"suppression {op}"
    config = load(args)
    request = {} if op == "list" else {"address": args.address}
    answers = ask_shards(config, f"suppression_{op}", request, TIMEOUT)
    for problem in answers.problems:
        print(f"mtacluster {command}: {problem}", file=sys.stderr)
    for index, why in answers.refusals:
        print(f"mtacluster {command}: shard {index} refused: {why}", file=sys.stderr)
    failed = bool(answers.problems or answers.refusals)
    if op == "list":
        entries = [entry for _, data in answers.data if isinstance(data, dict)
                   for entry in data.get("entries", []) if isinstance(entry, dict)]
        if args.json:
            print(json.dumps(entries, indent=2, sort_keys=True))
        else:
            for e in entries:
                print(f"{e['address']}  {e['category']}  since {_when(e['since'])}  until {_when(e['until'])}  "
                      f"{e['reply']}")
            print(f"{len(entries)} suppressed address{'es' if len(entries) != 1 else ''}")
        return 1 if failed else 0
    owners = [data for _, data in answers.data if isinstance(data, dict) and data.get("owner")]
    if not owners:
        if failed:
            return 1
        raise CommandFailed(command, "no shard owns this address's domain (check queue.shards)")
    data = owners[0]
    if args.json:
        print(json.dumps(data, indent=2, sort_keys=True))
    elif op == "add":
        print(f"{args.address}: suppressed on shard {data['shard']} until {_when(data['entry']['until'])}")
    else:
        print(f"{args.address}: {'removed from' if data['removed'] else 'was not on'} the suppression list "
              f"of shard {data['shard']}")
    return 1 if failed else 0
