"""The library's layers: training never loads the plotting stack, and methods/ and partitions/ (the pieces a
user adds to) depend only on the library core, never on the application layer (fedsim.run, scripts, bench)."""
import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
APPLICATION = ("fedsim.run", "scripts", "bench")


def test_importing_the_library_does_not_load_matplotlib():
    code = ("import sys, pkgutil, importlib, fedsim, methods, partitions\n"
            "for m in pkgutil.iter_modules(fedsim.__path__): importlib.import_module('fedsim.' + m.name)\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('matplotlib', 'scripts')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def imported_modules(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module


def test_methods_and_partitions_do_not_import_the_application_layer():
    files = sorted((ROOT / "methods").glob("*.py")) + sorted((ROOT / "partitions").glob("*.py"))
    assert len(files) > 5
    bad = [(f.relative_to(ROOT).as_posix(), m) for f in files for m in imported_modules(f)
           if m == APPLICATION[0] or m.split(".")[0] in APPLICATION[1:]]
    assert not bad, bad


def test_the_core_never_imports_methods():
    """The engine owns the interface (fedsim/interface.py) and methods implement it: no module of the core
    imports methods/, not even inside a function (the old stacked <-> methods.base cycle). fedsim.run, the
    application layer, is the one module of fedsim/ that builds a method from a config."""
    core = [f for f in sorted((ROOT / "fedsim").glob("*.py")) if f.stem != "run"]
    assert len(core) > 20
    bad = [(f.relative_to(ROOT).as_posix(), m) for f in core for m in imported_modules(f)
           if m.split(".")[0] == "methods"]
    assert not bad, bad


def test_methods_use_the_interface_and_never_build_a_container():
    """A method names its container (Method.container -> fedsim.interface.ContainerSpec); it never imports the
    container classes, so the containers can change without touching a method."""
    files = sorted((ROOT / "methods").glob("*.py"))
    bad = [(f.relative_to(ROOT).as_posix(), m) for f in files for m in imported_modules(f)
           if m in ("fedsim.stacked", "fedsim.full_stacked", "fedsim.containers", "fedsim.engine")]
    assert not bad, bad
