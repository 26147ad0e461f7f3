"""Every Python snippet in README.md runs as written (in order, in one namespace, as a reader
pasting them into one session would), against a real Tiled server named by the environment the
README asks for (``TILED_URL``, ``TILED_API_KEY``)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_the_readme_has_snippets():
    assert len(python_blocks(README.read_text())) >= 3


def test_every_readme_snippet_runs_as_written(tiled_server, monkeypatch, tmp_path):
    monkeypatch.setenv("TILED_URL", f"http://127.0.0.1:{tiled_server.port}")
    monkeypatch.setenv("TILED_API_KEY", tiled_server.api_key)
    monkeypatch.setenv("CDINN_SPOOL", str(tmp_path / "spool"))
    for var in ("CDINN_ZMQ_OUT", "CDINN_EPICS_PREFIX", "CDINN_MODEL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)  # nothing a snippet writes lands in the checkout
    namespace: dict = {"__name__": "__readme__"}
    for i, block in enumerate(python_blocks(README.read_text())):
        try:
            exec(compile(block, f"README.md python block {i + 1}", "exec"), namespace)
        except Exception as err:
            pytest.fail(f"README python block {i + 1} failed: {type(err).__name__}: {err}\n{block}")
    assert namespace["rec"]["amplitude"].shape[0] == 20  # the live run's 20 frames, read back
