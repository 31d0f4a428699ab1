"""`mtacluster user add|remove|list`: manage the users file named by `auth.users_file` (who may log in).

    mtacluster user add NAME [--password-stdin]   add or replace NAME (password from stdin, else a prompt)
    mtacluster user remove NAME                    delete NAME
    mtacluster user list                           print the names, one a line

The password is read with getpass (not echoed) and asked twice, or read as the first line of standard input
with --password-stdin (for scripts); it is never printed. Errors (no users file configured, a malformed file,
an empty password) are one line on stderr and exit code 1.
"""

from __future__ import annotations

import argparse
import getpass
import sys
from typing import Any

from cluster.cli.common import CommandFailed, add_config_option, load
from cluster.users import UserDatabase, UsersFileError, add_user, remove_user, valid_name


def register(commands: Any) -> None:
    group = commands.add_parser("user", help="manage the users file (auth.users_file): who may log in")
    user_commands = group.add_subparsers(dest="user_command", required=True, metavar="COMMAND")
    add = user_commands.add_parser("add", help="add a user or change a password")
    add.add_argument("name")
    add.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    remove = user_commands.add_parser("remove", help="remove a user")
    remove.add_argument("name")
    listing = user_commands.add_parser("list", help="list the users")
    add_config_option([group, add, remove, listing])
    group.set_defaults(func=run)


def _read_password(from_stdin: bool) -> str:
    if from_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    first = getpass.getpass("Password: ")
    if getpass.getpass("Password again: ") != first:
        raise CommandFailed("user add", "the passwords differ")
    return first


def run(args: argparse.Namespace) -> int:
    path = load(args).auth.users_file
    command = f"user {args.user_command}"
    if not path:
        raise CommandFailed("user", "auth.users_file is not set in the configuration")
    try:
        if args.user_command == "list":
            for name in UserDatabase(path).names():
                print(name)
            return 0
        if args.user_command == "remove":
            if not remove_user(path, args.name):
                raise CommandFailed(command, f"no user {args.name!r} in {path}")
            print(f"{path}: removed {args.name}")
            return 0
        if not valid_name(args.name):
            raise CommandFailed(command, f"{args.name!r} is not a valid user name (no spaces, ':' or '#')")
        password = _read_password(args.password_stdin)
        if not password:
            raise CommandFailed(command, "the password must not be empty")
        add_user(path, args.name, password)
    except UsersFileError as exc:
        raise CommandFailed("user", str(exc)) from None
    except OSError as exc:
        raise CommandFailed("user", f"{path}: {exc.strerror}") from None
    print(f"{path}: user {args.name} added")
    return 0
