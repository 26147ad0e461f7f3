"""Frames cut to windows around their Bragg peak where they are taken (``JetStreamPublisher(window=)``):
the documents that travel are far smaller, and the pipeline makes the same crops, at the same
places on the detector, from them as from the whole frames."""

from __future__ import annotations

import numpy as np
import pytest

from cdinn_stream.lab.sim import EIGER_1M, native_frames
from cdinn_stream.live.callback import ReconstructionCallback
from cdinn_stream.live.crop import cut_windows, window_origins
from cdinn_stream.live.jetstream import decode_document, encode_document
from cdinn_stream.live.windows import WINDOW_SUFFIX, PeakWindows


class Keep:
    """Each result's input block: crops, their origins and peaks on the detector."""

    def __init__(self):
        self.blocks = []

    def open_run(self, uid, start): pass
    def write(self, result): self.blocks.append(result.frames)
    def close_run(self, uid, summary): pass


def _documents(frames: np.ndarray, page: int = 6):
    from event_model import compose_run

    run = compose_run()
    desc = run.compose_descriptor(name="primary", data_keys={
        "det_image": {"source": "sim", "dtype": "array", "shape": list(frames.shape[1:])},
        "motor": {"source": "sim", "dtype": "number", "shape": []}})
    yield "start", run.start_doc
    yield "descriptor", desc.descriptor_doc
    for lo in range(0, len(frames), page):
        n = len(frames[lo : lo + page])
        yield "event_page", desc.compose_event_page(
            data={"det_image": frames[lo : lo + page], "motor": list(range(lo, lo + n))},
            timestamps={"det_image": [0.0] * n, "motor": [0.0] * n}, seq_num=list(range(lo + 1, lo + 1 + n)),
            time=[0.0] * n, validate=False)
    yield "stop", run.compose_stop()


def _reconstructed(documents, model, mask) -> list:
    keep = Keep()
    cb = ReconstructionCallback(model=model, sinks=[keep], mask=mask, max_latency=0.01)
    for name, doc in documents:
        cb(name, doc)
    assert cb.flush(60)
    cb.close()
    assert dict(cb.rejected) == {}
    return keep.blocks


def _travelled(name: str, doc: dict, windows: PeakWindows) -> tuple[str, dict]:
    """What a worker decodes: the document cut by ``windows`` and through the wire format."""
    if name in ("descriptor", "event", "event_page"):
        doc = getattr(windows, name)(doc)
    return decode_document(encode_document(name, doc))


def test_windows_lie_inside_the_frame_in_its_dtype():
    frames = np.arange(2 * 10 * 12, dtype=np.uint16).reshape(2, 10, 12)
    origins = window_origins(np.array([[0, 0], [9, 11]]), (4, 6), (10, 12))
    np.testing.assert_array_equal(origins, [[0, 0], [6, 6]])  # near the edges: moved inside
    cut = cut_windows(frames, origins, (4, 6))
    assert cut.dtype == np.uint16 and cut.shape == (2, 4, 6)
    np.testing.assert_array_equal(cut[1], frames[1, 6:10, 6:12])


@pytest.mark.parametrize("side", [96, 256])
def test_windowed_frames_give_the_crops_of_the_whole_frames(tiny_model, side):
    """Eiger 1M frames (module gaps, hot pixels, a peak that drifts and jumps) through the
    callback whole, and cut to windows (narrower and wider than the tracker's search region) then
    encoded and decoded as a worker gets them: the same crops, origins and peaks on the detector,
    at a few % of the bytes."""
    frames, mask, _ = native_frames(18, EIGER_1M, seed=5, jump_every=7)
    documents = list(_documents(frames))
    whole = _reconstructed(documents, tiny_model, mask)
    windows = PeakWindows(side, mask=mask)
    sent = [_travelled(name, doc, windows) for name, doc in documents]
    desc = next(doc for name, doc in sent if name == "descriptor")
    assert desc["data_keys"]["det_image"]["shape"] == [side, side]
    assert desc["data_keys"]["det_image"]["cdinn_window"]["detector_shape"] == list(EIGER_1M.shape)
    page = next(doc for name, doc in sent if name == "event_page")
    assert page["data"]["det_image"].dtype == frames.dtype and page["data"]["motor"] == [0, 1, 2, 3, 4, 5]
    assert np.asarray(page["data"]["det_image" + WINDOW_SUFFIX]).shape == (6, 2)
    size = sum(len(encode_document(n, d)) for n, d in documents if n == "event_page")
    assert sum(len(encode_document(n, d)) for n, d in sent if n == "event_page") < 0.07 * size
    cut_blocks = _reconstructed(sent, tiny_model, mask)
    get = {name: (lambda blocks, name=name: np.concatenate([getattr(b, name) for b in blocks]))
           for name in ("seq_nums", "frames", "origins", "peaks")}
    np.testing.assert_array_equal(get["seq_nums"](cut_blocks), np.arange(1, 19))
    for name in ("origins", "peaks", "frames"):
        np.testing.assert_array_equal(get[name](cut_blocks), get[name](whole), err_msg=name)


def test_a_peak_at_the_detector_edge_and_frames_that_cannot_be_cut():
    """A peak in a corner: the window lies inside the detector, the peak off its centre, on the
    detector where it was. Frames that are not numbers travel as placeholders; a run's stop
    forgets its streams."""
    windows = PeakWindows(32)
    frames = np.zeros((2, 200, 300), np.uint16)
    frames[0, 2:5, 296:299] = 1000  # top right corner
    frames[1, 100:103, 150:153] = 1000
    names = list(_documents(frames, page=2))
    desc = windows.descriptor(names[1][1])
    page = windows.event_page(names[2][1])
    origins = np.asarray(page["data"]["det_image" + WINDOW_SUFFIX])
    np.testing.assert_array_equal(origins, [[0, 268], [85, 135]])
    assert desc["data_keys"]["det_image" + WINDOW_SUFFIX]["shape"] == [2]
    # frames that cannot be cut travel as empty placeholders at (-1, -1), never whole
    strange = windows.event_page({**names[2][1], "data": {**names[2][1]["data"], "det_image": [["a"]]}})
    assert strange["data"]["det_image"].shape == (2, 0, 0)
    np.testing.assert_array_equal(strange["data"]["det_image" + WINDOW_SUFFIX], [[-1, -1], [-1, -1]])
    assert windows.counts == {"frames_cut": 2, "frames_not_cut": 2}
    event = windows.event({"descriptor": desc["uid"], "data": {"det_image": frames[1], "motor": 1},
                           "timestamps": {"det_image": 5.0, "motor": 5.0}, "seq_num": 2, "time": 5.0, "uid": "e"})
    assert event["data"]["det_image"].shape == (32, 32) and event["data"]["motor"] == 1
    assert list(event["data"]["det_image" + WINDOW_SUFFIX]) == [85, 135]
    assert event["timestamps"]["det_image" + WINDOW_SUFFIX] == 5.0
    with pytest.raises(ValueError, match="too small"):
        PeakWindows(8)
    windows.stop(names[-1][1])
    assert not windows._streams and not windows._trackers


def test_masked_pixels_travel_as_zero():
    """Gaps marked with the dtype's largest value (as detectors do) arrive as 0, so a worker
    without the mask makes the crops of one with it."""
    frames, mask, _ = native_frames(6, EIGER_1M, seed=2)
    frames[:, ~mask] = np.iinfo(frames.dtype).max
    windows = PeakWindows(512, mask=mask)  # reaches across a module gap
    docs = list(_documents(frames, page=3))
    windows.descriptor(docs[1][1])
    page = windows.event_page(docs[2][1])
    cut, origins = page["data"]["det_image"], page["data"]["det_image" + WINDOW_SUFFIX]
    gaps = ~np.stack([mask[r : r + 512, c : c + 512] for r, c in origins])
    assert gaps.any() and (cut[gaps] == 0).all() and (cut[~gaps] < np.iinfo(frames.dtype).max).all()


def test_windows_the_worker_cannot_place_are_rejected_with_their_seq_nums(tiny_model):
    frames, mask, _ = native_frames(6, EIGER_1M, seed=1)
    windows = PeakWindows(96, mask=mask)
    keep = Keep()
    cb = ReconstructionCallback(model=tiny_model, sinks=[keep], mask=mask, max_latency=0.01)
    for name, doc in _documents(frames, page=2):
        if name == "event_page" and doc["seq_num"][0] == 5:
            doc = {**doc, "data": {**doc["data"], "det_image": "not frames"}}  # the publisher cannot cut it
        doc = _travelled(name, doc, windows)[1]
        if name == "event_page" and doc["seq_num"][0] == 3:
            doc["data"]["det_image" + WINDOW_SUFFIX] = [[2000, 0], [0, 0]]  # off the detector
        cb(name, doc)
    assert cb.flush(60)
    cb.close()
    assert np.concatenate([b.seq_nums for b in keep.blocks]).tolist() == [1, 2]
    assert dict(cb.rejected) == {"bad shape": 2, "not cut": 2}
    # a mask of another detector: rejected, not applied at the wrong place
    cb = ReconstructionCallback(model=tiny_model, sinks=[], mask=mask[:-10], max_latency=0.01)
    windows = PeakWindows(96)
    for name, doc in _documents(frames[:2], page=2):
        cb(*_travelled(name, doc, windows))
    assert cb.flush(60)
    cb.close()
    assert dict(cb.rejected) == {"bad shape": 2}
