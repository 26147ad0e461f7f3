"""Fuzzed bad input: documents and frames from hypothesis never raise into the RunEngine, every
frame is either reconstructed or counted as rejected with a logged reason, and a weights file
that is not ours gives a clear error."""

from __future__ import annotations

import logging
import uuid

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, arrays

from cdinn_stream.live.callback import ReconstructionCallback
from cdinn_stream.nn.weights import WeightsError, read_weights, save_weights

KEY = "det_image"
DTYPES = ("float32", "float64", "uint16", "int32", "uint8", "bool", "complex64", "int8")

_any = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
                    max_leaves=8)


@st.composite
def frames(draw):
    """A detector frame stack: usually (n, H, W) numbers with NaN, inf, negatives, zeros and
    saturation sprinkled in; sometimes the wrong shape, dtype or not an array at all."""
    kind = draw(st.sampled_from(["good", "good", "good", "shape", "dtype", "junk"]))
    if kind == "junk":
        return draw(_any)
    if kind == "dtype":
        return draw(arrays(st.sampled_from(DTYPES), array_shapes(min_dims=0, max_dims=4, max_side=12)))
    if kind == "shape":
        shape = draw(array_shapes(min_dims=0, max_dims=5, min_side=0, max_side=10))
        return np.zeros(shape, np.float32)
    n = draw(st.integers(1, 3))
    h, w = draw(st.integers(3, 48)), draw(st.integers(3, 48))
    x = np.random.default_rng(draw(st.integers(0, 2**16))).poisson(2.0, (n, h, w)).astype(np.float32)
    r, c = draw(st.integers(0, h - 1)), draw(st.integers(0, w - 1))
    x[:, r, c] = draw(st.sampled_from([1e6, 65535, np.inf, 0.0]))  # a peak anywhere, edges included
    for value in draw(st.lists(st.sampled_from([np.nan, np.inf, -np.inf, -5.0, 0.0, 4e9]), max_size=4)):
        x[:, draw(st.integers(0, h - 1)), draw(st.integers(0, w - 1))] = value
    if draw(st.booleans()):
        x[:] = 0  # all-zero frames
    return x


@st.composite
def runs(draw):
    """The documents of one run, then broken: keys dropped, documents reordered or repeated,
    unknown descriptors, junk documents, a stop without a start."""
    start = {"uid": str(uuid.uuid4()), "time": 1.0}
    desc = {"uid": str(uuid.uuid4()), "run_start": start["uid"], "name": "primary", "time": 1.0,
            "data_keys": {KEY: {"source": "sim", "dtype": "array", "shape": [32, 32]}}}
    docs = [("start", start), ("descriptor", desc)]
    for seq in range(1, draw(st.integers(0, 4)) + 1):
        f = draw(frames())
        if draw(st.booleans()):
            docs.append(("event", {"uid": str(uuid.uuid4()), "descriptor": desc["uid"], "seq_num": seq, "time": 2.0,
                                   "data": {KEY: f[0] if isinstance(f, np.ndarray) and f.ndim == 3 and len(f) else f},
                                   "timestamps": {KEY: 2.0}, "filled": {}}))
        else:
            n = len(f) if isinstance(f, np.ndarray) and f.ndim == 3 and len(f) else 1
            docs.append(("event_page", {"uid": [str(uuid.uuid4())] * n, "descriptor": desc["uid"],
                                        "seq_num": list(range(seq, seq + n)), "time": [2.0] * n,
                                        "data": {KEY: f}, "timestamps": {KEY: [2.0] * n}, "filled": {}}))
    docs.append(("stop", {"uid": str(uuid.uuid4()), "run_start": start["uid"], "time": 3.0, "exit_status": "success"}))
    for _ in range(draw(st.integers(0, 3))):
        i = draw(st.integers(0, len(docs) - 1))
        name, doc = docs[i]
        action = draw(st.sampled_from(["drop_key", "unknown_descriptor", "move", "repeat", "junk", "delete"]))
        doc = dict(doc) if isinstance(doc, dict) else doc
        if action == "drop_key" and not isinstance(doc, dict):
            continue
        if action == "drop_key" and doc:
            doc.pop(draw(st.sampled_from(sorted(doc))))
            docs[i] = (name, doc)
        elif action == "unknown_descriptor" and isinstance(doc, dict) and "descriptor" in doc:
            doc["descriptor"] = "no-such-descriptor"
            docs[i] = (name, doc)
        elif action == "move":
            docs.insert(draw(st.integers(0, len(docs))), docs.pop(i))
        elif action == "repeat":
            docs.append((name, doc))
        elif action == "junk":
            docs.insert(i, (draw(st.sampled_from(["start", "event", "descriptor", "datum", "resource", "stop",
                                                  "stream_datum", "stream_resource", "nonsense"])), draw(_any)))
        elif action == "delete":
            docs.pop(i)
    return docs


@pytest.fixture(scope="module")
def callback(request):
    from cdinn_stream.nn.model import CDINN, ModelConfig
    from cdinn_stream.nn.reconstruct import CDIModel

    model = CDIModel(CDINN(ModelConfig(32, (4, 8, 16), 1, 4)), device="cpu", precision="fp32")
    cb = ReconstructionCallback(model=model, batch_size=64, max_latency=0.005)
    yield cb
    cb.close()


FUZZED = {"runs": 0, "documents": 0}


@settings(max_examples=1500, deadline=None, suppress_health_check=list(HealthCheck))
@given(docs=runs())
def test_fuzzed_documents_never_raise(callback, docs):
    FUZZED["runs"] += 1
    for name, doc in docs:
        FUZZED["documents"] += 1
        callback(name, doc)  # must not raise, whatever the document


def test_fuzzed_frames_are_all_accounted_for(callback, caplog):
    """After the fuzzing above: every frame that entered the engine came out (none failed or
    dropped), and the bad ones were rejected with a reason."""
    assert FUZZED["runs"] >= 1000, "the fuzz test runs first and tries at least 1,000 runs"
    assert callback.flush(60)
    stats = callback.stats()
    assert stats["frames_in"] == stats["frames_out"] > 0
    assert stats["frames_failed"] == stats["frames_dropped"] == 0
    assert sum(stats["rejected"].values()) > 0 and stats["rejected"]["document"] > 0
    print(f"fuzzed {FUZZED['runs']} runs, {FUZZED['documents']} documents: {stats['frames_out']} frames "
          f"reconstructed, rejected {dict(stats['rejected'])}")


def test_rejections_are_logged_with_the_run_and_seq_num(callback, caplog):
    start = {"uid": "run-abc", "time": 1.0}
    desc = {"uid": "d1", "run_start": "run-abc", "name": "primary", "time": 1.0,
            "data_keys": {KEY: {"source": "sim", "dtype": "array", "shape": [32, 32]}}}
    with caplog.at_level(logging.WARNING):
        callback("start", start)
        callback("descriptor", desc)
        callback("event", {"uid": "e1", "descriptor": "d1", "seq_num": 7, "time": 2.0,
                           "data": {KEY: np.full((40, 40), np.nan)}, "timestamps": {KEY: 2.0}, "filled": {}})
        callback("stop", {"uid": "s1", "run_start": "run-abc", "time": 3.0, "exit_status": "success"})
    assert "run run-abc seq_num 7" in caplog.text


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(cut=st.floats(0, 1, exclude_max=True), flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True),
                                                                        st.integers(1, 255)), max_size=8))
def test_damaged_weights_files_give_a_clear_error(tmp_path_factory, cut, flips):
    from cdinn_stream.nn.model import CDINN, ModelConfig

    folder = tmp_path_factory.mktemp("w")
    good = folder / "good.pt"
    save_weights(CDINN(ModelConfig(32, (4, 8, 16), 1, 4)), good)
    data = bytearray(good.read_bytes())
    for where, xor in flips:
        data[int(where * len(data))] ^= xor
    if cut > 0:
        data = data[: int(cut * len(data))]
    bad = folder / "bad.pt"
    bad.write_bytes(bytes(data))
    try:
        read_weights(bad)  # a flip in padding or an unused byte may leave a readable file
    except WeightsError as err:
        assert "bad.pt" in str(err)
