"""`mtacluster queue ...` against a real shard, typed as an operator types it: options after the subcommand,
sentences and tables (not dicts), --limit with the total, clear failures for an unknown id or an unreachable
shard, and no traceback when the reader of the output goes away."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from cluster.cli import CLOSED_PIPE_STATUS, main
from tests.support import REPO
from tests.support.shard import BODY, RunningShard, inject, shard_config
from tests.support.tooling import free_port

pytestmark = pytest.mark.integration


@pytest.fixture
async def shard(tmp_path: Path) -> AsyncIterator[RunningShard]:
    running = await RunningShard(shard_config(tmp_path / "spool")).start()
    try:
        yield running
    finally:
        await running.close()


def config_file(tmp_path: Path, *endpoints: str) -> str:
    path = tmp_path / "cli.toml"
    path.write_text("[queue]\nshards = [" + ", ".join(f'"{e}"' for e in endpoints) + "]\n[metrics]\nlisten = \"\"\n")
    return str(path)


async def mtacluster(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Run the command in a thread (it runs its own event loop) while the shard serves in this one."""
    code = await asyncio.to_thread(main, list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


async def test_list_hold_release_delete_as_an_operator_types_them(
        tmp_path: Path, shard: RunningShard, capsys: pytest.CaptureFixture[str]) -> None:
    config = config_file(tmp_path, shard.endpoint)
    client = shard.client()
    ids = [(await inject(client, n, "a@sender.test", [f"r{n}@h.test", f"s{n}@i.test"], BODY)).queue_id
           for n in range(1, 4)]

    code, out, err = await mtacluster(capsys, "queue", "list", "--config", config)
    assert (code, err) == (0, "")
    assert all(queue_id in out for queue_id in ids) and "{" not in out
    assert out.rstrip().endswith("-- 3 messages on 1 shard")

    code, out, err = await mtacluster(capsys, "queue", "list", "--limit", "2", "--config", config)
    assert code == 0 and ids[0] in out and ids[1] in out and ids[2] not in out  # the oldest first
    assert out.rstrip().endswith("-- showing the oldest 2 of 3 messages on 1 shard; use --limit N to see more")

    code, out, err = await mtacluster(capsys, "queue", "list", "--json", "--limit", "2", "--config", config)
    assert code == 0 and [m["queue_id"] for m in json.loads(out)] == ids[:2]
    assert "showing the oldest 2 of 3 messages" in err  # said even when the output is for a program

    code, out, err = await mtacluster(capsys, "queue", "show", ids[1], "--config", config)
    assert (code, err) == (0, "") and ids[1] in out and "r2@h.test" in out and "s2@i.test" in out
    assert "Received from: client=192.0.2.1" in out and "Subject: hi" in out and "{" not in out

    code, out, err = await mtacluster(capsys, "queue", "hold", ids[0], "--config", config)
    assert (code, out, err) == (0, f"message {ids[0]}: 2 recipients held: no delivery until "
                                   "`mtacluster queue release`\n", "")
    code, out, _ = await mtacluster(capsys, "queue", "release", ids[0], "--config", config)
    assert (code, out) == (0, f"message {ids[0]}: 2 recipients released for delivery\n")
    code, out, _ = await mtacluster(capsys, "queue", "delete", ids[0], "--config", config)
    assert (code, out) == (0, f"message {ids[0]}: 2 pending recipients deleted, without a bounce\n")
    code, out, _ = await mtacluster(capsys, "queue", "bounce", ids[1], "--config", config)
    assert (code, out) == (0, f"message {ids[1]}: 2 pending recipients failed; a bounce goes to the sender\n")
    code, out, _ = await mtacluster(capsys, "queue", "flush", "--domain", "h.test", "--config", config)
    assert (code, out) == (0, "0 deferred recipients will be retried now\n")

    code, out, err = await mtacluster(capsys, "queue", "hold", ids[0], "--config", config)
    assert (code, out, err) == (1, "", f"mtacluster queue hold: unknown queue id {ids[0]}\n")


async def test_an_unreachable_shard_is_named_and_fails_the_command(
        tmp_path: Path, shard: RunningShard, capsys: pytest.CaptureFixture[str]) -> None:
    down = f"tcp://127.0.0.1:{free_port()}"
    config = config_file(tmp_path, shard.endpoint, down)
    stored = await inject(shard.client(), 1, "a@sender.test", ["r@h.test"], BODY)
    code, out, err = await mtacluster(capsys, "queue", "list", "--config", config, "--timeout", "0.5")
    assert code == 1
    assert stored.queue_id in out and "queue is empty" not in out  # what the live shard holds is still shown
    assert err == f"mtacluster queue list: shard 1 ({down}) is unreachable (no connection within 0.5s)\n"
    # Even when the change was made on the shard that answered, the operator learns that one did not.
    code, out, err = await mtacluster(capsys, "queue", "hold", stored.queue_id, "--config", config,
                                      "--timeout", "0.5")
    assert code == 1 and "1 recipient held" in out and "shard 1" in err and "unreachable" in err


async def test_a_reader_that_goes_away_gets_no_traceback(tmp_path: Path, shard: RunningShard) -> None:
    """`mtacluster queue list --json | head`: the reader is gone before the command writes."""
    config = config_file(tmp_path, shard.endpoint)
    await inject(shard.client(), 1, "a@sender.test", ["r@h.test"], BODY)
    reader, writer = os.pipe()
    os.close(reader)
    try:
        command = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "cluster", "queue", "list", "--json", "--config", config,
            stdout=writer, stderr=asyncio.subprocess.PIPE, cwd=REPO)
    finally:
        os.close(writer)
    _, err = await asyncio.wait_for(command.communicate(), 60)
    assert (command.returncode, err) == (CLOSED_PIPE_STATUS, b"")
