"""Reading RFC 3464 delivery status notifications back with the stdlib `email` package."""

from __future__ import annotations

from email.message import EmailMessage
from typing import Any, cast


def status_blocks(part: Any) -> list[EmailMessage]:
    """The header blocks of a message/delivery-status part (the parser gives them as a list)."""
    blocks = part.get_payload()
    assert isinstance(blocks, list)
    return cast(list[EmailMessage], blocks)
