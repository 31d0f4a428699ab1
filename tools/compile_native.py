"""Compile the hot sans-I/O modules with mypyc, in place, beside their sources (run by the Makefile).

    python tools/compile_native.py              # build (or keep a `make pure` choice); what `make` runs
    python tools/compile_native.py --force      # build even after `make pure` (`make compiled`)
    python tools/compile_native.py --pure       # remove the build, stay pure Python until --force (`make pure`)
    python tools/compile_native.py --remove     # remove every build product (`make clean`)
    python tools/compile_native.py --sources    # print the listed sources (the Makefile's dependencies)

Input: the module list under `[tool.mtacluster.compiled] modules` in pyproject.toml (the one source of truth).
Output: `<module><EXT_SUFFIX>` beside each listed source, the group's shared library
`cluster/_compiled__mypyc<EXT_SUFFIX>`, the C sources and compiler output under `build/mypyc/` (log:
`build/mypyc/build.log`), and the manifest `cluster/_compiled.json` that `cluster/compiled.py` checks at import
(the SHA-256 of each source as compiled; a source edited since then makes the whole build stale).

Failure modes: a failed compile (no C compiler, no Python headers, a mypyc error) removes every product and
writes a manifest saying why, so the package runs pure Python; it prints one warning and exits 0, except with
`CI=true`, where it exits 1 so that nothing in CI runs uncompiled by accident. A module the runtime guard
itself needs (`cluster/__init__.py`, `cluster/compiled.py`) may not be listed (exit 2).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "cluster"
GROUP = f"{PACKAGE}._compiled"  # mypyc names the shared library GROUP + "__mypyc": cluster/_compiled__mypyc*.so
MANIFEST = Path(PACKAGE, "_compiled.json")
BUILD_DIR = Path("build", "mypyc")
NEVER_COMPILED = frozenset({"cluster/__init__.py", "cluster/compiled.py"})
EXTENSION_SUFFIXES = (".so", ".pyd")


def listed_sources(root: Path) -> list[str]:
    """The module list from pyproject.toml, as paths relative to `root` (checked: files that exist)."""
    with (root / "pyproject.toml").open("rb") as file:
        config = tomllib.load(file)
    modules = config.get("tool", {}).get("mtacluster", {}).get("compiled", {}).get("modules", [])
    if not isinstance(modules, list) or not all(isinstance(module, str) for module in modules):
        raise SystemExit("pyproject.toml: [tool.mtacluster.compiled] modules must be a list of paths")
    for module in modules:
        if module in NEVER_COMPILED:
            print(f"compile_native: {module} keeps the guard of compiled modules and cannot be compiled",
                  file=sys.stderr)
            raise SystemExit(2)
        if not (root / module).is_file():
            raise SystemExit(f"pyproject.toml: [tool.mtacluster.compiled] lists {module}, which does not exist")
    return modules


def module_name(source: str) -> str:
    """cluster/smtp/server.py -> cluster.smtp.server."""
    return source.removesuffix(".py").replace("/", ".")


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def remove_products(root: Path) -> list[Path]:
    """Delete every extension module under the package, the manifest and the C build directory."""
    removed = [path for path in (root / PACKAGE).rglob("*") if path.suffix in EXTENSION_SUFFIXES and path.is_file()]
    for path in removed:
        path.unlink()
    (root / MANIFEST).unlink(missing_ok=True)
    shutil.rmtree(root / BUILD_DIR, ignore_errors=True)
    return removed


def write_manifest(root: Path, content: dict[str, object]) -> None:
    path = root / MANIFEST
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(content, indent=1, sort_keys=True) + "\n")
    temporary.replace(path)


def compiler_version() -> str:
    from mypy.version import __version__

    return f"mypyc {__version__}"


def build_step(sources: list[str]) -> None:
    """In a child process (its output goes to the log): mypyc to C, then setuptools' build_ext in place."""
    from mypyc.build import mypycify
    from setuptools import Distribution

    extensions = mypycify(sources, opt_level="3", group_name=GROUP, target_dir=str(BUILD_DIR))
    distribution = Distribution({"name": "mtacluster-compiled", "ext_modules": extensions})
    command = distribution.get_command_obj("build_ext")
    command.inplace = True
    command.build_temp = str(BUILD_DIR / "temp")
    command.parallel = os.cpu_count() or 1
    distribution.run_command("build_ext")


def build(root: Path, sources: list[str], ci: bool) -> int:
    """Compile `sources` under `root`; on failure fall back to pure Python (exit 0), or exit 1 in CI."""
    remove_products(root)
    digests = {module_name(source): digest(root / source) for source in sources}
    if not sources:
        write_manifest(root, {"modules": {}, "reason": "no module listed"})
        return 0
    log = root / BUILD_DIR / "build.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with log.open("w") as output:
        child = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--build-step", *sources], cwd=root,
                               stdout=output, stderr=subprocess.STDOUT, check=False)
    seconds = time.monotonic() - started
    changed = [source for source in sources if digest(root / source) != digests[module_name(source)]]
    if child.returncode == 0 and not changed:
        write_manifest(root, {"modules": digests, "compiler": compiler_version(), "seconds": round(seconds, 1)})
        print(f"compile_native: {len(sources)} modules compiled with {compiler_version()} in {seconds:.0f} s")
        return 0
    why = (f"{', '.join(changed)} changed during the build" if changed
           else f"the compile failed (exit {child.returncode}; no C compiler or Python headers?)")
    tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-15:])
    remove_products(root)
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(tail)
    if ci:
        print(f"compile_native: error: {why}; CI must not run uncompiled. Last lines of the build:\n{tail}",
              file=sys.stderr)
        return 1
    write_manifest(root, {"modules": {}, "reason": f"not compiled: {why}"})
    print(f"compile_native: warning: {why}; mtacluster runs as pure Python (slower). Last lines of the build in "
          f"{BUILD_DIR}/build.log", file=sys.stderr)
    return 0


def disabled(root: Path) -> bool:
    """True when the last run was `--pure` (kept until `--force`)."""
    try:
        return bool(json.loads((root / MANIFEST).read_text()).get("disabled"))
    except (OSError, ValueError, AttributeError):
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--force", action="store_true", help="build even after --pure")
    action.add_argument("--pure", action="store_true", help="remove the build and stay pure Python")
    action.add_argument("--remove", action="store_true", help="remove every build product")
    action.add_argument("--sources", action="store_true", help="print the listed sources")
    action.add_argument("--build-step", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, default=ROOT, help="the repository (default: this script's)")
    args = parser.parse_args(argv)
    root: Path = args.root.resolve()
    os.chdir(root)  # mypyc names modules by their paths relative to the working directory
    if args.build_step:
        build_step(args.build_step)
        return 0
    if args.remove:
        remove_products(root)
        return 0
    sources = listed_sources(root)
    if args.sources:
        print(" ".join(sources))
        return 0
    if args.pure:
        remove_products(root)
        write_manifest(root, {"modules": {}, "reason": "disabled by `make pure` (`make compiled` builds again)",
                              "disabled": True})
        print("compile_native: compiled modules removed; pure Python until `make compiled`")
        return 0
    if disabled(root) and not args.force:
        print("compile_native: pure Python (chosen by `make pure`; `make compiled` builds again)")
        return 0
    return build(root, sources, ci=os.environ.get("CI", "").lower() == "true")


if __name__ == "__main__":
    sys.exit(main())
