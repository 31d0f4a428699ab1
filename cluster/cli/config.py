"""`mtacluster config check [FILE | --config FILE]`: validate a configuration and the files it names (TLS
certificates and keys, the users file, the CURVE key file, the DKIM keys). A bad value is named with its key
and the reason (exit code 2); without a file, the built-in defaults are checked."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from cluster.cli.common import add_config_option, load


def register(commands: Any) -> None:
    group = commands.add_parser("config", help="configuration tools")
    config_commands = group.add_subparsers(dest="config_command", required=True, metavar="COMMAND")
    check = config_commands.add_parser("check", help="validate a configuration file and the files it names")
    check.add_argument("file", nargs="?", help="the configuration file (or give it with --config)")
    add_config_option([group, check])
    check.set_defaults(func=run_check)


def run_check(args: argparse.Namespace) -> int:
    from cluster.bus.security import cluster_keys
    from cluster.config import check_files
    from cluster.delivery.mta_sts import verifying_context
    from cluster.dkim.signer import DkimSigner
    from cluster.tls import server_context

    if args.file is not None:
        args.config = args.file
    config = load(args)
    check_files(config)
    server_context(config.smtp.tls_cert_file, config.smtp.tls_key_file, "smtp")
    server_context(config.mailbox.tls_cert_file, config.mailbox.tls_key_file, "mailbox")
    cluster_keys(config.bus)
    DkimSigner.from_config(config.dkim)
    for note in config.deprecations:
        print(f"{args.config}: warning: {note}", file=sys.stderr)
    if config.mta_sts.enabled:
        verifying_context(config.mta_sts.ca_file)
    _check_users_file(config.auth.users_file)
    smtp = config.smtp
    listeners = ", ".join(f"{name} {' '.join(addresses)}" for name, addresses in (
        ("listen", smtp.listen), ("submission", smtp.submission_listen), ("submissions", smtp.submissions_listen))
        if addresses)
    print(f"{args.config or 'built-in defaults'}: ok ({len(config.queue.shards)} shards, {listeners})")
    return 0


def _check_users_file(path: str) -> None:
    """The users file must parse (every account, its addresses and limits), or ConfigError names it."""
    from cluster.config import ConfigError
    from cluster.users import UserDatabase, UsersFileError

    if path:
        try:
            UserDatabase(path).names()
        except UsersFileError as exc:
            raise ConfigError("auth.users_file", str(exc)) from None
