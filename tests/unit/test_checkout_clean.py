"""Nothing a user runs writes into the checkout: every command's default output folder is git-ignored."""

from __future__ import annotations

import argparse
import shutil
import subprocess
from pathlib import Path

import pytest

from cdinn_stream.apps.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]


def _default_outputs() -> dict[str, str]:
    outs = {}
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name, parser in sub.choices.items():
        for action in parser._actions:
            if action.dest == "out" and isinstance(action.default, str):
                outs[name] = action.default
    outs["bench"] = "bench-output"  # set in _cmd_bench (its default depends on --device)
    return outs


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="needs a git checkout")
@pytest.mark.parametrize("command", sorted(_default_outputs()))
def test_default_output_folders_are_git_ignored(command):
    out = _default_outputs()[command]
    probe = f"{out}/probe.json"
    done = subprocess.run(["git", "check-ignore", "-q", probe], cwd=ROOT)
    assert done.returncode == 0, f"`cdinn-stream {command}` writes {out}/ by default, which git does not ignore"
