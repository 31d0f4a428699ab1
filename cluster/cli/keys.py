"""`mtacluster keys FILE`: make the cluster's CURVE key pair (for `bus.curve_key_file`), mode 0600, never
overwriting an existing file."""

from __future__ import annotations

import argparse
from typing import Any

from cluster.cli.common import CommandFailed


def register(commands: Any) -> None:
    keys = commands.add_parser("keys", help="make the cluster's CURVE key pair for bus encryption")
    keys.add_argument("file", help="where to write it (must not exist; written with mode 0600)")
    keys.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cluster.bus.security import generate_key_file

    try:
        keys = generate_key_file(args.file)
    except OSError as exc:
        raise CommandFailed("keys", f"{args.file}: {exc.strerror}") from None
    print(f"{args.file}: new CURVE key pair (public key {keys.public.decode()}); set bus.curve_key_file to it")
    return 0
