"""`cdinn-stream demo` end to end, and the simulation profile's startup file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cdinn_stream.apps.demo import summary_table


@pytest.mark.parametrize("detector", [[], ["--detector", "eiger1m"]], ids=["128x128", "eiger1m"])
def test_demo_runs_the_whole_pipeline(tmp_path, detector):
    """`cdinn-stream demo --json` as a user runs it: its own process, its own IOC and Tiled server;
    also on native EIGER 1M frames (module gaps, the peak tracked)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EPICS_")}
    n = 20 if detector else 40
    proc = subprocess.run([sys.executable, "-m", "cdinn_stream", "demo", "--frames", str(n), "--json", "--out",
                           str(tmp_path), *detector], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads(proc.stdout[proc.stdout.index("{"):])
    f = s["frames"]
    assert f["events"] == f["in"] == f["out"] == f["in_tiled"] == f["over_zeromq"] == f["epics_frames_pv"] == n
    assert f["dropped"] == 0 and f["rejected"] == 0
    assert s["replay"]["frames"] == n
    # the same frames may be batched differently live and in replay: equal up to the rounding of
    # the inference precision (bf16 keeps ~3 significant digits)
    tol = 1e-4 if s["precision"] == "fp32" else 0.05
    assert s["replay"]["max_abs_diff_amplitude"] < tol and s["replay"]["max_abs_diff_phase"] < tol
    assert 0 <= s["accuracy"]["support_iou"]["median"] <= 1
    if detector:  # the peak found on the big frame: the crops are the crystal's
        assert s["config"]["frame_shape"] == [1065, 1030] and s["accuracy"]["support_iou"]["median"] > 0.8
    assert (tmp_path / "montage.png").stat().st_size > 10_000
    assert json.loads((tmp_path / "summary.json").read_text())["run_uid"] == s["run_uid"]
    assert "latency p50 / p99" in summary_table(s)


def test_profile_startup_only_calls_the_package(monkeypatch):
    startup = Path(__file__).parents[2] / "profiles" / "cdinn_sim" / "startup" / "00-cdinn.py"
    for var in ("TILED_URL", "CDINN_ZMQ_OUT", "CDINN_EPICS_PREFIX"):
        monkeypatch.delenv(var, raising=False)
    namespace: dict = {}
    exec(compile(startup.read_text(), str(startup), "exec"), namespace)
    from bluesky.plans import count

    RE, cdinn = namespace["RE"], namespace["cdinn"]
    (uid,) = RE(count([namespace["bcdi"]], num=3))
    assert cdinn.flush(30)
    assert cdinn.stats()["frames_out"] == 3
    cdinn.close()
    code = [line for line in startup.read_text().splitlines() if line and not line.startswith("#")]
    assert all(line.startswith(("from cdinn_stream", "beamline =", "RE,")) for line in code)
