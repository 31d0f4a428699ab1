"""Coverage-guided fuzzing (atheris, libFuzzer) of the protocol machines: one target module per machine.

Each target module defines `fuzz_one(data: bytes) -> None`, which drives one machine with input derived from
`data` and asserts the machine's invariants: no exception except the ones its module documents, replies
well-formed, only CRLF ending the lines it writes. An AssertionError or any undocumented exception is a
finding. `fuzz_one` needs no atheris, so saved inputs replay as plain unit tests
(tests/unit/test_fuzz_regressions.py).

    make fuzz                              # every target for FUZZ_SECONDS (60) each
    .venv/bin/python -m fuzz.run --seconds 5 smtp_server proxy_header

The target list is `fuzz.targets.TARGETS`. Crashing inputs are written by libFuzzer into
tests/fuzz_seeds/<target>/ (`crash-<sha1>`), where they stay as regression seeds next to the hand-written seeds
each run starts from.
"""
