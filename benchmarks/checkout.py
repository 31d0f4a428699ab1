"""Import `cluster` from another checkout, for the A/B runs of the role-alone harnesses (`--source DIR`).

`use_source(variable)`: when the environment variable `variable` names a directory, `cluster` and its modules
are imported from that directory from now on (e.g. `git archive main cluster | tar -x -C /tmp/old`), ahead of
this checkout's editable install, whose import hook would otherwise win over sys.path; modules of `cluster`
already imported are forgotten first. Does nothing when the variable is unset or empty.
"""

from __future__ import annotations

import os
import sys


def use_source(variable: str) -> None:
    source = os.environ.get(variable)
    if source:
        sys.meta_path[:] = [finder for finder in sys.meta_path if "__editable__" not in type(finder).__module__]
        sys.path.insert(0, source)
        for name in [name for name in sys.modules if name == "cluster" or name.startswith("cluster.")]:
            del sys.modules[name]
