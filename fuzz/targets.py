"""The fuzz targets: name -> module defining `fuzz_one(data)`, and where each target's seeds live.

A new protocol machine gets a module here and a seed folder. The LMTP server machine (cluster/smtp/lmtp.py, the
mailbox role's way in) belongs here as "lmtp_server" once it exists: drive it like fuzz/smtp_server.py (LHLO
instead of EHLO) and also assert one reply per accepted recipient after the end of DATA (RFC 2033 4.2).
"""

from __future__ import annotations

from pathlib import Path

TARGETS: dict[str, str] = {
    "smtp_server": "fuzz.smtp_server",
    "smtp_client": "fuzz.smtp_client",
    "pop3_server": "fuzz.pop3_server",
    "proxy_header": "fuzz.proxy_header",
    "bus_decode": "fuzz.bus_decode",
}

SEEDS = Path(__file__).resolve().parent.parent / "tests" / "fuzz_seeds"


def seed_dir(name: str) -> Path:
    return SEEDS / name
