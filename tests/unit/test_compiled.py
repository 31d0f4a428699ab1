"""The mypyc build: the import guard that keeps a stale compiled module from shadowing its edited source
(cluster/compiled.py), and the build script's fallback and CI rules (tools/compile_native.py)."""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import cluster
import cluster.smtp.server
from cluster import compiled
from tests.support.tooling import in_ci, skip_or_fail
from tools import compile_native

REPO = Path(__file__).resolve().parents[2]
EXTENSION = compiled.EXTENSION_SUFFIXES[0]


@pytest.fixture
def package(tmp_path: Path) -> Iterator[Path]:
    """A package `fakepkg` (mod.py saying VALUE = "source") with a file that is no extension module at all in
    place of mod's compiled copy: importing it fails, so a test sees which of the two an import took."""
    directory = tmp_path / "fakepkg"
    directory.mkdir()
    (directory / "__init__.py").write_text("")
    (directory / "mod.py").write_text('VALUE = "source"\n')
    (directory / "other.py").write_text('VALUE = "other source"\n')
    (directory / f"mod{EXTENSION}").write_bytes(b"not an ELF object: importing this fails")
    sys.path.insert(0, str(tmp_path))
    before = list(sys.meta_path)
    try:
        yield directory
    finally:
        sys.meta_path[:] = before
        sys.path.remove(str(tmp_path))
        for name in [name for name in sys.modules if name == "fakepkg" or name.startswith("fakepkg.")]:
            del sys.modules[name]


def manifest(directory: Path, modules: dict[str, str]) -> None:
    (directory / compiled.MANIFEST_NAME).write_text(json.dumps({"modules": modules, "compiler": "mypyc test"}))


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def test_an_edited_source_is_imported_instead_of_its_stale_extension(package: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    manifest(package, {"fakepkg.mod": sha256('VALUE = "what was compiled"\n')})
    build = compiled.install("fakepkg", package)
    assert build.state == "stale" and build.modules == ()
    assert "fakepkg/mod.py changed since the build" in build.detail
    assert "compiled modules are stale" in capsys.readouterr().err
    assert importlib.import_module("fakepkg.mod").VALUE == "source"


def test_an_extension_without_a_manifest_does_not_shadow_its_source(package: Path) -> None:
    build = compiled.install("fakepkg", package)
    assert (build.state, build.detail) == ("pure", "not built")
    assert importlib.import_module("fakepkg.mod").VALUE == "source"


def test_a_valid_build_is_imported_compiled(package: Path) -> None:
    manifest(package, {"fakepkg.mod": sha256('VALUE = "source"\n')})
    build = compiled.install("fakepkg", package)
    assert build.state == "compiled" and build.modules == ("fakepkg.mod",)
    assert build.describe() == "compiled (1 modules, mypyc test)"
    with pytest.raises(ImportError):  # the guard let the import system take the extension module (no ELF here)
        importlib.import_module("fakepkg.mod")


def test_one_changed_source_makes_the_whole_build_stale(package: Path) -> None:
    (package / f"other{EXTENSION}").write_bytes(b"not an ELF object either")
    manifest(package, {"fakepkg.mod": sha256('VALUE = "source"\n'), "fakepkg.other": sha256("VALUE = 1\n")})
    build = compiled.install("fakepkg", package)
    assert build.state == "stale" and "fakepkg/other.py changed" in build.detail
    # mod itself is unchanged, but compiled code calls its compiled peers directly: it runs from source too.
    assert importlib.import_module("fakepkg.mod").VALUE == "source"
    assert importlib.import_module("fakepkg.other").VALUE == "other source"


def test_a_missing_extension_makes_the_build_stale(package: Path) -> None:
    (package / f"mod{EXTENSION}").unlink()
    manifest(package, {"fakepkg.mod": sha256('VALUE = "source"\n')})
    assert compiled.inspect(package).detail == "the extension module of fakepkg.mod is missing"


def test_the_pure_python_switch_ignores_a_valid_build(package: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    manifest(package, {"fakepkg.mod": sha256('VALUE = "source"\n')})
    monkeypatch.setenv(compiled.PURE_VARIABLE, "1")
    build = compiled.install("fakepkg", package)
    assert build.describe() == f"pure Python ({compiled.PURE_VARIABLE}=1)"
    assert importlib.import_module("fakepkg.mod").VALUE == "source"


def test_a_failed_or_unreadable_build_is_pure_python(package: Path) -> None:
    (package / compiled.MANIFEST_NAME).write_text(json.dumps({"modules": {}, "reason": "not compiled: no gcc"}))
    assert compiled.inspect(package).describe() == "pure Python (not compiled: no gcc)"
    (package / compiled.MANIFEST_NAME).write_text("{")
    assert compiled.inspect(package).state == "pure"


def test_the_version_says_whether_the_compiled_modules_run() -> None:
    result = subprocess.run([sys.executable, "-m", "cluster", "--version"], capture_output=True, text=True,
                            check=True, cwd=REPO)
    assert result.stdout.strip().endswith(cluster.compiled.BUILD.describe())


def test_ci_runs_the_compiled_modules() -> None:
    """In CI the build must be in use (tools/compile_native.py fails the build rather than fall back)."""
    if not in_ci():
        pytest.skip("only CI insists on the compiled modules (a laptop may lack a C compiler)")
    assert cluster.compiled.BUILD.state == "compiled", cluster.compiled.BUILD.describe()
    assert Path(cluster.smtp.server.__file__ or "").name.endswith(EXTENSION)


def test_the_real_build_steps_aside_for_an_edited_source(tmp_path: Path) -> None:
    """A copy of this checkout's compiled package: as built, the compiled modules are imported; after an edit
    of one listed source, every module comes from its .py and one warning says why."""
    if cluster.compiled.BUILD.state != "compiled":
        skip_or_fail(f"needs the compiled modules (`make compiled`): {cluster.compiled.BUILD.describe()}")
    shutil.copytree(REPO / "cluster", tmp_path / "cluster", ignore=shutil.ignore_patterns("__pycache__"))
    probe = ("import cluster, cluster.smtp.server as s, cluster.smtp.lines as l; "
             "print(cluster.compiled.BUILD.state, s.__file__, l.__file__, getattr(l, 'EDITED', False))")
    environment = {**os.environ, "PYTHONPATH": str(tmp_path)}
    environment.pop(compiled.PURE_VARIABLE, None)

    def run() -> tuple[list[str], str]:
        result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                                cwd=tmp_path, env=environment)
        return result.stdout.split(), result.stderr

    (state, server, lines, edited), stderr = run()
    assert state == "compiled" and server.endswith(EXTENSION) and lines.endswith(EXTENSION) and stderr == ""
    assert server.startswith(str(tmp_path))
    with (tmp_path / "cluster" / "smtp" / "lines.py").open("a") as source:
        source.write("\nEDITED = True\n")
    (state, server, lines, edited), stderr = run()
    assert (state, edited) == ("stale", "True")
    assert server.endswith("server.py") and lines.endswith("lines.py")
    assert "cluster/smtp/lines.py changed since the build" in stderr and stderr.count("\n") == 1


def test_the_guard_modules_cannot_be_listed(tmp_path: Path) -> None:
    (tmp_path / "cluster").mkdir()
    (tmp_path / "cluster" / "compiled.py").write_text("")
    (tmp_path / "pyproject.toml").write_text('[tool.mtacluster.compiled]\nmodules = ["cluster/compiled.py"]\n')
    with pytest.raises(SystemExit) as stopped:
        compile_native.listed_sources(tmp_path)
    assert stopped.value.code == 2


def test_the_module_list_is_the_one_in_pyproject() -> None:
    listed = compile_native.listed_sources(REPO)
    assert listed and all(source.startswith("cluster/") and source.endswith(".py") for source in listed)
    if cluster.compiled.BUILD.state == "compiled":
        assert set(cluster.compiled.BUILD.modules) == {compile_native.module_name(source) for source in listed}


@pytest.fixture
def tiny_project(tmp_path: Path) -> Path:
    """A project with one small module listed for compilation."""
    (tmp_path / "cluster").mkdir()
    (tmp_path / "cluster" / "__init__.py").write_text("")
    (tmp_path / "cluster" / "tiny.py").write_text("def double(x: int) -> int:\n    return 2 * x\n")
    (tmp_path / "pyproject.toml").write_text('[tool.mtacluster.compiled]\nmodules = ["cluster/tiny.py"]\n')
    return tmp_path


def run_build(root: Path, *, ci: bool, compiler: str) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "CC": compiler, "CI": "true" if ci else "false"}
    return subprocess.run([sys.executable, str(REPO / "tools" / "compile_native.py"), "--root", str(root)],
                          capture_output=True, text=True, env=environment, timeout=300, check=False)


def test_a_failed_compile_falls_back_to_pure_python_with_one_warning(tiny_project: Path) -> None:
    result = run_build(tiny_project, ci=False, compiler="false")
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("warning") == 1 and "runs as pure Python" in result.stderr
    assert compiled.inspect(tiny_project / "cluster").describe().startswith("pure Python (not compiled: ")
    assert not list((tiny_project / "cluster").glob("*.so"))


def test_a_failed_compile_fails_the_build_in_ci(tiny_project: Path) -> None:
    result = run_build(tiny_project, ci=True, compiler="false")
    assert result.returncode == 1 and "CI must not run uncompiled" in result.stderr
    assert not (tiny_project / "cluster" / compiled.MANIFEST_NAME).exists()
    assert not list((tiny_project / "cluster").glob("*.so"))
