"""Sans-I/O SMTP: bytes in, events and replies out. No sockets and no asyncio here (model: h11)."""
