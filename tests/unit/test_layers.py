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
                                     "cdinn_stream.apps.ioc"])
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
    import cdinn_stream.core.physics
    import cdinn_stream.physics
    from cdinn_stream.reconstruct import load_model

    assert cdinn_stream.physics is cdinn_stream.core.physics
    assert load_model is cdinn_stream.load_model
