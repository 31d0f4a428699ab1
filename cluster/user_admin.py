"""`mtacluster user add|remove|list`: manage the users file named by `auth.users_file`.

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

from cluster.config import Config
from cluster.users import UserDatabase, UsersFileError, add_user, remove_user, valid_name


def _read_password(from_stdin: bool) -> str | None:
    if from_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    first = getpass.getpass("Password: ")
    if getpass.getpass("Password again: ") != first:
        print("mtacluster user add: the passwords differ", file=sys.stderr)
        return None
    return first


def run_user_command(config: Config, args: argparse.Namespace) -> int:
    path = config.auth.users_file
    if not path:
        print("mtacluster user: auth.users_file is not set in the configuration", file=sys.stderr)
        return 1
    try:
        if args.user_command == "list":
            for name in UserDatabase(path).names():
                print(name)
            return 0
        if args.user_command == "remove":
            if not remove_user(path, args.name):
                print(f"mtacluster user remove: no user {args.name!r} in {path}", file=sys.stderr)
                return 1
            print(f"{path}: removed {args.name}")
            return 0
        if not valid_name(args.name):
            print(f"mtacluster user add: {args.name!r} is not a valid user name (no spaces, ':' or '#')",
                  file=sys.stderr)
            return 1
        password = _read_password(args.password_stdin)
        if password is None:
            return 1
        if not password:
            print("mtacluster user add: the password must not be empty", file=sys.stderr)
            return 1
        add_user(path, args.name, password)
    except UsersFileError as exc:
        print(f"mtacluster user: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"mtacluster user: {path}: {exc.strerror}", file=sys.stderr)
        return 1
    print(f"{path}: user {args.name} added")
    return 0
