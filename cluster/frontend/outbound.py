"""What a frontend decides for a message when it accepts it: its DKIM signature (so a retry never re-signs) and
the egress pool it will leave through.

Input: the message data as received, the envelope sender, the authenticated user (or None) and whether the
client may relay (a relay network or SMTP AUTH). Output: `Prepared.header`, the bytes to prepend (a
DKIM-Signature field, or b""), and `Prepared.pool`: the pool of the authenticated user (`egress.users`), else
of the sender's domain (`egress.sender_domains`), else "default" when such a pool exists, else "" (no pool).
The pool travels with the message (Inject.client["pool"] -> the shard's spool -> Deliver.pool). Mail that
arrives for our local domains from elsewhere is not signed: it is not ours. Messages larger than `THREAD_ABOVE`
are canonicalized and signed in a worker thread, so one big message does not stall the other sessions of this
frontend.

Failure modes: none raised for message content (see `cluster.dkim.signer`); an unusable key file raises
`KeyFileError` from `Outbound.from_config`, at startup.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from cluster.bus.ring import domain_key
from cluster.config import Config, EgressConfig
from cluster.dkim import metrics as dkim_metrics
from cluster.dkim.signer import DkimSigner

THREAD_ABOVE = 256 * 1024


@dataclass(frozen=True)
class Prepared:
    header: bytes = b""
    dkim: str = ""  # the signing result ("signed", "no_key"...), "" when the message was not eligible
    pool: str = ""


class Outbound:
    def __init__(self, signer: DkimSigner | None, egress: EgressConfig | None = None) -> None:
        self.signer = signer
        egress = egress or EgressConfig()
        self._user_pools = {user.lower(): pool for user, pool in egress.users.items()}
        self._domain_pools = {domain_key(domain): pool for domain, pool in egress.sender_domains.items()}
        self._default_pool = "default" if "default" in egress.pools else ""
        self._unsigned: dict[str, Prepared] = {}

    @classmethod
    def from_config(cls, config: Config) -> Outbound:
        for result in dkim_metrics.SIGNATURE_RESULTS:  # every series at zero, for dashboards and alerts
            dkim_metrics.SIGNATURES.labels(result=result)
        return cls(DkimSigner.from_config(config.dkim), config.egress)

    def pool_for(self, sender: str, user: str | None) -> str:
        if user is not None and (pool := self._user_pools.get(user.lower())):
            return pool
        if not self._domain_pools:  # the usual case: no per-domain pools, nothing to look up
            return self._default_pool
        _, at, domain = sender.rpartition("@")
        return (self._domain_pools.get(domain_key(domain)) if at else None) or self._default_pool

    async def prepare(self, data: bytes, *, sender: str, user: str | None, relayed: bool) -> Prepared:
        pool = self.pool_for(sender, user)
        if self.signer is None or not relayed:
            unsigned = self._unsigned.get(pool)
            if unsigned is None:  # one per pool name (the configured pools and ""): it is immutable
                unsigned = self._unsigned[pool] = Prepared(pool=pool)
            return unsigned
        if len(data) > THREAD_ABOVE:
            signing = await asyncio.to_thread(self.signer.sign, data)
        else:
            signing = self.signer.sign(data)
        return Prepared(signing.header, signing.result, pool)
