"""The cluster's internal bus: ZeroMQ sockets carrying msgpack messages between frontends, shards and workers."""
