"""Fixtures shared by several test modules; helpers (plain functions and classes) live in `tests/support/`.

- `running_shard`: one queue shard with its spool under the test's tmp_path, serving on a free port, stopped after.
- `ca`: one trustme certificate authority for the session, to issue server certificates for TLS tests.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trustme

from tests.support.shard import RunningShard, shard_config


@pytest.fixture
async def running_shard(tmp_path: Path) -> AsyncIterator[RunningShard]:
    shard = await RunningShard(shard_config(tmp_path / "spool")).start()
    try:
        yield shard
    finally:
        await shard.close()


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    return trustme.CA()
