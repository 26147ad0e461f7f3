"""The simulation profile, started the documented way (``ipython --profile-dir=profiles/cdinn_sim``
from the checkout), builds its pipeline and writes nothing into the checkout."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROFILE = ROOT / "profiles" / "cdinn_sim"


def _status(*args: str) -> set[str]:
    out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all", *args], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    return set(out.splitlines())


def _profile_files() -> set[Path]:
    return {p for p in PROFILE.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_the_profile_leaves_the_checkout_as_it_was(tmp_path):
    pytest.importorskip("IPython")
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs the git checkout")
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("CDINN_", "TILED_", "EPICS_", "IPYTHON", "XDG_", "JUPYTER"))}
    env.update(HOME=str(home), OMP_NUM_THREADS="1")
    # new untracked files anywhere; anything at all under profiles/ (ignored files too)
    before, before_profile, before_files = _status(), _status("--ignored", "--", "profiles"), _profile_files()
    folders = {p for p in PROFILE.rglob("*") if p.is_dir()}
    try:
        proc = subprocess.run([sys.executable, "-m", "IPython", "--profile-dir=profiles/cdinn_sim", "--no-banner",
                               "-c", "print('callback:', type(cdinn).__name__, len(cdinn.engine.sink_threads))"],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    finally:  # IPython makes a profile's empty log/, pid/, security/, db/ (git does not see empty folders)
        for folder in sorted({p for p in PROFILE.rglob("*") if p.is_dir()} - folders, reverse=True):
            if not any(folder.iterdir()):
                folder.rmdir()
    assert "callback: ReconstructionCallback 0" in proc.stdout, (proc.stdout[-3000:], proc.stderr[-3000:])
    new_untracked = {line for line in _status() - before if line.startswith(("??", "!!"))}
    assert not new_untracked, new_untracked
    assert _status("--ignored", "--", "profiles") == before_profile
    assert _profile_files() == before_files, _profile_files() - before_files
    # the command history went to the user's cache
    assert list((home / ".cache").rglob("*.sqlite")), list(home.rglob("*"))
