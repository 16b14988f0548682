"""The layers import downwards only: shared/ (the method) knows nothing of who runs it, and the
server and the client meet only through shared/ (the messages they exchange), never each other.

Read from the source with ast, lazy imports inside functions included, so a violation fails here
rather than as an import cycle or a client that needs the server's code installed."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# package -> the top-level packages its modules must not import
FORBIDDEN = {"shared": {"server", "client", "sim"}, "server": {"client"}, "client": {"server"}}


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file: statements anywhere in it, and
    importlib.import_module / __import__ calls with a literal name."""
    package = path.relative_to(ROOT).with_suffix("").parts[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            # `from ..x import y` in a/b/c.py: level 1 is a.b, level 2 is a
            base = list(package[:len(package) - node.level + 1]) if node.level else []
            found.append((node.lineno, ".".join(base + ([node.module] if node.module else []))))
        elif isinstance(node, ast.Call) and _is_dynamic_import(node.func) and node.args:
            name = node.args[0]
            if isinstance(name, ast.Constant) and isinstance(name.value, str):
                found.append((node.lineno, name.value))
    return found


def _is_dynamic_import(func: ast.expr) -> bool:
    return (isinstance(func, ast.Attribute) and func.attr == "import_module") or \
        (isinstance(func, ast.Name) and func.id in ("import_module", "__import__"))


def offenders(package: str) -> list[str]:
    bad = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for line, module in imports(path):
            if module.split(".")[0] in FORBIDDEN[package]:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    return bad


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_go_down_the_layers_only(package):
    bad = offenders(package)
    assert not bad, f"{package}/ must not import {', '.join(sorted(FORBIDDEN[package]))}:\n" + "\n".join(bad)


def test_the_import_reader_sees_every_kind_of_import(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    mod = tmp_path / "server" / "strategies" / "x.py"
    mod.parent.mkdir(parents=True)
    mod.write_text("import shared.data.lamp as lamp\n"
                   "from . import base\n"
                   "from ..stages import run\n"
                   "def later():\n"
                   "    from client.trainer import ClientTrainer\n"
                   "    importlib.import_module('sim.run')\n")
    assert [m for _, m in imports(mod)] == ["shared.data.lamp", "server.strategies", "server.stages",
                                            "client.trainer", "sim.run"]
    assert offenders("server") == ["server/strategies/x.py:5 imports client.trainer"]


def test_bench_imports_from_any_directory(tmp_path):
    """bench/ is a declared package (pyproject: packages.find), not a folder on sys.path."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([sys.executable, "-c", "import bench.common"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
