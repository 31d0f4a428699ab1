"""A queue shard: durable spool, scheduler, dispatch to workers, retries, bounces and admin operations."""
