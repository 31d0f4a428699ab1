"""What every `mtacluster` command group shares: the `--config` option and the way a command fails.

Options go after the subcommand, as users type them (`mtacluster queue list --json --config F`); the group
level still takes them too (`mtacluster queue --config F list`), and the one given last wins. `CommandFailed`
is how a command says it could not do its job: `main` prints it as one line on stderr,
"mtacluster <command>: <why>", and exits with its code. Never a traceback.
"""

from __future__ import annotations

import argparse
from typing import Any

from cluster.config import Config, load_config

CONFIG_HELP = "TOML configuration file (default: built-in defaults)"


class CommandFailed(Exception):
    """A command could not do its job: `why` is printed on stderr, `code` is the exit status."""

    def __init__(self, command: str, why: str, code: int = 1) -> None:
        super().__init__(why)
        self.command = command
        self.why = why
        self.code = code


def add_option(parsers: list[argparse.ArgumentParser], *names: str, **kwargs: Any) -> None:
    """Add one option to a group parser (first, holding the default) and to each of its subcommands, so that it
    is accepted before and after the subcommand. A subcommand only sets it when it is given there."""
    group, *leaves = parsers
    group.add_argument(*names, **kwargs)
    for leaf in leaves:
        leaf.add_argument(*names, **{**kwargs, "default": argparse.SUPPRESS})


def add_config_option(parsers: list[argparse.ArgumentParser]) -> None:
    add_option(parsers, "--config", metavar="FILE", default=None, help=CONFIG_HELP)


def load(args: argparse.Namespace) -> Config:
    """The configuration named by --config (ConfigError for a bad one: `main` reports it with exit code 2)."""
    return load_config(args.config)
