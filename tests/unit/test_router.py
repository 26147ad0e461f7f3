"""A per-run reconstructor owns what it needs: the crop and the rejection counter are handed to it,
so it works without the callback that usually makes it."""

from __future__ import annotations

import numpy as np

from cdinn_stream.live.callback import FrameCropper, Rejections, RunReconstructor


class Engine:
    """Stands in for the inference engine: records what a run hands it."""

    def __init__(self):
        self.opened, self.blocks, self.closed, self.summaries = [], [], [], []

    def open_run(self, uid, start):
        self.opened.append(uid)

    def submit(self, block):
        self.blocks.append(block)
        return True

    def close_run(self, uid, summary):
        self.closed.append((uid, summary["frames"]))
        self.summaries.append(summary)


def test_a_run_crops_its_frames_and_counts_its_rejections_on_its_own():
    engine, rejections = Engine(), Rejections()
    cropper = FrameCropper(size=16, bin=2, rejections=rejections)
    run = RunReconstructor({"uid": "r1", "time": 0.0}, cropper=cropper, engine=engine)
    run("descriptor", {"uid": "d1", "run_start": "r1", "name": "primary", "time": 0.0,
                       "data_keys": {"img": {"shape": [64, 64], "dtype": "array", "source": "sim"}}})
    frames = np.zeros((3, 64, 64))
    frames[:, 30:34, 40:44] = 100.0  # a peak off the frame's centre
    frames[2] = 0.0  # an empty frame: rejected, counted
    run("event_page", {"descriptor": "d1", "uid": ["a", "b", "c"], "seq_num": [1, 2, 3], "time": [1.0, 2.0, 3.0],
                       "data": {"img": frames}, "timestamps": {"img": [1.0, 2.0, 3.0]}, "filled": {}})
    run("stop", {"uid": "s", "run_start": "r1", "time": 4.0, "exit_status": "success"})
    (block,) = engine.blocks
    assert block.frames.shape == (2, 16, 16) and list(block.seq_nums) == [1, 2]
    assert rejections.counts["empty frame"] == 1
    assert engine.opened == ["r1"] and engine.closed == [("r1", 2)]
    assert engine.summaries[0]["frames_rejected"] == {"empty frame": [[3, 3]]}  # into the run's metadata
    assert rejections.of_run("r1") == {}  # handed over with the run's end, not kept


def test_seq_nums_travel_as_ranges():
    from cdinn_stream.live.blocks import range_seq_nums, seq_ranges

    assert seq_ranges([7, 1, 2, 3, 9, 8, 2]) == [[1, 3], [7, 9]] and seq_ranges([]) == []
    assert range_seq_nums([[1, 3], [7, 9]]).tolist() == [1, 2, 3, 7, 8, 9] and len(range_seq_nums([])) == 0
