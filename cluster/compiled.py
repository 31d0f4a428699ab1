"""Whether this process runs the mypyc-compiled modules, and the guard that keeps a stale build out.

`make` compiles the modules listed under `[tool.mtacluster.compiled]` in pyproject.toml (tools/compile_native.py)
into extension modules beside their sources, plus the group's shared library, and writes the manifest
`cluster/_compiled.json`: the SHA-256 of every compiled source and the mypyc (mypy) version. Python's import
system prefers an extension module to a `.py` of the same name, so without a guard an edited source would lose
silently to its old compiled copy (a developer edits a module and runs pytest).

`install()` runs once, from `cluster/__init__.py`, before any other module of the package is imported. It reads
the manifest and hashes the listed sources (about 1 ms). The build is used only as a whole: the compiled modules
call each other's compiled code directly and share their native classes, so one changed source makes the whole
build stale, and then every module is imported from its `.py` (one warning on stderr says which source changed).
A finder put first on `sys.meta_path` loads the `.py` of any module of the package that has an extension module
beside it but is not part of a valid build (stale, missing from the manifest, or no manifest at all).

`MTACLUSTER_PURE_PYTHON=1` in the environment makes the process ignore a valid build too (every module from its
`.py`): for the fuzz targets, whose coverage guidance sees only Python code, and to rule the build out when
chasing a bug, without rebuilding.

Output: `BUILD` (a `Build`: "compiled", "pure" or "stale", the modules in use, and a word on why), shown by
`mtacluster --version` and in each role's ready line. Failure modes: none raised; an unreadable or malformed
manifest counts as no build (pure Python).
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.machinery import ModuleSpec
from pathlib import Path
from types import ModuleType

MANIFEST_NAME = "_compiled.json"
PURE_VARIABLE = "MTACLUSTER_PURE_PYTHON"
# The suffixes an extension module's file may have here ('.cpython-311-x86_64-linux-gnu.so', '.abi3.so', '.so').
EXTENSION_SUFFIXES = tuple(importlib.machinery.EXTENSION_SUFFIXES)


@dataclass(frozen=True)
class Build:
    """What `install` found: `state` is "compiled" (the modules run compiled), "pure" (nothing built, or the
    build failed or was disabled) or "stale" (a source changed since the build: everything runs from source)."""

    state: str
    modules: tuple[str, ...]
    detail: str

    def describe(self) -> str:
        """One line for an operator: `compiled (14 modules, mypyc 2.4.1)`, `pure Python (not built)`..."""
        if self.state == "compiled":
            return f"compiled ({len(self.modules)} modules, {self.detail})"
        if self.state == "stale":
            return f"pure Python (compiled modules stale: {self.detail})"
        return f"pure Python ({self.detail})"


def source_digest(path: Path) -> str:
    """SHA-256 of a source file, as the manifest records it."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def module_source(root: Path, module: str) -> Path:
    """`cluster.smtp.server` under `root` -> root/cluster/smtp/server.py."""
    return root.joinpath(*module.split(".")).with_suffix(".py")


def extension_of(source: Path) -> Path | None:
    """The extension module that sits beside `source` (server.py -> server.cpython-311-...so), if any."""
    for suffix in EXTENSION_SUFFIXES:
        candidate = source.with_name(source.stem + suffix)
        if candidate.exists():
            return candidate
    return None


def inspect(package_dir: Path) -> Build:
    """Judge the build of the package at `package_dir` from its manifest and its sources (no import)."""
    try:
        manifest = json.loads((package_dir / MANIFEST_NAME).read_text())
        modules: dict[str, str] = manifest["modules"]
        compiler = str(manifest.get("compiler", "mypyc"))
        reason = str(manifest.get("reason", "not built"))
    except FileNotFoundError:
        return Build("pure", (), "not built")
    except (OSError, ValueError, KeyError, TypeError):
        return Build("pure", (), f"unreadable {MANIFEST_NAME}")
    if not isinstance(modules, dict) or not modules:
        return Build("pure", (), reason)
    root = package_dir.parent
    for module, digest in modules.items():
        source = module_source(root, module)
        try:
            changed = source_digest(source) != digest
        except OSError:
            changed = True
        if changed:
            return Build("stale", (), f"{source.relative_to(root)} changed since the build")
        if extension_of(source) is None:
            return Build("stale", (), f"the extension module of {module} is missing")
    return Build("compiled", tuple(sorted(modules)), compiler)


class SourceOverStaleBuild(importlib.abc.MetaPathFinder):
    """Imports a module of `package` from its `.py` when an extension module beside it is not in `allowed`."""

    def __init__(self, package: str, allowed: Sequence[str]) -> None:
        self.prefix = package + "."
        self.allowed = frozenset(allowed)

    def find_spec(self, fullname: str, path: Sequence[str] | None,
                  target: ModuleType | None = None) -> ModuleSpec | None:
        if path is None or not fullname.startswith(self.prefix) or fullname in self.allowed:
            return None
        leaf = fullname.rpartition(".")[2]
        for directory in path:
            source = Path(directory, leaf + ".py")
            if extension_of(source) is not None and source.is_file():
                return importlib.util.spec_from_file_location(fullname, source)
        return None


def install(package: str, package_dir: Path) -> Build:
    """Judge the build, put the guard first on `sys.meta_path`, warn once on stderr if the build is stale."""
    build = inspect(package_dir)
    if os.environ.get(PURE_VARIABLE) == "1" and build.state != "pure":
        build = Build("pure", (), f"{PURE_VARIABLE}=1")
    sys.meta_path.insert(0, SourceOverStaleBuild(package, build.modules))
    if build.state == "stale":
        sys.stderr.write(f"mtacluster: warning: running pure Python, the compiled modules are stale "
                         f"({build.detail}); `make` rebuilds them\n")
    return build


BUILD = install("cluster", Path(__file__).resolve().parent)
