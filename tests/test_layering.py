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
