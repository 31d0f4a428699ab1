"""`mtacluster up [--config FILE]`: the whole cluster on this machine, as child processes (cluster/supervisor.py)."""

from __future__ import annotations

import argparse
from typing import Any

from cluster.cli.common import add_config_option, load


def register(commands: Any) -> None:
    up = commands.add_parser("up", help="run the whole cluster on this machine",
                             description="Run every role on this machine (every shard of queue.shards; up.frontends "
                             "frontends and up.workers workers, by default one frontend per usable CPU and one "
                             "worker per two; a mailbox) and restart any that dies. Stop with Ctrl-C or SIGTERM.")
    add_config_option([up])
    up.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cluster.supervisor import Supervisor

    return Supervisor(load(args), args.config).run()
