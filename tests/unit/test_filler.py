"""Events and pages with nothing to fill pass through the filler untouched; references still fill."""

from __future__ import annotations

import numpy as np
from event_model import compose_run

from cdinn_stream.live.callback import PassThroughFiller, ReconstructionCallback

KEY = "det_image"


def _frame(row: int) -> np.ndarray:
    """A 64x64 frame with a Bragg peak (a Gaussian blob, not a lone hot pixel) at (row, 30)."""
    r, c = np.mgrid[:64, :64]
    return (1e4 * np.exp(-((r - row) ** 2 + (c - 30) ** 2) / 8.0) + 1).astype(np.float32)


class _Frames:
    """A handler whose datum ``{"index": i}`` is a frame with its peak at (20 + i, 30)."""

    def __init__(self, resource_path, **kwargs):
        pass

    def __call__(self, index):
        return _frame(20 + index)


def _documents(external: bool, n: int = 5):
    run = compose_run()
    key = {"source": "sim", "dtype": "array", "shape": [64, 64]}
    if external:
        key["external"] = "FILESTORE:"
    desc = run.compose_descriptor(name="primary", data_keys={KEY: key})
    docs = [("start", run.start_doc), ("descriptor", desc.descriptor_doc)]
    if external:
        res = run.compose_resource(spec="TEST_FRAMES", root="/", resource_path="nowhere", resource_kwargs={})
        docs.append(("resource", res.resource_doc))
        datums = [res.compose_datum(datum_kwargs={"index": i}) for i in range(n)]
        docs += [("datum", d) for d in datums]
        docs += [("event", desc.compose_event(data={KEY: d["datum_id"]}, timestamps={KEY: 0.0}, seq_num=i + 1,
                                              filled={KEY: False}, validate=False)) for i, d in enumerate(datums)]
    else:
        frames = np.stack([_frame(20)] * n)
        docs.append(("event_page", desc.compose_event_page(data={KEY: frames}, timestamps={KEY: [0.0] * n},
                                                           seq_num=list(range(1, n + 1)), time=[0.0] * n,
                                                           validate=False)))
    docs.append(("stop", run.compose_stop()))
    return docs


def test_what_needs_filling():
    from cdinn_stream.live.callback import _needs_filling

    assert not _needs_filling({"filled": {}}) and not _needs_filling({"filled": {KEY: [True, "datum-1"]}})
    for filled in ({KEY: False}, {KEY: [True, False]}, {KEY: (False,)}):
        assert _needs_filling({"filled": filled})
    assert _needs_filling({})  # no word on it: event-model's own rules decide


def test_frames_nothing_can_fill_are_rejected_as_unfilled(tiny_model):
    cb = ReconstructionCallback(model=tiny_model, sinks=[], handler_registry={}, max_latency=0.01)
    for name, doc in _documents(external=True):  # no handler for the frames' spec
        cb(name, doc)
    assert cb.flush(30)
    stats = cb.stats()
    cb.close()
    assert stats["rejected"] == {"unfilled": 5} and stats["frames_in"] == 0


def test_inline_pages_and_events_pass_through_as_they_are():
    filler = PassThroughFiller({}, inplace=False)
    docs = dict(_documents(external=False))
    page = docs["event_page"]
    assert filler.event_page(page) is page
    event = {**page, "filled": {}, "seq_num": 1}
    assert filler.event(event) is event


class _Keep:
    def __init__(self):
        self.peaks = {}

    def open_run(self, uid, start):
        pass

    def write(self, result):
        for s, peak in zip(result.frames.seq_nums.tolist(), result.frames.peaks.tolist(), strict=True):
            self.peaks[s] = tuple(peak)

    def close_run(self, uid, summary):
        pass


def test_external_frames_are_still_filled_and_inline_frames_still_arrive(tiny_model):
    for external in (True, False):
        keep = _Keep()
        cb = ReconstructionCallback(model=tiny_model, sinks=[keep], handler_registry={"TEST_FRAMES": _Frames},
                                    max_latency=0.01)
        for name, doc in _documents(external):
            cb(name, doc)
        assert cb.flush(30)
        stats = cb.stats()
        cb.close()
        assert stats["rejected"] == {} and stats["frames_out"] == 5
        want = {i + 1: (20 + i, 30) if external else (20, 30) for i in range(5)}
        assert keep.peaks == want
