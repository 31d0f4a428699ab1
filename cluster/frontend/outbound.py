"""What a frontend adds to relayed mail when it accepts it: the DKIM signature (so a retry never re-signs).

Input: the message data as received, and whether the client may relay (a relay network or SMTP AUTH). Output:
`Prepared.header`, the bytes to prepend (a DKIM-Signature field, or b""). Mail that arrives for our local
domains from elsewhere is not signed: it is not ours. Messages larger than `THREAD_ABOVE` are canonicalized and
signed in a worker thread, so one big message does not stall the other sessions of this frontend.

Failure modes: none raised for message content (see `cluster.dkim.signer`); an unusable key file raises
`KeyFileError` from `Outbound.from_config`, at startup.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from cluster.config import Config
from cluster.dkim.signer import DkimSigner

THREAD_ABOVE = 256 * 1024


@dataclass(frozen=True)
class Prepared:
    header: bytes = b""
    dkim: str = ""  # the signing result ("signed", "no_key"...), "" when the message was not eligible


class Outbound:
    def __init__(self, signer: DkimSigner | None) -> None:
        self.signer = signer

    @classmethod
    def from_config(cls, config: Config) -> Outbound:
        return cls(DkimSigner.from_config(config.dkim))

    async def prepare(self, data: bytes, *, relayed: bool) -> Prepared:
        if self.signer is None or not relayed:
            return Prepared()
        if len(data) > THREAD_ABOVE:
            signing = await asyncio.to_thread(self.signer.sign, data)
        else:
            signing = self.signer.sign(data)
        return Prepared(signing.header, signing.result)
