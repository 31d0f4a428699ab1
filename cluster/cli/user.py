"""`mtacluster user ...`: manage the accounts of the users file named by `auth.users_file`.

    mtacluster user add NAME [--password-stdin] [--address A]... [--messages-per-day N] [--recipients-per-day N]
                                  add NAME, or change its password and the given settings (others are kept)
    mtacluster user disable NAME / enable NAME     refuse / allow its logins (SMTP AUTH, POP3)
    mtacluster user show NAME [--json]             state, addresses, limits, usage in the current 24 hours,
                                                   and the Maildir's size and quota (as seen from this host)
    mtacluster user list [--json]                  every account, one a line
    mtacluster user remove NAME                    delete NAME

The password is read with getpass (not echoed) and asked twice, or read as the first line of standard input
with --password-stdin (for scripts); it is never printed, and shorter than 8 characters it is refused. The
running cluster sees every change at its next lookup (the file is re-read when it changes). `show` asks the
queue shard owning the user name (cluster/bus/ring.py shard_for_key, without the shards that say they are
draining or drained: the counters moved to that owner) for the usage; an unreachable shard is
reported and makes the exit code 1, the rest is still printed. Errors (no users file configured, a malformed
file, a bad value) are one line on stderr and exit code 1.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import sys
from typing import Any

import zmq.asyncio

from cluster.bus.client import BusLink, NoAnswer
from cluster.bus.ring import shard_for_key
from cluster.bus.schemas import AdminReply, AdminRequest
from cluster.bus.security import cluster_keys
from cluster.cli.common import CommandFailed, add_config_option, add_option, load
from cluster.cli.queue import ask_shards
from cluster.config import Config
from cluster.mailbox.quota import mailbox_usage
from cluster.users import (
    MIN_PASSWORD_LENGTH,
    Account,
    UserDatabase,
    UsersFileError,
    add_user,
    remove_user,
    set_active,
    valid_name,
    valid_sender_address,
)


def register(commands: Any) -> None:
    group = commands.add_parser("user", help="manage the accounts of the users file (auth.users_file)")
    user_commands = group.add_subparsers(dest="user_command", required=True, metavar="COMMAND")
    add = user_commands.add_parser("add", help="add a user, or change its password and settings")
    add.add_argument("name")
    add.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    add.add_argument("--address", action="append", default=[], metavar="A",
                     help="an address the user may send as (@example.org: any address in the domain); "
                          "may be given several times")
    add.add_argument("--messages-per-day", type=int, metavar="N", help="daily message limit (0 = none)")
    add.add_argument("--recipients-per-day", type=int, metavar="N", help="daily recipient limit (0 = none)")
    named = [add]
    for name, text in (("remove", "remove a user"), ("disable", "refuse the user's logins"),
                       ("enable", "allow the user's logins again"),
                       ("show", "state, addresses, limits and usage in the last 24 hours")):
        one = user_commands.add_parser(name, help=text)
        one.add_argument("name")
        named.append(one)
    show = named[-1]
    listing = user_commands.add_parser("list", help="list the accounts")
    add_config_option([group, *named, listing])
    add_option([group, show, listing], "--json", action="store_true", default=False, help="print JSON")
    add_option([group, show], "--timeout", type=float, default=5.0, metavar="SECONDS",
               help="how long to wait for the user's shard")
    group.set_defaults(func=run)


def _read_password(from_stdin: bool) -> str:
    if from_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    first = getpass.getpass("Password: ")
    if getpass.getpass("Password again: ") != first:
        raise CommandFailed("user add", "the passwords differ")
    return first


def _describe(account: Account, config: Config) -> dict[str, Any]:
    limits = config.limits
    return {
        "name": account.name,
        "state": "active" if account.active else "disabled",
        "addresses": list(account.sender_addresses()),
        "messages_per_day": limits.messages_per_day if account.messages_per_day is None else account.messages_per_day,
        "recipients_per_day": (limits.recipients_per_day if account.recipients_per_day is None
                               else account.recipients_per_day),
        "mailbox_quota": account.mailbox_quota,
    }


async def _ask_usage(config: Config, shard: int, name: str, timeout: float) -> dict[str, Any] | str:
    context = zmq.asyncio.Context()
    link = BusLink(config.queue.shards[shard], cluster_keys(config.bus), name=f"shard {shard}", context=context)
    try:
        link.start()
        answer = await link.request(lambda req: AdminRequest(req=req, op="user_usage", args={"user": name}),
                                    timeout)
    except NoAnswer as missing:
        return str(missing)
    finally:
        await link.close()
        context.term()
    if not isinstance(answer, AdminReply) or not answer.ok or not isinstance(answer.data, dict):
        return f"shard {shard} answered {getattr(answer, 'error', '') or answer.TYPE}"
    return {"messages": int(answer.data.get("messages", 0)), "recipients": int(answer.data.get("recipients", 0)),
            "shard": shard}


def _not_serving(config: Config, timeout: float) -> frozenset[int]:
    """The shards that say they are draining or drained (a silent one counts as serving: it is asked anyway,
    and its silence reported)."""
    answers = ask_shards(config, "ping", {}, timeout)
    return frozenset(index for index, data in answers.data
                     if isinstance(data, dict) and data.get("state", "serving") != "serving")


def _show(config: Config, database: UserDatabase, args: argparse.Namespace) -> int:
    account = database.get(args.name)
    if account is None:
        raise CommandFailed("user show", f"no user {args.name!r} in {database.path}")
    facts = _describe(account, config)
    owner = shard_for_key(account.name, config.queue.shards, _not_serving(config, args.timeout))
    usage = asyncio.run(_ask_usage(config, owner, account.name.lower(), args.timeout))
    facts["usage_24h"] = usage if isinstance(usage, dict) else None
    mailbox = mailbox_usage(config, account.name, database)  # the Maildir under mailbox.maildir_root, if local
    facts["mailbox"] = {"messages": mailbox.messages, "octets": mailbox.octets, "quota": mailbox.quota}
    if args.json:
        print(json.dumps(facts, indent=2))
    else:
        def limit(value: int) -> str:
            return "no limit" if value == 0 else str(value)

        print(f"user:        {facts['name']}\nstate:       {facts['state']}\n"
              f"addresses:   {', '.join(facts['addresses']) or '-'}\n"
              f"limits:      {limit(facts['messages_per_day'])} messages, "
              f"{limit(facts['recipients_per_day'])} recipients per 24 hours")
        if isinstance(usage, dict):
            print(f"usage (24h): {usage['messages']} messages, {usage['recipients']} recipients")
        print(f"mailbox:     {mailbox.messages} messages, {mailbox.octets} bytes"
              + (f" of a {mailbox.quota}-byte quota" if mailbox.quota else " (no quota)"))
    if isinstance(usage, str):
        raise CommandFailed("user show", f"usage unknown: {usage}")
    return 0


def _add(path: str, args: argparse.Namespace) -> int:
    command = "user add"
    if not valid_name(args.name):
        raise CommandFailed(command, f"{args.name!r} is not a valid user name (no spaces, ':', '#' or quotes)")
    for address in args.address:
        if not valid_sender_address(address):
            raise CommandFailed(command, f"--address {address!r}: expected an address (a@example.org) or a domain "
                                "(@example.org)")
    for option, value in (("--messages-per-day", args.messages_per_day),
                          ("--recipients-per-day", args.recipients_per_day)):
        if value is not None and value < 0:
            raise CommandFailed(command, f"{option} must be 0 (no limit) or more")
    password = _read_password(args.password_stdin)
    if not password:
        raise CommandFailed(command, "the password must not be empty")
    if len(password) < MIN_PASSWORD_LENGTH:
        raise CommandFailed(command, f"the password must have at least {MIN_PASSWORD_LENGTH} characters")
    add_user(path, args.name, password, addresses=tuple(args.address), messages_per_day=args.messages_per_day,
             recipients_per_day=args.recipients_per_day)
    print(f"{path}: user {args.name} added")
    return 0


def run(args: argparse.Namespace) -> int:
    config = load(args)
    path = config.auth.users_file
    command = f"user {args.user_command}"
    if not path:
        raise CommandFailed("user", "auth.users_file is not set in the configuration")
    try:
        database = UserDatabase(path)
        if args.user_command == "list":
            accounts = database.accounts()
            if args.json:
                print(json.dumps([_describe(a, config) for a in accounts], indent=2))
            else:
                for account in accounts:
                    print(account.name if account.active else f"{account.name} (disabled)")
            return 0
        if args.user_command == "show":
            return _show(config, database, args)
        if args.user_command in ("disable", "enable"):
            if not set_active(path, args.name, args.user_command == "enable"):
                raise CommandFailed(command, f"no user {args.name!r} in {path}")
            print(f"{path}: user {args.name} {args.user_command}d")
            return 0
        if args.user_command == "remove":
            if not remove_user(path, args.name):
                raise CommandFailed(command, f"no user {args.name!r} in {path}")
            print(f"{path}: removed {args.name}")
            return 0
        return _add(path, args)
    except UsersFileError as exc:
        raise CommandFailed("user", str(exc)) from None
    except OSError as exc:
        raise CommandFailed("user", f"{path}: {exc.strerror}") from None
