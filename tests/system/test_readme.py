"""Every Python snippet in README.md runs as written (in order, in one namespace and one fresh
Python process, as a reader pasting them into one session would), against a real Tiled server
named by the environment the README asks for (``TILED_URL``, ``TILED_API_KEY``)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_the_readme_has_snippets():
    assert len(python_blocks(README.read_text())) >= 3


def test_every_readme_snippet_runs_as_written(tiled_server, tmp_path):
    """In a Python process of their own, started with the settings the README asks for, as a
    reader's session would be (Channel Access reads them once, at its first use)."""
    blocks = python_blocks(README.read_text())
    script = tmp_path / "readme_snippets.py"
    parts = []
    for i, block in enumerate(blocks):
        parts.append(f"print('--- README python block {i + 1}', flush=True)\n{block}")
    parts.append("assert rec['amplitude'].shape[0] == 20, rec['amplitude'].shape  # the live run's 20 frames\n"
                 "print('--- all README python blocks ran', flush=True)\n")
    script.write_text("\n".join(parts))
    from conftest import free_port

    env = {k: v for k, v in os.environ.items()
           if not k.startswith("EPICS_") and k not in ("CDINN_ZMQ_OUT", "CDINN_EPICS_PREFIX", "CDINN_MODEL")}
    port = str(free_port())  # Channel Access as the README asks the session to start: 127.0.0.1, a port of its own
    env.update(TILED_URL=f"http://127.0.0.1:{tiled_server.port}", TILED_API_KEY=tiled_server.api_key,
               CDINN_SPOOL=str(tmp_path / "spool"), EPICS_CA_ADDR_LIST="127.0.0.1", EPICS_CA_AUTO_ADDR_LIST="NO",
               EPICS_CA_SERVER_PORT=port)
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=900)  # cwd: nothing a snippet writes lands in the checkout
    ran = [line for line in done.stdout.splitlines() if line.startswith("--- ")]
    assert done.returncode == 0 and ran[-1] == "--- all README python blocks ran", (
        f"failed in {ran[-1] if ran else 'the first block'}:\n{done.stderr[-4000:]}")
