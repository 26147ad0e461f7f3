"""The spool wrapper (``SpooledSink``) around an in-memory store that can be switched away."""

from __future__ import annotations

import logging
import subprocess
import sys
from dataclasses import dataclass, field

import numpy as np
import pytest

from cdinn_stream.live.blocks import FrameBlock, Idles, RefinedBlock, ResultBlock, Spills, WritesRefined
from cdinn_stream.sinks.spooled import SpooledSink


@dataclass
class FakeRun:
    """A store's handle: the run and the frames this handle has written."""

    uid: str
    n: int = 0


@dataclass
class Stored:
    """What the store holds of one run."""

    start: dict
    seq: list = field(default_factory=list)
    end: dict | None = None
    refined: list = field(default_factory=list)


class FakeStore:
    """Runs in a dict. ``away = True``: every call fails as unreachable; ``bad = True``: as a bad
    request; ``partial = True``: the next extend stores two rows, then fails as unreachable."""

    parent = "fake"
    location = "memory://fake"

    def __init__(self):
        self.model_card = {"name": "tiny"}
        self.runs: dict[str, Stored] = {}
        self.away = self.bad = self.partial = False
        self.reopened = 0

    def _call(self):
        if self.bad:
            raise ValueError("bad request")
        if self.away:
            raise ConnectionError("store away")

    def columns(self, result):
        return {"amplitude": np.asarray(result.amplitude, np.float32), "seq": np.asarray(result.frames.seq_nums)}

    def create(self, run_uid, start):
        self._call()
        self.runs[run_uid] = Stored(start)
        return FakeRun(run_uid)

    def extend(self, run, cols):
        self._call()
        stored = self.runs[run.uid]
        assert len(stored.seq) == run.n, "a stale handle"
        if self.partial:
            self.partial, self.away = False, True
            stored.seq.extend(cols["seq"][:2].tolist())
            raise ConnectionError("went away half-way")
        stored.seq.extend(cols["seq"].tolist())
        run.n += len(cols["seq"])

    def finish(self, run, end):
        self._call()
        self.runs[run.uid].end = {**end, "frames": run.n}

    def reopen(self, manifest, previous=None):
        self._call()
        self.reopened += 1
        uid, written = manifest["run_uid"], manifest["written"]
        if uid not in self.runs or written == 0:
            self.runs[uid] = Stored(manifest["start"])
        del self.runs[uid].seq[written:]  # what a failed write left
        return FakeRun(uid, written)

    def write_refined(self, run, block):
        self._call()
        self.runs[run.uid].refined.extend(block.frames.seq_nums.tolist())

    def answers(self):
        return not self.away

    @staticmethod
    def unreachable(err):
        return isinstance(err, ConnectionError)


def _result(uid: str, first: int, n: int = 5) -> ResultBlock:
    seq = np.arange(first, first + n)
    frames = FrameBlock(uid, "primary", seq, seq * 0.1, np.zeros((n, 4, 4), np.float32), np.zeros((n, 2), int),
                        np.zeros((n, 2), int), np.zeros(n))
    return ResultBlock(frames, np.zeros((n, 4, 4), np.float32), np.zeros((n, 4, 4), np.float32), np.zeros(n),
                       np.zeros(n))


@pytest.fixture
def store():
    return FakeStore()


@pytest.fixture
def sink(store, tmp_path):
    return SpooledSink(store, spool_dir=tmp_path / "spool", retry_interval=0.0)


def test_the_wrapper_has_the_optional_sink_abilities(sink):
    assert isinstance(sink, Spills) and isinstance(sink, Idles) and isinstance(sink, WritesRefined)


def test_results_spooled_while_the_store_is_away_are_written_back_in_order(sink, store, caplog):
    sink.open_run("r1", {"uid": "r1"})
    sink.write(_result("r1", 1))
    store.away = True
    with caplog.at_level(logging.WARNING):
        for first in (6, 11, 16):
            sink.write(_result("r1", first))
    assert not sink.online and sink.frames_spooled == 15 and sink.spool.frames("r1") == 15
    assert store.runs["r1"].seq == list(range(1, 6))
    assert caplog.text.count("store server unreachable") == 1
    store.away = False
    sink.idle()
    assert sink.online and not sink.spool.runs()
    sink.write(_result("r1", 21))  # straight to the store again
    assert store.runs["r1"].seq == list(range(1, 26))
    versions = [{"version": 0, "name": "m"}]  # the engine's list of the weights the run's frames used
    rejected = {"empty frame": [[26, 27]]}  # seq_num ranges the pipeline turned away
    sink.close_run("r1", {"stop": {"exit_status": "success"}, "model_versions": versions, "frames_rejected": rejected})
    assert store.runs["r1"].end == {"complete": True, "exit_status": "success", "stop": {"exit_status": "success"},
                                    "frames": 25, "model_versions": versions, "frames_rejected": rejected}


def test_writes_catch_up_a_bounded_amount_each(sink, store):
    store.away = True
    sink.open_run("r1", {"uid": "r1"})
    for first in range(1, 51, 5):
        sink.write(_result("r1", first))  # ten chunks (the run was opened while away)
    assert store.runs == {} and sink.spool.frames("r1") == 50
    store.away = False
    sink.write(_result("r1", 51))  # one more chunk in the spool, two written back
    assert store.runs["r1"].seq == list(range(1, 11)) and sink.spool.frames("r1") == 45
    sink.idle()  # eight more
    assert store.runs["r1"].seq == list(range(1, 51)) and sink.spool.frames("r1") == 5
    sink.idle()
    assert store.runs["r1"].seq == list(range(1, 56)) and not sink.spool.runs()


def test_a_run_ended_while_the_store_is_away_completes_at_write_back(sink, store, caplog):
    sink.open_run("r1", {"uid": "r1"})
    sink.write(_result("r1", 1))
    store.away = True
    sink.write(_result("r1", 6))
    with caplog.at_level(logging.WARNING):
        sink.close_run("r1", {"stop": {"exit_status": "success"}})
    assert "run r1 ended while store is unreachable: 5 frames wait" in caplog.text
    assert store.runs["r1"].end is None and sink.spool.manifest("r1")["close"]["complete"]
    store.away = False
    sink.idle()
    assert store.runs["r1"].seq == list(range(1, 11)) and not sink.spool.runs()
    assert store.runs["r1"].end["complete"] and store.runs["r1"].end["frames"] == 10


def _run_ended_while_away(store, spool_dir) -> SpooledSink:
    """A wrapper that spooled a whole run of 5 frames while ``store`` was away (it is back now)."""
    first = SpooledSink(store, spool_dir=spool_dir)
    store.away = True
    first.open_run("r1", {"uid": "r1"})
    first.write(_result("r1", 1))
    first.close_run("r1", {"stop": {"exit_status": "success"}})
    store.away = False
    return first


def test_a_spool_left_behind_is_written_by_another_wrapper(store, tmp_path):
    first = _run_ended_while_away(store, tmp_path / "spool")
    later = SpooledSink(store, spool_dir=tmp_path / "spool")  # e.g. `cdinn-stream backfill`
    assert later.backfill() == 5 and not later.spool.runs()
    assert store.runs["r1"].seq == list(range(1, 6)) and store.runs["r1"].end["complete"]
    assert first.spool.manifest  # the same folder, now empty
    assert later.backfill() == 0


def test_a_write_failing_half_way_is_reopened_before_the_write_back(sink, store):
    sink.open_run("r1", {"uid": "r1"})
    sink.write(_result("r1", 1))
    store.partial = True
    sink.write(_result("r1", 6))  # two rows stored, then the store goes away: to the spool
    assert not sink.online and store.runs["r1"].seq == [1, 2, 3, 4, 5, 6, 7]
    store.away = False
    sink.idle()
    assert store.reopened == 1 and store.runs["r1"].seq == list(range(1, 11))
    sink.write(_result("r1", 11))  # through the reopened handle
    assert store.runs["r1"].seq == list(range(1, 16))


def test_a_spill_while_behind_is_written_back_in_order(sink, store):
    sink.open_run("r1", {"uid": "r1"})
    sink.write(_result("r1", 1))
    for first in (6, 11, 16, 21):
        sink.spill(_result("r1", first))
    assert sink.online and sink.spool.frames("r1") == 20 and sink.frames_spooled == 20
    sink.behind = lambda: True
    sink.write(_result("r1", 26))  # goes to the spool after the others; the write-back yields after one chunk
    assert store.runs["r1"].seq == list(range(1, 11))
    assert sink.backfill() == 5, "one chunk, then it yields"
    assert store.reopened == 0, "parked while the store was up: the live handles are good"
    sink.behind = lambda: False
    sink.close_run("r1", {"stop": {"exit_status": "success"}})
    assert store.runs["r1"].seq == list(range(1, 31)) and not sink.spool.runs()
    assert store.runs["r1"].end["complete"] and store.runs["r1"].end["frames"] == 30


def test_a_run_with_no_frame_is_not_complete(sink, store):
    sink.open_run("r1", {"uid": "r1"})
    sink.close_run("r1", {"stop": {"exit_status": "abort"}})
    assert store.runs["r1"].end == {"complete": False, "exit_status": "abort", "stop": {"exit_status": "abort"},
                                    "status": "no frame reconstructed", "frames": 0, "model_versions": [],
                                    "frames_rejected": {}}


def test_a_bad_request_is_raised_not_spooled(sink, store):
    sink.open_run("r1", {"uid": "r1"})
    store.bad = True
    with pytest.raises(ValueError):
        sink.write(_result("r1", 1))
    assert sink.online and not sink.spool.runs()
    with pytest.raises(RuntimeError, match="before its start"):
        sink.write(_result("r2", 1))


def test_refined_frames_go_to_the_store_only_while_it_has_the_run(sink, store):
    sink.open_run("r1", {"uid": "r1"})
    sink.write(_result("r1", 1))
    block = _result("r1", 1, 2)
    refined = RefinedBlock(block.frames, block.amplitude, block.phase, np.zeros(2), np.zeros(2), 50)
    sink.write_refined(refined)
    assert store.runs["r1"].refined == [1, 2]
    store.away = True
    sink.write(_result("r1", 6))
    with pytest.raises(ConnectionError, match="not stored"):
        sink.write_refined(refined)


def test_the_wrapper_does_not_load_tiled():
    code = ("import sys, cdinn_stream.sinks.spooled; "
            "assert not {'tiled', 'httpx', 'torch'} & set(sys.modules), 'tiled, httpx or torch was imported'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


class FakeNode(dict):
    """Just enough of a tiled container for TiledStore's bookkeeping (no server)."""

    def __init__(self, metadata=None):
        super().__init__()
        self.metadata = metadata or {}

    def create_container(self, key, metadata=None):
        self[key] = FakeNode(metadata)
        return self[key]

    def write_array(self, value, key, metadata=None):
        self[key] = [np.asarray(value)]
        return self[key]

    def delete_contents(self, key, recursive, external_only):
        del self[key]


def test_the_tiled_store_keeps_the_refined_arrays_of_the_handles_it_replaces():
    from cdinn_stream.sinks.tiled import TiledStore

    store = TiledStore(FakeNode(), parent="cdinn")
    run = store.create("r1", {"uid": "r1"})
    block = _result("r1", 1, 2)
    store.write_refined(run, RefinedBlock(block.frames, block.amplitude, block.phase, np.zeros(2), np.zeros(2), 50))
    manifest = {"run_uid": "r1", "parent": "cdinn", "start": {"uid": "r1"}, "model_card": {}, "written": 0}
    fresh = store.reopen(manifest, previous=run)
    assert fresh.container is not run.container and fresh.n == 0
    assert fresh.refined is run.refined and fresh.n_refined == 2
    assert store.reopen(manifest).refined == {}


def test_a_spool_made_for_another_server_is_left_alone(store, tmp_path):
    _run_ended_while_away(store, tmp_path / "spool")
    other = FakeStore()
    other.location = "memory://a-test-server"  # e.g. a replay pointed at a throwaway server
    elsewhere = SpooledSink(other, spool_dir=tmp_path / "spool")
    assert elsewhere.backfill() == 0 and other.runs == {} and elsewhere.spool.runs() == ["r1"]
    assert SpooledSink(store, spool_dir=tmp_path / "spool").backfill() == 5


def test_a_run_opened_and_ended_while_away_with_no_frame_is_not_complete(sink, store):
    store.away = True
    sink.open_run("r1", {"uid": "r1"})
    sink.close_run("r1", {"stop": {"exit_status": "abort"}})
    store.away = False
    sink.idle()
    assert store.runs["r1"].end["complete"] is False


def test_a_run_started_again_replaces_what_was_spooled_for_it(sink, store):
    store.away = True
    sink.open_run("r1", {"uid": "r1"})
    sink.write(_result("r1", 1))  # a first attempt, killed: its results wait in the spool
    sink._runs.clear()
    store.away = False
    sink.open_run("r1", {"uid": "r1"})  # e.g. `cdinn-stream replay` of the same run
    sink.write(_result("r1", 1, n=8))
    sink.close_run("r1", {"stop": {"exit_status": "success"}})
    assert store.runs["r1"].seq == list(range(1, 9)) and not sink.spool.runs()


def test_a_run_whose_open_was_refused_takes_no_results(sink, store):
    store.bad = True
    with pytest.raises(ValueError):
        sink.open_run("r1", {"uid": "r1"})
    store.bad = False
    with pytest.raises(RuntimeError, match="before its start"):
        sink.write(_result("r1", 1))
