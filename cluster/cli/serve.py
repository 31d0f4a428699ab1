"""`mtacluster serve ROLE [--config FILE] [--shard N] [--node N]`: run one role in this process (what a pod runs).

`serve pop3`, the old name of the mailbox role, still works: it says so on stderr and runs `serve mailbox`.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from cluster.cli.common import add_config_option, load
from cluster.roles import ROLES


def register(commands: Any) -> None:
    serve = commands.add_parser("serve", help="run one role", description="Run one role of the cluster in this "
                                "process, with its /metrics, /healthz and /readyz listener.")
    serve.add_argument("role", choices=[*ROLES, "pop3"])
    add_config_option([serve])
    serve.add_argument("--shard", type=int, default=0, metavar="N", help="shard number, for the queue role")
    serve.add_argument("--node", type=int, default=0, metavar="N",
                       help="node number in mailbox.nodes, for the mailbox role")
    serve.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cluster.roles import serve

    role = args.role
    if role == "pop3":
        print("mtacluster serve: the pop3 role is now the mailbox role (LMTP, POP3, POP3S); running "
              "`serve mailbox`", file=sys.stderr)
        role = "mailbox"
    return serve(role, load(args), args.shard, args.node, args.config)
