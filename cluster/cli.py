"""The `mtacluster` command: run the cluster or one role, check configuration, administer the queue.

    mtacluster up [--config FILE]                      the whole cluster on this machine (built-in defaults)
    mtacluster serve frontend|queue|worker|pop3 [--config FILE] [--shard N]   one role (what a pod runs)
    mtacluster config check FILE                        validate a configuration file
    mtacluster keys FILE                                make the cluster's CURVE key pair (bus.curve_key_file)
    mtacluster queue list|show|flush|hold|release|delete|bounce ...      queue administration
    mtacluster user add|remove|list [NAME] [--config FILE]              the users file (auth.users_file)
    mtacluster dkim keygen DOMAIN --selector S [--algorithm rsa|ed25519] [--bits N] --out FILE    a DKIM key

Errors (a bad configuration, an unreachable shard) are one clear line on stderr and a non-zero exit code.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from cluster.config import Config, ConfigError, load_config


def _load(path: str | None) -> Config:
    return load_config(path)


def _cmd_up(args: argparse.Namespace) -> int:
    from cluster.supervisor import Supervisor

    return Supervisor(_load(args.config), args.config).run()


def _cmd_serve(args: argparse.Namespace) -> int:
    from cluster.roles import serve

    return serve(args.role, _load(args.config), args.shard)


def _cmd_config_check(args: argparse.Namespace) -> int:
    from cluster.bus.security import cluster_keys
    from cluster.config import check_files
    from cluster.dkim.signer import DkimSigner
    from cluster.tls import server_context

    config = _load(args.file)
    check_files(config)
    server_context(config.smtp.tls_cert_file, config.smtp.tls_key_file, "smtp")
    server_context(config.pop3.tls_cert_file, config.pop3.tls_key_file, "pop3")
    cluster_keys(config.bus)
    DkimSigner.from_config(config.dkim)
    print(f"{args.file}: ok ({len(config.queue.shards)} shards, listen {', '.join(config.smtp.listen)})")
    return 0


def _cmd_keys(args: argparse.Namespace) -> int:
    from cluster.bus.security import generate_key_file

    try:
        keys = generate_key_file(args.file)
    except OSError as exc:
        print(f"mtacluster keys: {args.file}: {exc.strerror}", file=sys.stderr)
        return 1
    print(f"{args.file}: new CURVE key pair (public key {keys.public.decode()}); set bus.curve_key_file to it")
    return 0


def _cmd_queue(args: argparse.Namespace) -> int:
    from cluster.queue_admin import run_queue_command

    return run_queue_command(_load(args.config), args)


def _cmd_user(args: argparse.Namespace) -> int:
    from cluster.user_admin import run_user_command

    return run_user_command(_load(args.config), args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mtacluster", description="A mail transfer agent that runs as a "
                                     "cluster of small processes.")
    commands = parser.add_subparsers(dest="command", required=True)

    up = commands.add_parser("up", help="run the whole cluster on this machine")
    up.add_argument("--config", help="TOML configuration file (default: built-in defaults)")
    up.set_defaults(func=_cmd_up)

    serve = commands.add_parser("serve", help="run one role")
    serve.add_argument("role", choices=["frontend", "queue", "worker", "pop3"])
    serve.add_argument("--config", help="TOML configuration file (default: built-in defaults)")
    serve.add_argument("--shard", type=int, default=0, help="shard number, for the queue role")
    serve.set_defaults(func=_cmd_serve)

    config = commands.add_parser("config", help="configuration tools")
    config_commands = config.add_subparsers(dest="config_command", required=True)
    check = config_commands.add_parser("check", help="validate a configuration file")
    check.add_argument("file")
    check.set_defaults(func=_cmd_config_check)

    keys = commands.add_parser("keys", help="make the cluster's CURVE key pair for bus encryption")
    keys.add_argument("file", help="where to write it (must not exist; written with mode 0600)")
    keys.set_defaults(func=_cmd_keys)

    queue = commands.add_parser("queue", help="inspect and steer the queue on every shard")
    queue.add_argument("--config", help="TOML configuration file (default: built-in defaults)")
    queue.add_argument("--json", action="store_true", help="print JSON instead of a table")
    queue.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for each shard")
    queue_commands = queue.add_subparsers(dest="queue_command", required=True)
    listing = queue_commands.add_parser("list", help="list queued messages")
    listing.add_argument("--domain", help="only recipients in this domain")
    listing.add_argument("--deferred", action="store_true", help="only deferred recipients")
    flush = queue_commands.add_parser("flush", help="retry deferred mail now")
    flush.add_argument("--domain", help="only this destination domain")
    for name, text in (("show", "show one message"), ("hold", "hold a message (no delivery until release)"),
                       ("release", "release a held message"), ("delete", "delete a message without a bounce"),
                       ("bounce", "fail a message's pending recipients and bounce it to the sender")):
        one = queue_commands.add_parser(name, help=text)
        one.add_argument("queue_id")
    queue.set_defaults(func=_cmd_queue)

    user = commands.add_parser("user", help="manage the users file (auth.users_file): who may log in")
    user.add_argument("--config", help="TOML configuration file (default: built-in defaults)")
    user_commands = user.add_subparsers(dest="user_command", required=True)
    user_add = user_commands.add_parser("add", help="add a user or change a password")
    user_add.add_argument("name")
    user_add.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    user_remove = user_commands.add_parser("remove", help="remove a user")
    user_remove.add_argument("name")
    for sub in (user_add, user_remove, user_commands.add_parser("list", help="list the users")):
        sub.add_argument("--config", default=argparse.SUPPRESS, help="TOML configuration file")
    user.set_defaults(func=_cmd_user)

    from cluster.dkim import admin as dkim_admin

    dkim_admin.add_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except ConfigError as exc:
        print(f"mtacluster: configuration error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return code
