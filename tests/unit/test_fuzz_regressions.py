"""The fuzz targets (fuzz/) without atheris: every saved input replays cleanly, and a quick pseudo-random pass.

tests/fuzz_seeds/<target>/ holds the inputs that once made a target fail (libFuzzer writes them there) and the
seeds fuzzing starts from; replaying them proves the findings stay fixed. The pseudo-random pass (fixed seed)
keeps each target's driver and invariants exercised in every test run, with or without atheris installed.
"""

from __future__ import annotations

import importlib
import random
from pathlib import Path

import pytest

from fuzz.targets import TARGETS, seed_dir
from tests.support.smtp_driver import run


def saved_inputs() -> list[tuple[str, Path]]:
    return [(name, path) for name in TARGETS if seed_dir(name).is_dir()
            for path in sorted(seed_dir(name).iterdir()) if path.is_file()]


@pytest.mark.parametrize(("target", "path"), saved_inputs(), ids=lambda value: getattr(value, "name", value))
def test_saved_input_replays_cleanly(target: str, path: Path) -> None:
    importlib.import_module(TARGETS[target]).fuzz_one(path.read_bytes())


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_pseudo_random_inputs_keep_the_invariants(target: str) -> None:
    fuzz_one = importlib.import_module(TARGETS[target]).fuzz_one
    rng = random.Random(target)
    for size in range(400):
        fuzz_one(rng.randbytes(size % 200))


def test_ehlo_name_is_echoed_as_printable_ascii_within_the_reply_line_limit() -> None:
    # Found by fuzzing: EHLO with a control character in its name had it echoed into the 250 reply.
    session = run([b"EHLO a\x16\x1b[2J\xc3\xa9b\r\n", b"HELO " + b"x" * 500 + b"\r\n"])
    ehlo, helo = (line for line in bytes(session.output).split(b"\r\n") if b"Hello" in line)
    assert ehlo == b"250-mx.example.test Hello a??[2J?b"
    assert helo == b"250 mx.example.test Hello " + b"x" * 255 and len(helo) + 2 <= 512
