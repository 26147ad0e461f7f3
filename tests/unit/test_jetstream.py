"""The worker pool's pure parts: the documents' wire format, page splitting, subjects, the
acknowledgement ledger and the merge of partitions (no server: the system tests run nats-server)."""

from __future__ import annotations

import numpy as np
import pytest

from cdinn_stream.live.acks import AckTracker
from cdinn_stream.live.jetstream import decode_document, document_subject, encode_document, frame_seq_nums
from cdinn_stream.live.nats_publisher import split_page
from cdinn_stream.sinks.partitions import merge_rows


def test_documents_round_trip_with_their_arrays():
    frames = np.arange(2 * 3 * 4, dtype=np.uint16).reshape(2, 3, 4)
    doc = {"descriptor": "d", "seq_num": [1, 2], "time": [0.5, 0.6], "data": {"img": frames, "x": [1.0, 2.0]},
           "timestamps": {"img": [0.5, 0.6]}, "filled": {}}
    name, back = decode_document(encode_document("event_page", doc))
    assert name == "event_page" and back["seq_num"] == [1, 2] and back["data"]["x"] == [1.0, 2.0]
    np.testing.assert_array_equal(back["data"]["img"], frames)
    assert back["data"]["img"].dtype == np.uint16
    assert frame_seq_nums(name, back) == [1, 2]
    assert frame_seq_nums("stream_datum", {"seq_nums": {"start": 5, "stop": 8}}) == [5, 6, 7]


def test_a_page_splits_into_pages_and_subjects_name_the_run_of_frames():
    doc = {"descriptor": "d", "uid": ["a", "b", "c"], "seq_num": [1, 2, 3], "time": [0, 1, 2],
           "data": {"img": np.zeros((3, 2, 2))}, "timestamps": {"img": [0, 1, 2]}, "filled": {}}
    part = split_page(doc, 1, 3)
    assert part["seq_num"] == [2, 3] and part["data"]["img"].shape == (3 - 1, 2, 2) and part["descriptor"] == "d"
    assert document_subject("cdinn", "bl7", "event_page", "u1") == "cdinn.bl7.event_page.u1"
    assert document_subject("cdinn", "bl7", "start", "u1") == "cdinn.bl7.start"
    with pytest.raises(ValueError):
        document_subject("cdinn", "bl.7", "start", "u1")


def test_a_message_is_settled_when_every_sink_wrote_every_frame():
    done = []
    tracker = AckTracker(2, lambda token, ok: done.append((token, ok)))
    tracker.expect("m1", "run", "primary", [1, 2])
    tracker.expect("m2", "run", "primary", [3])
    tracker.written(0, "run", "primary", [1, 2, 3])
    assert done == []
    tracker.written(1, "run", "primary", [2, 3])
    assert done == [("m2", True)]
    tracker.written(1, "run", "primary", [1], ok=False)
    assert done == [("m2", True), ("m1", False)]
    assert len(tracker) == 0


def test_a_message_is_held_from_its_fetch():
    """The age the worker reports messages in progress by counts from when it fetched them (they
    may wait their turn, or their run's documents, before they are fed)."""
    import time

    tracker = AckTracker(1, lambda token, ok: None)
    tracker.expect("fetched earlier", "run", "primary", [1], since=time.monotonic() - 5.0)
    tracker.expect("now", "run", "primary", [2])
    ages = dict(tracker.waiting())
    assert ages["fetched earlier"] >= 5.0 > 1.0 > ages["now"]


def test_settle_acknowledges_rejected_frames_and_redelivers_half_written_ones():
    done = {}
    tracker = AckTracker(2, lambda token, ok: done.__setitem__(token, ok))
    tracker.expect("rejected", "run", "primary", [1])
    tracker.expect("half", "run", "primary", [2])
    tracker.written(0, "run", "primary", [2])
    for token in ("rejected", "half"):
        tracker.fed(token)
    assert tracker.settle() == 2
    assert done == {"rejected": True, "half": False}


def _rows(seq):
    n = len(seq)
    info = np.zeros((n, 8))
    info[:, 0] = seq
    return {"amplitude": np.asarray(seq, np.float32)[:, None, None] * np.ones((n, 2, 2), np.float32),
            "phase": np.zeros((n, 2, 2), np.float32), "chi2": np.asarray(seq, float), "frame_info": info,
            "observables": np.zeros((n, 3))}


def test_partitions_merge_in_seq_num_order_each_frame_once():
    rows, duplicates = merge_rows([_rows([4, 1, 5]), _rows([2, 3, 4]), None])
    np.testing.assert_array_equal(rows["frame_info"][:, 0], [1, 2, 3, 4, 5])
    np.testing.assert_array_equal(rows["amplitude"][:, 0, 0], [1, 2, 3, 4, 5])
    assert duplicates == 1
    assert merge_rows([]) == ({}, 0)


def test_frames_the_model_failed_on_are_given_back_not_acknowledged():
    done = {}
    tracker = AckTracker(2, lambda token, ok: done.__setitem__(token, ok))
    tracker.expect("m", "run", "primary", [1, 2])
    tracker.written(0, "run", "primary", [1])
    tracker.written(1, "run", "primary", [1])
    tracker.lost("run", "primary", [2])  # the engine's on_failed
    assert done == {"m": False}
    tracker.expect("m2", "run", "primary", [3])
    tracker.forget("m2")  # given back to the server by the worker: never settled
    tracker.fed("m2")
    assert tracker.settle() == 0 and len(tracker) == 0


class _Plain:
    def open_run(self, run_uid, start): ...

    def write(self, result): ...

    def close_run(self, run_uid, summary): ...


class _Spooling(_Plain):
    def __init__(self):
        self.parked = []
        self.behind = lambda: False

    def spill(self, result):
        self.parked.append(result)


def test_a_tracked_sink_has_the_abilities_of_its_sink_and_a_parked_frame_counts_as_written():
    from types import SimpleNamespace

    from cdinn_stream.live.acks import tracked
    from cdinn_stream.live.blocks import CountsUndelivered, Spills

    done = {}
    tracker = AckTracker(1, lambda token, ok: done.__setitem__(token, ok))
    plain, spooling = tracked(_Plain(), tracker, 0), tracked(_Spooling(), tracker, 0)
    assert not isinstance(plain, Spills) and not isinstance(plain, CountsUndelivered)
    assert isinstance(spooling, Spills) and type(spooling).__name__ == "Tracked_Spooling"
    spooling.behind = lambda: True  # as the sink thread sets it: the wrapped sink's write-back sees it
    assert spooling.sink.behind()
    tracker.expect("m", "run", "primary", [1, 2])
    spooling.spill(SimpleNamespace(frames=SimpleNamespace(run_uid="run", stream="primary", seq_nums=[1, 2])))
    assert done == {"m": True} and len(spooling.sink.parked) == 1


def test_a_run_s_documents_reach_the_callback_once_and_in_order_when_its_first_frame_comes():
    """The first frame opens the run while control documents keep arriving: each is fed once, in order."""
    import asyncio
    import time
    from types import SimpleNamespace

    from cdinn_stream.apps.worker import PoolRun, PoolWorker
    from cdinn_stream.live.jetstream import RUN_HEADER, JetStreamSettings

    fed: list[str] = []

    class SlowCallback:  # the feeding thread takes a while per document: the loop goes on meanwhile
        image_key = None

        def __call__(self, name, doc):
            time.sleep(0.02)
            fed.append(name if name == "event_page" else doc["uid"])

    def message(name, doc):
        async def answer(*args, **kwargs):
            return None

        return SimpleNamespace(headers={RUN_HEADER: "r"}, data=encode_document(name, doc), subject=f"cdinn.bl.{name}",
                               metadata=SimpleNamespace(num_delivered=1), ack=answer, nak=answer, term=answer)

    async def scenario() -> None:
        worker = PoolWorker(SlowCallback(), AckTracker(0, lambda token, ok: None), JetStreamSettings(), name="t")
        worker._loop = asyncio.get_running_loop()
        run = worker.runs["r"] = PoolRun("r", "bl", "r.1", [("start", {"uid": "start"})])
        await worker._control(message("descriptor", {"uid": "desc", "run_start": "r", "name": "primary",
                                                      "data_keys": {"img": {"shape": [4, 4]}}}))
        frame = asyncio.create_task(worker._frame(message("event_page", {
            "descriptor": "desc", "uid": ["frame"], "seq_num": [1], "time": [0.0], "data": {"img": np.zeros((1, 4, 4))},
            "timestamps": {"img": [0.0]}, "filled": {}})))
        await asyncio.sleep(0.005)  # the frame is being fed: the run is open
        assert run.opened
        for uid in ("res", "datum"):
            await worker._control(message("resource" if uid == "res" else "datum", {"uid": uid, "run_start": "r"}))
        await frame
        worker._feeder.shutdown()

    asyncio.run(scenario())
    assert fed == ["start", "desc", "event_page", "res", "datum"]


def test_a_partition_cut_short_in_a_write_is_merged_to_the_rows_every_array_holds():
    """SIGKILL between two arrays' extensions leaves them of different lengths: the merge takes the
    rows all arrays hold (the rest were never acknowledged and come again elsewhere)."""
    import numpy as np

    from cdinn_stream.sinks.partitions import _rows
    from cdinn_stream.sinks.tiled_layout import ARRAYS

    class Node:
        def __init__(self, a):
            self.a = a

        def read(self):
            return self.a

    lengths = {"amplitude": 5, "phase": 5, "chi2": 5, "frame_info": 5, "observables": 3}
    container = {k: Node(np.zeros((lengths[k], 2))) for k in ARRAYS}
    rows = _rows(container)
    assert {len(v) for v in rows.values()} == {3}


def test_a_partition_cut_short_in_its_first_write_has_no_row():
    """SIGKILL while the first write creates the arrays one by one leaves some of them missing: no
    row of that partition is whole, and the merge of the run goes on without it (it used to fail
    on the missing ``frame_info`` and retry for ever)."""
    from cdinn_stream.sinks.partitions import _rows as partition_rows

    class Node:
        def __init__(self, a):
            self.a = a

        def read(self):
            return self.a

    cut = {k: Node(np.zeros((4, 2))) for k in ("amplitude", "phase", "chi2")}
    assert partition_rows(cut) is None
    rows, duplicates = merge_rows([partition_rows(cut), _rows([3, 1, 2])])
    assert rows["frame_info"][:, 0].tolist() == [1, 2, 3] and duplicates == 0
