"""Detector suite: native-size frames (256x256, EIGER 1M, EIGER 4M) end to end at detector rates.

For each frame size, frames of :func:`~cdinn_stream.lab.sim.native_frames` (module gaps, a drifting
Bragg peak, Poisson counts, hot pixels; uint32 as EIGERs give them) go through the
:class:`~cdinn_stream.ReconstructionCallback` (peak tracking on, the default model) to a ZeroMQ
subscriber in its own process, as:

* ``inline``: event pages of arrays (``page`` frames each);
* ``stream_resource``: an uncompressed HDF5 file and ``stream_resource``/``stream_datum``
  documents, as ophyd-async writes them (``page`` frames a datum);
* ``resource_datum``: the same file as AreaDetector's ``AD_HDF5`` resource/datum documents, event
  pages of ``page`` datums;
* ``bslz4``: a bitshuffle-LZ4 compressed file (``hdf5plugin``) through ``stream_resource``.

The files hold a few hundred frames (a 4M frame is 18 MB); a run cycles through them, so every
few hundred frames the peak jumps back (a fallback to a full search, counted). frames/s is
end to end: from the first document to the last result received by the subscriber; every frame
is counted (``received``, ``rejected``). Beside it, per frame in the same run: one plain read of a
frame (``frame.sum()``, the practical limit of any full-frame work), a whole-frame search + crop of a
frame (as a run's first frame, a check or a fallback: :func:`~cdinn_stream.live.crop.coarse_peaks`
and the window around the rough peak),
the tracked search + crop (in memory), cutting the frames to 256-pixel windows as the pool's publisher
does (``JetStreamPublisher(window=256)``: the tracked search and the cut, on the RunEngine's thread),
reading a tracked window from the file, decompressing a
whole compressed frame, and the model at batch 256. With ``tiled=True`` the 1M
``stream_resource`` run is repeated with a Tiled server as a second sink.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from cdinn_stream.core.physics import normalized_amplitude
from cdinn_stream.core.timing import time_call
from cdinn_stream.lab.detector import run_documents, write_frames
from cdinn_stream.lab.sim import EIGER_1M, EIGER_4M, DetectorGeometry, native_frames
from cdinn_stream.live.callback import FrameCropper, ReconstructionCallback
from cdinn_stream.live.frames import HDF5Files
from cdinn_stream.live.windows import PeakWindows
from cdinn_stream.nn.reconstruct import load_model
from cdinn_stream.sinks import TiledSink, ZmqPublisherSink

from .pipeline import Subscriber, TiledProcess

SMALL = DetectorGeometry("256x256", (1, 1), module=(256, 256), gap=(0, 0))
#: frame size -> (geometry, frames in the file, frames a run)
SIZES = {"256x256": (SMALL, 512, 30_000), "1M": (EIGER_1M, 192, 9_000), "4M": (EIGER_4M, 48, 3_000)}
MODES = ("inline", "stream_resource", "resource_datum", "bslz4")
PAGE = 100


def _documents(mode: str, path: Path, n: int, pool: int, shape: tuple[int, int], page: int):
    """``(name, doc)`` of a run of ``n`` frames from the ``pool`` frames of the file at ``path``."""
    layout = "area-detector" if mode == "resource_datum" else "ophyd-async"
    for name, doc in run_documents(path, n, shape, layout=layout, page=page):
        if name == "stream_datum":  # frames start..stop of the run are frames start % pool.. of the file
            start, stop = doc["indices"]["start"], doc["indices"]["stop"]
            first = start % pool
            if first + (stop - start) > pool:
                first = 0
            doc = {**doc, "indices": {"start": first, "stop": first + stop - start}}
        elif name == "datum":  # the same, page by page
            i = doc["datum_kwargs"]["point_number"]
            first = (i - i % page) % pool
            if first + page > pool:
                first = 0
            doc = {**doc, "datum_kwargs": {"point_number": first + i % page}}
        yield name, doc


def _inline_documents(frames: np.ndarray, n: int, page: int):
    from event_model import compose_run

    run = compose_run(metadata={"purpose": "cdinn-stream detector benchmark"})
    yield "start", run.start_doc
    desc = run.compose_descriptor(name="primary", data_keys={
        "eiger": {"source": "sim", "dtype": "array", "shape": list(frames.shape[1:])}})
    yield "descriptor", desc.descriptor_doc
    for i in range(0, n, page):
        count = min(page, n - i)
        first = i % len(frames)
        if first + count > len(frames):  # the pool's frames as they lie (a view, not a copy), page by page
            first = 0
        now = time.time()
        yield "event_page", desc.compose_event_page(
            data={"eiger": frames[first : first + count]}, timestamps={"eiger": [now] * count},
            seq_num=list(range(i + 1, i + 1 + count)), time=[now] * count, validate=False)
    yield "stop", run.compose_stop()


def end_to_end(model, mode: str, frames: np.ndarray, mask: np.ndarray, path: Path | None, n: int, page: int,
               workdir: Path, tiled: TiledProcess | None = None) -> dict:
    """frames/s of one run from the first document to the last result at a ZeroMQ subscriber."""
    zmq_sink = ZmqPublisherSink("tcp://127.0.0.1:0")
    sub = Subscriber(zmq_sink, n, workdir, idle=20.0)  # frames lost on the way must not hang the suite
    sinks = [zmq_sink] + ([TiledSink(tiled.client(), parent="bench")] if tiled is not None else [])
    cb = ReconstructionCallback(model=model, sinks=sinks, mask=mask)
    # the file runs' documents made beforehand (composing and validating them is the RunEngine's
    # work, not the pipeline's); inline pages are made as they go (they hold the frames)
    docs = (_inline_documents(frames, n, page) if mode == "inline"
            else list(_documents(mode, path, n, len(frames), frames.shape[1:], page)))
    t0 = time.time()
    submitted = 0
    for name, doc in docs:
        cb(name, doc)
        if name == "start":
            uid = doc["uid"]
    done = cb.flush(timeout=1200)
    submitted = time.time() - t0
    got = sub.result(timeout=600)
    t_end = max(time.time(), got["arrival"].max() if len(got["arrival"]) else 0)
    stats = cb.stats()
    summary = cb.engine.stats.summary()
    cb.close()
    zmq_sink.close()
    row = {"frames": n, "page": page, "seconds": t_end - t0, "fps": n / (t_end - t0), "flushed": done,
           "documents_seconds": submitted, "received": int(len(got["arrival"])), "rejected": dict(stats["rejected"]),
           "frames_out": summary.get("frames_out"), "dropped": summary.get("frames_dropped")}
    if tiled is not None:
        stored = tiled.client()["bench"]
        row["frames_in_tiled"] = int(stored[uid]["frame_info"].shape[0]) if uid in stored else 0
        row["tiled"] = stats["sinks"].get("TiledSink")
    return row


def stages(model, frames: np.ndarray, mask: np.ndarray, path: Path, compressed: Path | None) -> dict:
    """Per-frame times (microseconds) of each stage on its own, in this run."""
    n = len(frames)
    out: dict = {}
    out["frame_sum_us"] = time_call(lambda: [f.sum() for f in frames[:32]], repeat=3) / 32 * 1e6
    whole = FrameCropper(model.size, mask=mask)

    def searched_whole():  # each frame searched whole (coarse pass, then its window; a check), cropped
        for i in range(8):
            whole.tracker("r", "p").last = None  # nothing to track from: the frame is searched whole
            whole.block("r", "p", frames[i : i + 1], np.arange(1), np.zeros(1))

    out["full_search_crop_us"] = time_call(searched_whole, repeat=3) / 8 * 1e6

    def tracked():
        c = FrameCropper(model.size, mask=mask)
        for i in range(0, n, PAGE):
            c.block("r", "p", frames[i : i + PAGE], np.arange(i, min(i + PAGE, n)), np.zeros(min(PAGE, n - i)))

    out["tracked_search_crop_us"] = time_call(tracked, repeat=3) / n * 1e6

    def cut_to_windows():  # what JetStreamPublisher(window=256) does on the RunEngine's thread
        windows = PeakWindows(256, mask=mask)
        desc = {"uid": "d", "run_start": "r", "data_keys": {"img": {"shape": list(frames.shape[1:]), "dtype": "array",
                                                                    "source": "sim"}}}
        windows.descriptor(desc)
        for i in range(0, n, PAGE):
            k = min(PAGE, n - i)
            windows.event_page({"descriptor": "d", "seq_num": list(range(i, i + k)), "data": {"img": frames[i : i + k]},
                                "timestamps": {"img": [0.0] * k}})

    if min(frames.shape[1:]) > 256:  # frames no larger than a window are sent whole
        out["publisher_window_us"] = time_call(cut_to_windows, repeat=3) / n * 1e6
    files = HDF5Files()
    side = 4 * (model.size + 2)
    r0, c0 = frames.shape[1] // 3, frames.shape[2] // 3
    lazy = files.frames(str(path), "/entry/data/data", 0, n)  # as the pipeline reads them (mapped)
    out["read_window_us"] = time_call(lambda: [lazy[i : i + PAGE, r0 : r0 + side, c0 : c0 + side]
                                               for i in range(0, n, PAGE)], repeat=3) / n * 1e6
    out["read_frame_us"] = time_call(lambda: lazy[0:8], repeat=3) / 8 * 1e6
    if compressed is not None:
        packed = files.frames(str(compressed), "/entry/data/data", 0, 8)
        out["read_bslz4_frame_us"] = time_call(lambda: packed[:], repeat=3) / 8 * 1e6
        out["read_bslz4_window_us"] = time_call(lambda: packed[:, r0 : r0 + side, c0 : c0 + side], repeat=3) / 8 * 1e6
        out["bslz4_ratio"] = compressed.stat().st_size / path.stat().st_size
    files.close()
    crops = normalized_amplitude(np.resize(FrameCropper(model.size, mask=mask, track=False).block(
        "r", "p", frames[:8], np.arange(8), np.zeros(8)).frames, (256, model.size, model.size))).to(model.device)
    out["model_us"] = time_call(lambda: model.predict_tensor(crops), repeat=5) / 256 * 1e6
    return out


def run(model_name: str, *, quick: bool = False, tiled: bool = True, modes: tuple[str, ...] = MODES) -> dict:
    """The suite (see the module docstring)."""
    model = load_model(model_name)
    results: dict = {"model": model.name, "precision": model.precision, "page": PAGE if not quick else "<= 24",
                     "sizes": {}}
    with tempfile.TemporaryDirectory(prefix="cdinn-bench-detector-") as tmp:
        workdir = Path(tmp)
        for label, (geometry, pool, n) in SIZES.items():
            if quick:
                pool, n = min(pool, 24), min(n, 300)
            frames, mask, _ = native_frames(pool, geometry, seed=7, drift=(0.2, 0.3))
            page = min(PAGE, pool)
            path = write_frames(workdir / f"{label}.h5", frames)
            compressed = write_frames(workdir / f"{label}-bslz4.h5", frames, compression="bslz4")
            row: dict = {"shape": list(frames.shape[1:]), "frame_mb": frames[0].nbytes / 1e6, "file_frames": pool,
                         "stages": stages(model, frames, mask, path, compressed), "runs": {}}
            for mode in tqdm(modes, desc=f"detector {label}", leave=False):
                row["runs"][mode] = end_to_end(model, mode, frames, mask, None if mode == "inline" else
                                               (compressed if mode == "bslz4" else path), n, page, workdir)
            if tiled and label == "1M":
                server = TiledProcess()
                try:
                    row["runs"]["stream_resource+tiled"] = end_to_end(model, "stream_resource", frames, mask, path,
                                                                      min(n, 3000), page, workdir, tiled=server)
                finally:
                    server.close()
            results["sizes"][label] = row
            del frames
    return results


def table(r: dict) -> list[str]:
    """Markdown: frames/s per size and input, and the per-frame stage times."""
    lines = [f"### Detector-native frames (`{r['model']}`, {r['precision']}; {r['page']} frames a page or datum; "
             "peak tracking on; ZeroMQ sink)", "",
             "| frames | " + " | ".join(r["sizes"]) + " |", "|---|" + "---|" * len(r["sizes"])]
    modes = list(dict.fromkeys(mode for row in r["sizes"].values() for mode in row["runs"]))
    for mode in modes:
        cells = []
        for row in r["sizes"].values():
            run = row["runs"].get(mode)
            if run is None:
                cells.append("")
                continue
            lost = run["frames"] - run["received"]
            stored = (f", {run['frames_in_tiled']:,} of {run['frames']:,} in Tiled"
                      if run.get("frames_in_tiled") is not None else "")
            cells.append(f"{run['fps']:,.0f} frames/s" + (f" ({lost} not received)" if lost else "") + stored)
        lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    lines += ["", "Per frame, each stage alone (microseconds):", "",
              "| stage | " + " | ".join(r["sizes"]) + " |", "|---|" + "---|" * len(r["sizes"])]
    keys = list(next(iter(r["sizes"].values()))["stages"])
    for key in keys:
        cells = [f"{row['stages'].get(key, float('nan')):,.{3 if key == 'bslz4_ratio' else 0}f}"
                 for row in r["sizes"].values()]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return lines
