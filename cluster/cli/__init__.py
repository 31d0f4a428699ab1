"""The `mtacluster` command: run the cluster or one role, check configuration, administer queue and users.

    mtacluster up [--config FILE]                                   the whole cluster on this machine
    mtacluster serve frontend|queue|worker|mailbox [--config FILE] [--shard N] [--node N]   one role (a pod)
    mtacluster config check [FILE | --config FILE]                  validate a configuration and its files
    mtacluster keys FILE                                            the cluster's CURVE key pair
    mtacluster queue list|show|flush|hold|release|delete|bounce ... queue administration (every shard)
    mtacluster shard drain N [--wait] | undrain N | status [--json] take a shard out of the ring and back
    mtacluster user add|remove|disable|enable|show|list [NAME]       accounts (auth.users_file)
    mtacluster dkim keygen DOMAIN --selector S [--algorithm rsa|ed25519] [--bits N] --out FILE    a DKIM key
    mtacluster suppression list | add ADDR | remove ADDR           the suppression lists (every shard)
    mtacluster shaping status                                       traffic shaping in force, and why
    mtacluster --version

One module per command group (COMMAND_GROUPS), each with `register(commands)` adding its subcommands and
setting `func`; options go after the subcommand (cluster/cli/common.py). Exit codes: 0 done, 1 the command
failed (one line on stderr, e.g. an unreachable shard), 2 bad usage or a bad configuration (the key and the
reason), 130 interrupted, 141 standard output closed early (`mtacluster queue list | head`): never a
traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from cluster.cli import config, dkim, keys, queue, serve, shaping, shard, suppression, up, user
from cluster.cli.common import CommandFailed
from cluster.config import ConfigError
from cluster.version import VERSION

# The command groups, in the order `mtacluster --help` lists them. A new group is a module here with a
# `register(commands)` function, listed here.
COMMAND_GROUPS = (up, serve, queue, shard, user, dkim, suppression, shaping, config, keys)

# The status a process killed by SIGPIPE has in a shell (128 + 13), which `set -o pipefail` users expect.
CLOSED_PIPE_STATUS = 141


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mtacluster", description="A mail transfer agent that runs as a "
                                     "cluster of small processes.")
    parser.add_argument("--version", action="version", version=f"mtacluster {VERSION}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in COMMAND_GROUPS:
        group.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _run(argv)
    except BrokenPipeError:
        # The reader went away (`| head`): stop quietly, and keep the interpreter's final flush from
        # complaining about the same closed pipe.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return CLOSED_PIPE_STATUS


def _run(argv: Sequence[str] | None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit:
        sys.stdout.flush()  # --help and --version print, then exit: a closed pipe shows up here
        raise
    try:
        code: int = args.func(args)
    except ConfigError as exc:
        print(f"mtacluster: configuration error: {exc}", file=sys.stderr)
        code = 2
    except CommandFailed as exc:
        print(f"mtacluster {exc.command}: {exc.why}", file=sys.stderr)
        code = exc.code
    except KeyboardInterrupt:
        code = 130
    sys.stdout.flush()
    return code
