"""Admin operations of a shard for deliverability, added to admin.py's (AdminRequest op -> AdminReply data):

    suppression_list    {}                               -> {"shard", "enabled", "entries": [entry, ...]}
    suppression_add     {address, category?, ttl?}       -> {"shard", "owner": bool, "entry": entry | None}
    suppression_remove  {address}                        -> {"shard", "owner": bool, "removed": bool}
    shaping_status      {}                               -> {"shard", "destinations": [row, ...]}
where entry = {"address", "category", "reply", "since", "until"} and row is `Shaper.status` (shaping.py).
Add and remove are carried out only by the shard that owns the address's domain (ARCHITECTURE.md contract 7);
the others answer owner=false, so the CLI can send them to every shard.
Errors: a missing or malformed address, or suppression switched off (suppression.ttl = 0) for add, raise
AdminError (answered ok=false with its text).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from cluster.bus.ring import shard_for_address
from cluster.config import Config
from cluster.queue.admin import AdminError
from cluster.queue.shaping import Shaper
from cluster.queue.suppression import SuppressionList

ADMIN_CATEGORY = "AdminSuppressed"


class DeliverabilityOps:
    def __init__(self, index: int, config: Config, suppression: SuppressionList, shaper: Shaper,
                 clock: Callable[[], float]) -> None:
        self.index = index
        self.shards = list(config.queue.shards)
        self.suppression = suppression
        self.shaper = shaper
        self.clock = clock

    def handlers(self) -> dict[str, Callable[[dict[str, Any]], Any]]:
        return {"suppression_list": self._list, "suppression_add": self._add, "suppression_remove": self._remove,
                "shaping_status": self._shaping}

    def _address(self, args: dict[str, Any]) -> str:
        address = args.get("address")
        if not isinstance(address, str) or "@" not in address or not address.rpartition("@")[2]:
            raise AdminError("argument 'address' must be an address such as user@example.com")
        return address.strip().lower()

    def _owns(self, address: str) -> bool:
        return shard_for_address(address, self.shards) == self.index

    async def _list(self, args: dict[str, Any]) -> dict[str, Any]:
        entries = [dataclasses.asdict(e) for e in self.suppression.entries(self.clock())]
        return {"shard": self.index, "enabled": self.suppression.enabled, "entries": entries}

    async def _add(self, args: dict[str, Any]) -> dict[str, Any]:
        address = self._address(args)
        if not self._owns(address):
            return {"shard": self.index, "owner": False, "entry": None}
        if not self.suppression.enabled:
            raise AdminError("suppression is off (suppression.ttl = 0)")
        category = args.get("category") or ADMIN_CATEGORY
        ttl = args.get("ttl")
        entry = self.suppression.add(address, str(category), "550 5.1.1 suppressed by the administrator",
                                     self.clock(), float(ttl) if isinstance(ttl, int | float) and ttl > 0 else None)
        return {"shard": self.index, "owner": True, "entry": dataclasses.asdict(entry)}

    async def _remove(self, args: dict[str, Any]) -> dict[str, Any]:
        address = self._address(args)
        if not self._owns(address):
            return {"shard": self.index, "owner": False, "removed": False}
        return {"shard": self.index, "owner": True, "removed": self.suppression.remove(address)}

    async def _shaping(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"shard": self.index, "destinations": self.shaper.status(self.clock())}
