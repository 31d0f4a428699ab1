"""The SMTP frontend: asyncio glue around the sans-I/O server, relay policy, limits, inject to the shards."""
