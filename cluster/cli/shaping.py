"""`mtacluster shaping status [--json]`: the traffic shaping in force on every shard, and why.

One row per destination a shard has seen, and per egress source seen for it (cluster/queue/shaping.py
`Shaper.status`; "source" "" = the destination as a whole, or mail without a pool): the entries that apply,
the learned MX host, connection limit and jobs in flight, rates, suspension or rate override with its end and
the reply that caused it. Failure modes: an unreachable shard is one line on stderr and exit code 1.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from typing import Any

from cluster.cli.common import add_config_option, add_option, load
from cluster.cli.queue import ask_shards

TIMEOUT = 10.0


def register(commands: Any) -> None:
    group = commands.add_parser("shaping", help="traffic shaping per destination")
    sub = group.add_subparsers(dest="shaping_command", required=True, metavar="COMMAND")
    status = sub.add_parser("status", help="what is in force per destination, and why")
    parsers = [group, status]
    add_config_option(parsers)
    add_option(parsers, "--json", action="store_true", default=False, help="print JSON instead of text")
    group.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    answers = ask_shards(load(args), "shaping_status", {}, TIMEOUT)
    for problem in answers.problems:
        print(f"mtacluster shaping status: {problem}", file=sys.stderr)
    for index, why in answers.refusals:
        print(f"mtacluster shaping status: shard {index} refused: {why}", file=sys.stderr)
    rows = [{"shard": data.get("shard"), **row} for _, data in answers.data if isinstance(data, dict)
            for row in data.get("destinations", []) if isinstance(row, dict)]
    if args.json:
        print(json.dumps(rows, indent=2, sort_keys=True))
    else:
        for row in rows:
            limits = [f"connections {row['in_flight']}/{row['connection_limit']}"]
            for key in ("max_message_rate", "max_connection_rate"):
                if row.get(key):
                    limits.append(f"{key.removeprefix('max_')} {row[key]}")
            state = ""
            for key, word in (("suspended_until", "suspended"), ("rate_override_until", "slowed")):
                if row.get(key):
                    until = datetime.datetime.fromtimestamp(row[key], datetime.UTC).strftime("%H:%M:%S")
                    state += f"  {word} until {until} UTC: {row.get('reason', '')}"
            source = f" from source {row['source']}" if row.get("source") else ""
            print(f"{row['destination']} [{row['bucket']}]{source} via {'+'.join(row['entries']) or 'defaults'}: "
                  f"{', '.join(limits)}{state}")
        print(f"{len(rows)} destination{'s' if len(rows) != 1 else ''}")
    return 1 if answers.problems or answers.refusals else 0
