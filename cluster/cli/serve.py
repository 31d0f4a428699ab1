"""`mtacluster serve ROLE [--config FILE] [--shard N]`: run one role in this process (what a pod runs)."""

from __future__ import annotations

import argparse
from typing import Any

from cluster.cli.common import add_config_option, load
from cluster.roles import ROLES


def register(commands: Any) -> None:
    serve = commands.add_parser("serve", help="run one role", description="Run one role of the cluster in this "
                                "process, with its /metrics, /healthz and /readyz listener.")
    serve.add_argument("role", choices=ROLES)
    add_config_option([serve])
    serve.add_argument("--shard", type=int, default=0, metavar="N", help="shard number, for the queue role")
    serve.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cluster.roles import serve

    return serve(args.role, load(args), args.shard)
