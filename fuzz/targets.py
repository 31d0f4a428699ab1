"""The fuzz targets: name -> module defining `fuzz_one(data)`, and where each target's seeds live.

A new protocol machine gets a module here (and its seeds a folder under tests/fuzz_seeds/).
"""

from __future__ import annotations

from pathlib import Path

TARGETS: dict[str, str] = {
    "smtp_server": "fuzz.smtp_server",
    "lmtp_server": "fuzz.lmtp_server",
    "smtp_client": "fuzz.smtp_client",
    "pop3_server": "fuzz.pop3_server",
    "proxy_header": "fuzz.proxy_header",
    "bus_decode": "fuzz.bus_decode",
}

SEEDS = Path(__file__).resolve().parent.parent / "tests" / "fuzz_seeds"


def seed_dir(name: str) -> Path:
    return SEEDS / name
