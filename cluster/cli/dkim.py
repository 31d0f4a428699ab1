"""`mtacluster dkim keygen ...`: DKIM signing keys. The subcommands are defined next to the DKIM code that
they drive (cluster/dkim/admin.py); this module only puts them in the `mtacluster` command."""

from __future__ import annotations

from typing import Any


def register(commands: Any) -> None:
    from cluster.dkim import admin

    admin.add_parser(commands)
