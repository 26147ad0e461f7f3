"""The package's layers hold (import-linter contracts in pyproject.toml) and stay light where they must."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "cdinn_stream"


def test_import_contracts_hold():
    """``lint-imports`` checks the layers and the forbidden imports declared in pyproject.toml."""
    pytest.importorskip("importlinter")
    done = subprocess.run([sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; "
                           "sys.exit(lint_imports_command())"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout


@pytest.mark.parametrize("modules", ["cdinn_stream.sinks", "cdinn_stream.apps.listen", "cdinn_stream.listen",
                                     "cdinn_stream.apps.ioc", "cdinn_stream.apps.view"])
def test_loads_without_torch(modules):
    """The sinks and ``cdinn-stream listen`` run on a machine without torch (a viewer, an IOC host)."""
    code = f"import sys, {modules}; assert 'torch' not in sys.modules, 'torch was imported'"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def _private_imports() -> list[str]:
    found = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module != "__future__":
                for alias in node.names:
                    if alias.name.startswith("_") and not alias.name.startswith("__"):
                        found.append(f"{path.relative_to(ROOT)}: from {node.module} import {alias.name}")
    return found


def test_no_module_imports_another_modules_private_names():
    assert _private_imports() == []


def test_old_flat_import_paths_still_work():
    """Code written against the flat layout (``cdinn_stream.physics``, ...) keeps working."""
    import cdinn_stream.physics
    from cdinn_stream.reconstruct import load_model

    import cdinn_stream.core.physics

    assert cdinn_stream.physics is cdinn_stream.core.physics
    assert load_model is cdinn_stream.load_model


def _import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports at run time (typing-only imports left out)."""
    grimp = pytest.importorskip("grimp")
    graph = grimp.build_graph("cdinn_stream", exclude_type_checking_imports=True)
    return {m: graph.find_modules_directly_imported_by(m) - {"cdinn_stream"} for m in graph.modules}


def test_the_import_graph_has_no_cycles_and_at_most_nine_floors():
    """Fewer floors than the flat package's 11 (modules importing modules importing ...), no cycles."""
    deps = _import_graph()
    floors: dict[str, int] = {}

    def floor(module: str, path: tuple[str, ...] = ()) -> int:
        assert module not in path, f"import cycle: {' -> '.join(path + (module,))}"
        if module not in floors:
            floors[module] = 1 + max((floor(d, path + (module,)) for d in deps[module]), default=0)
        return floors[module]

    deepest = max(deps, key=floor)
    assert floor(deepest) <= 9, f"{deepest} sits on floor {floor(deepest)}"
