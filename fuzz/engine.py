"""Run one fuzz target under atheris/libFuzzer: `python -m fuzz.engine TARGET [libFuzzer arguments...]`.

The target's module is imported inside `atheris.instrument_imports()`, so the `cluster` modules it pulls in are
instrumented for coverage feedback. libFuzzer then runs until its own limits (-max_total_time, -runs) or the
first finding, which it writes where -artifact_prefix says. Used by fuzz/run.py, one process per target.
"""

from __future__ import annotations

import importlib
import sys

import atheris


def main() -> None:
    from fuzz.targets import TARGETS

    name = sys.argv[1]
    with atheris.instrument_imports(include=["cluster"]):
        module = importlib.import_module(TARGETS[name])
    atheris.Setup([sys.argv[0], *sys.argv[2:]], module.fuzz_one)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
