"""Native-size detector frames in HDF5 files, as AreaDetector and ophyd-async write them: read
lazily (only the tracked peak's window), off the RunEngine's thread, cropped as inline frames are."""

import threading

import numpy as np
import pytest

from cdinn_stream.lab.detector import run_documents, write_frames
from cdinn_stream.lab.sim import EIGER_1M, native_frames
from cdinn_stream.live.callback import FrameCropper, RunReconstructor
from cdinn_stream.live.frames import FileFrames, HDF5Files, group_file_frames
from cdinn_stream.live.intake import FrameIntake


class Collect:
    """An engine that keeps what it is given, and on which thread."""

    def __init__(self):
        self.blocks, self.summaries, self.threads = [], [], set()

    def submit(self, block):
        self.threads.add(threading.current_thread().name)
        self.blocks.append(block)
        return True

    def open_run(self, uid, start):
        pass

    def close_run(self, uid, summary):
        self.summaries.append(summary)


@pytest.fixture(scope="module")
def eiger(tmp_path_factory):
    frames, mask, peaks = native_frames(24, EIGER_1M, seed=4, jump_every=16)
    path = write_frames(tmp_path_factory.mktemp("eiger") / "frames.h5", frames)
    return frames, mask, path


def test_file_frames_read_hyperslabs_and_merge(eiger, tmp_path):
    import h5py

    frames, _, path = eiger
    files = HDF5Files()
    ds = files.dataset(str(path), "/entry/data/data", 24)
    lazy = FileFrames(ds, 4, 12)
    assert lazy.shape == (8, *frames.shape[1:]) and len(lazy) == 8 and lazy.dtype == frames.dtype
    np.testing.assert_array_equal(lazy[:, 100:140, 200:260], frames[4:12, 100:140, 200:260])
    np.testing.assert_array_equal(lazy[2:5], frames[6:9])
    np.testing.assert_array_equal(lazy[-1], frames[11])
    np.testing.assert_array_equal(np.asarray(lazy), frames[4:12])
    other = HDF5Files()  # another handle on the same dataset: h5py says it is the same one, so its frames join
    groups = group_file_frames([FileFrames(ds, 0, 4), FileFrames(ds, 4, 8), FileFrames(ds, 2, 3),
                                other.frames(str(path), "/entry/data/data", 3, 5)])
    assert [(g.start, g.stop) for g in groups] == [(0, 8), (2, 5)]
    np.testing.assert_array_equal(np.concatenate([np.asarray(g) for g in groups]), frames[[*range(8), 2, 3, 4]])
    other.close()
    with pytest.raises(ValueError, match="asked for"):
        FileFrames(ds, 20, 30)
    with pytest.raises(IndexError, match="step 1"):
        lazy[::2]
    with h5py.File(tmp_path / "four.h5", "w") as f:  # ophyd-async's (n, 1, H, W)
        f["d"] = frames[:3, None, :64, :64]
    four = FileFrames(files.dataset(str(tmp_path / "four.h5"), "d", 3), 0, 3)
    np.testing.assert_array_equal(four[:, 10:20, 5:9], frames[:3, 10:20, 5:9])
    files.close()


@pytest.mark.parametrize("layout", ["ophyd-async", "area-detector"])
def test_file_frames_are_read_off_the_callers_thread_window_only_and_cropped_as_inline(eiger, layout, monkeypatch):
    frames, mask, path = eiger
    reads = []
    real = FileFrames.__getitem__

    def counting(self, key):
        out = real(self, key)
        reads.append((threading.current_thread().name, out.size))
        return out

    monkeypatch.setattr(FileFrames, "__getitem__", counting)
    intake = FrameIntake()
    files, inline = Collect(), Collect()
    crop_files, crop_inline = FrameCropper(32, mask=mask), FrameCropper(32, mask=mask)
    rr = None
    for name, doc in run_documents(path, 24, frames.shape[1:], layout=layout, page=4):
        if name == "start":
            rr = RunReconstructor(doc, cropper=crop_files, engine=files, intake=intake)
            ri = RunReconstructor(doc, cropper=crop_inline, engine=inline)
        rr(name, doc)  # AD_HDF5 datums: the reconstructor opens their frames itself, a page at a time
        if name == "event_page" or name == "stream_datum":  # the same frames inline
            seq = (np.asarray(doc["seq_num"]) if name == "event_page"
                   else np.arange(doc["seq_nums"]["start"], doc["seq_nums"]["stop"]))
            ri("event_page", {"descriptor": "d", "seq_num": seq.tolist(), "time": [0.0] * len(seq),
                              "data": {"eiger": frames[seq - 1]}, "timestamps": {"eiger": [0.0] * len(seq)},
                              "filled": {}, "uid": "p"})
        if name == "descriptor":
            ri("descriptor", {**doc, "uid": "d"})
    assert intake.drain(30)
    intake.close()
    assert files.threads == {"cdinn-intake"} and all(t == "cdinn-intake" for t, _ in reads)
    assert sum(len(b) for b in files.blocks) == 24 and len(files.summaries) == 1
    for key in ("frames", "origins", "peaks", "seq_nums"):
        np.testing.assert_array_equal(np.concatenate([getattr(b, key) for b in files.blocks]),
                                      np.concatenate([getattr(b, key) for b in inline.blocks]))
    # whole frames only for the checks (the first page's first frame, and after the jump at frame 16);
    # every other read is a search window
    whole = frames[0].size
    assert sum(1 for _, size in reads if size >= whole) <= 4
    assert sum(size for _, size in reads) < 0.25 * frames.size
    assert files.summaries[0]["peak_search"]["jump"] == 1


def test_compressed_frames_read_through_hdf5plugin(eiger, tmp_path):
    """bitshuffle-LZ4 frames, as EIGERs write them: the same pixels, window or whole."""
    pytest.importorskip("hdf5plugin")
    frames, mask, _ = eiger
    path = write_frames(tmp_path / "bslz4.h5", frames[:6], compression="bslz4")
    files = HDF5Files()
    lazy = FileFrames(files.dataset(str(path), "/entry/data/data", 6), 0, 6)
    np.testing.assert_array_equal(lazy[:, 300:400, 100:180], frames[:6, 300:400, 100:180])
    np.testing.assert_array_equal(np.asarray(lazy), frames[:6])
    files.close()
    assert path.stat().st_size < 0.2 * frames[:6].nbytes
    with pytest.raises(ValueError, match="compression"):
        write_frames(tmp_path / "x.h5", frames[:1], compression="gzip")


def test_uncompressed_frames_are_read_from_the_mapped_file(eiger, tmp_path):
    """One chunk a frame or contiguous: windows come from the file's mapped pages, the same pixels
    as HDF5 gives; compressed or other chunkings are left to HDF5."""
    import h5py

    frames, _, path = eiger
    with h5py.File(tmp_path / "layouts.h5", "w") as f:
        f["contiguous"] = frames[:5]
        f.create_dataset("rows", data=frames[:5], chunks=(1, 64, frames.shape[2]))
        f.create_dataset("gzip", data=frames[:5], chunks=(1, *frames.shape[1:]), compression="gzip")
    files = HDF5Files()
    for file, name, mapped in ((path, "/entry/data/data", True), (tmp_path / "layouts.h5", "contiguous", True),
                               (tmp_path / "layouts.h5", "rows", False), (tmp_path / "layouts.h5", "gzip", False)):
        lazy = files.frames(str(file), name, 1, 5)
        assert (lazy._map is not None) == mapped, name
        np.testing.assert_array_equal(lazy[:, 200:336, 500:636], frames[1:5, 200:336, 500:636])
        np.testing.assert_array_equal(lazy[2, 10:20, 30:40], frames[3, 10:20, 30:40])
        np.testing.assert_array_equal(np.asarray(lazy), frames[1:5])
    files.close()


@pytest.mark.parametrize("layout", ["ophyd-async", "area-detector"])
def test_a_run_of_detector_files_through_the_callback(eiger, layout, tiny_model):
    """The whole callback (RunRouter, its filler, the intake, the engine): every frame of both
    layouts reconstructed, in order, the peak search counted in the run's summary."""
    from cdinn_stream.live.callback import ReconstructionCallback

    frames, mask, path = eiger

    class Keep:
        def __init__(self):
            self.seq, self.summaries = [], []

        def open_run(self, uid, start): pass
        def write(self, result): self.seq.extend(result.frames.seq_nums.tolist())
        def close_run(self, uid, summary): self.summaries.append(summary)

    keep = Keep()
    cb = ReconstructionCallback(model=tiny_model, sinks=[keep], mask=mask, max_latency=0.01)
    for name, doc in run_documents(path, 24, frames.shape[1:], layout=layout, page=6):
        cb(name, doc)
    assert cb.flush(60)
    cb.close()
    assert keep.seq == list(range(1, 25)) and dict(cb.rejected) == {}
    assert keep.summaries[0]["peak_search"]["tracked"] >= 18


def test_a_file_still_being_written_is_read_as_it_grows(tmp_path):
    """SWMR: a writer in another process appends frames; the run's reader sees each new stream_datum's
    frames (windows from the mapped file and whole frames through HDF5) on one handle."""
    import subprocess
    import sys
    import textwrap

    frames, _, _ = native_frames(9, EIGER_1M, seed=2)
    np.save(tmp_path / "frames.npy", frames)
    path = tmp_path / "growing.h5"
    writer = textwrap.dedent(f"""
        import sys, h5py, numpy as np
        frames = np.load({str(tmp_path / "frames.npy")!r})
        with h5py.File({str(path)!r}, "w", libver="latest") as f:
            ds = f.create_dataset("/entry/data/data", shape=(0, *frames.shape[1:]), maxshape=(None, *frames.shape[1:]),
                                  chunks=(1, *frames.shape[1:]), dtype=frames.dtype)
            f.swmr_mode = True
            for k in range(3):
                ds.resize(3 * (k + 1), axis=0)
                ds[3 * k : 3 * (k + 1)] = frames[3 * k : 3 * (k + 1)]
                ds.flush()
                print(3 * (k + 1), flush=True)
                sys.stdin.readline()  # wait for the reader
    """)
    proc = subprocess.Popen([sys.executable, "-c", writer], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    files = HDF5Files()
    try:
        for k in range(3):
            assert int(proc.stdout.readline()) == 3 * (k + 1)
            lazy = files.frames(str(path), "/entry/data/data", 3 * k, 3 * (k + 1))
            np.testing.assert_array_equal(lazy[:, 100:236, 200:336], frames[3 * k : 3 * (k + 1), 100:236, 200:336])
            np.testing.assert_array_equal(np.asarray(lazy), frames[3 * k : 3 * (k + 1)])
            proc.stdin.write("\n")
            proc.stdin.flush()
        with pytest.raises(ValueError, match="yet"):
            files.frames(str(path), "/entry/data/data", 9, 12)
    finally:
        files.close()
        proc.communicate(timeout=30)
    assert proc.returncode == 0
