"""Replay against a stock Tiled server started the documented way (``tiled serve catalog --temp
--api-key KEY``): inline frames and ``.npy`` frames replay; a replay that reconstructs nothing
fails loudly; a missing API key is one line naming ``--api-key``."""

from __future__ import annotations

from pathlib import Path

import pytest
from bluesky import RunEngine
from bluesky.plans import count

from cdinn_stream.lab.sim import BCDIFrameSource, OperandoCrystal, make_detector, make_motors

FRAMES = 6


def _store_run(client, tmp_path: Path, *, external: bool | str) -> str:
    """A run of the simulated detector stored by TiledWriter: frames inline (``external=False``), one
    ``.npy`` per frame (``True``), or HDF5 of ophyd-async's SimBlobDetector (``"hdf5"``)."""
    from bluesky_tiled_plugins import TiledWriter

    if external == "hdf5":
        from ophyd_async.core import StaticPathProvider, UUIDFilenameProvider, init_devices
        from ophyd_async.sim import SimBlobDetector

        RE = RunEngine({})  # first: its event loop connects the device
        with init_devices():
            blob = SimBlobDetector(StaticPathProvider(UUIDFilenameProvider(), tmp_path))
        RE.subscribe(TiledWriter(client))
        (uid,) = RE(count([blob], FRAMES))
        return uid

    peak, strain = make_motors(64)
    source = BCDIFrameSource(OperandoCrystal(32, seed=2), frame_shape=(128, 128), peak_motor=peak,
                             strain_motor=strain, seed=2)
    detector = make_detector(source, external=external, save_path=str(tmp_path) if external else None)
    RE = RunEngine({})
    RE.subscribe(TiledWriter(client))
    (uid,) = RE(count([detector], FRAMES))
    return uid


def _replay(uri: str, uid: str, *args: str, key: str | None, monkeypatch, capsys) -> tuple[int, str]:
    """``cdinn-stream replay UID --tiled URI`` as a user runs it (the key from ``TILED_API_KEY``, if
    any): its exit status and what it wrote to stderr."""
    from cdinn_stream.apps.cli import main

    if key:
        monkeypatch.setenv("TILED_API_KEY", key)
    else:
        monkeypatch.delenv("TILED_API_KEY", raising=False)
    capsys.readouterr()
    status = main(["replay", uid, "--tiled", uri, "--device", "cpu", *args])
    return status, capsys.readouterr().err


@pytest.mark.parametrize("external", [False, True, "hdf5"], ids=["inline-frames", "npy-files", "hdf5-files"])
def test_replay_from_a_stock_tiled_server(stock_tiled, tmp_path, external, monkeypatch, capsys):
    uri, key, client = stock_tiled
    uid = _store_run(client, tmp_path, external=external)
    status, err = _replay(uri, uid, key=key, monkeypatch=monkeypatch, capsys=capsys)
    assert status == 0, err[-3000:]
    result = client["cdinn-replay"][uid]
    assert result.metadata["complete"] is True
    assert result["amplitude"].shape[0] == FRAMES


def test_replay_that_reconstructs_nothing_fails(stock_tiled, tmp_path, monkeypatch, capsys):
    uri, key, client = stock_tiled
    uid = _store_run(client, tmp_path, external=True)
    for f in tmp_path.glob("*.npy"):  # the detector's files are gone: no frame can be read
        f.unlink()
    status, err = _replay(uri, uid, key=key, monkeypatch=monkeypatch, capsys=capsys)
    assert status != 0
    assert "reconstructed no frame" in err and "unreadable" in err
    assert client["cdinn-replay"][uid].metadata["complete"] is False


def test_replay_without_an_api_key_says_how_to_give_one(stock_tiled, tmp_path, monkeypatch, capsys):
    uri, key, client = stock_tiled
    uid = _store_run(client, tmp_path, external=False)
    status, err = _replay(uri, uid, key=None, monkeypatch=monkeypatch, capsys=capsys)  # main() raised nothing
    assert status == 2
    assert len(err.strip().splitlines()) == 1  # one line, no traceback
    assert "--api-key" in err and "TILED_API_KEY" in err


def test_a_run_with_a_baseline_stream_replays_in_time_order(stock_tiled, tmp_path, monkeypatch, capsys):
    """Several streams: every descriptor first, then the pages of all streams by time."""
    from bluesky.preprocessors import SupplementalData
    from bluesky_tiled_plugins import TiledWriter

    from cdinn_stream.apps.replay import run_documents

    uri, key, client = stock_tiled
    peak, strain = make_motors(64)
    source = BCDIFrameSource(OperandoCrystal(32, seed=3), frame_shape=(128, 128), peak_motor=peak,
                             strain_motor=strain, seed=3)
    RE = RunEngine({})
    RE.preprocessors.append(SupplementalData(baseline=[peak, strain]))
    RE.subscribe(TiledWriter(client))
    (uid,) = RE(count([make_detector(source)], FRAMES))
    docs = list(run_documents(client, uid))
    names = [n for n, _ in docs]
    assert names[0] == "start" and names[-1] == "stop"
    assert names.count("descriptor") == 2 and max(i for i, n in enumerate(names) if n == "descriptor") < \
        min(i for i, n in enumerate(names) if n == "event_page")
    first_times = [d["time"][0] for n, d in docs if n == "event_page"]
    assert first_times == sorted(first_times) and len(first_times) == 2  # a page per stream
    status, err = _replay(uri, uid, key=key, monkeypatch=monkeypatch, capsys=capsys)
    assert status == 0, err[-3000:]
    assert client["cdinn-replay"][uid]["amplitude"].shape[0] == FRAMES
