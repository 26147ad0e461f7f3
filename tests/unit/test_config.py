"""PipelineConfig: one typed configuration of the live pipeline, from the environment, built once."""

from __future__ import annotations

import threading

import pytest
import torch

from cdinn_stream import PipelineConfig
from cdinn_stream.apps.config import ENVIRONMENT
from cdinn_stream.nn.model import CDINN, ModelConfig
from cdinn_stream.nn.options import PRECISIONS
from cdinn_stream.nn.reconstruct import CDIModel
from cdinn_stream.sinks import ZmqPublisherSink


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    return CDIModel(CDINN(ModelConfig(32, (8, 16, 32), 1, 4)), name="tiny", device="cpu", precision="fp32")


def test_from_env_reads_every_variable_and_options_win():
    env = {"CDINN_MODEL": "lab-net", "CDINN_PRECISION": "fp32", "CDINN_VIEWS": "2", "CDINN_BATCH_SIZE": "64",
           "CDINN_MAX_LATENCY": "0.05", "CDINN_BIN": "2", "CDINN_ZMQ_OUT": "tcp://127.0.0.1:5578",
           "TILED_URL": "http://127.0.0.1:8000", "TILED_API_KEY": "secret", "CDINN_TILED_PARENT": "mine",
           "CDINN_EPICS_PREFIX": "X:", "CDINN_SPOOL": "/tmp/spool", "CDINN_REFINE_EVERY": "10",
           "CDINN_REFINE_ITERATIONS": "20", "CDINN_DEVICE": "cpu", "CDINN_REFINE_ABOVE": "0.05",
           "CDINN_REFINE_BUDGET": "0.3", "CDINN_REFINE_SHARE": "0.25", "CDINN_REFINE_WINDOW": "2",
           "CDINN_ADAPT": "yes", "CDINN_ADAPT_DIR": "/tmp/adapted"}
    assert set(env) == set(ENVIRONMENT)  # the test covers every variable
    c = PipelineConfig.from_env(env, batch_size=128)
    assert (c.model, c.precision, c.views, c.batch_size, c.max_latency, c.bin) == ("lab-net", "fp32", 2, 128, 0.05, 2)
    assert (c.zmq_out, c.tiled_uri, c.tiled_parent, c.epics_prefix) == ("tcp://127.0.0.1:5578",
                                                                        "http://127.0.0.1:8000", "mine", "X:")
    assert (c.spool_dir, c.refine_every, c.refine_iterations, c.device) == ("/tmp/spool", 10, 20, "cpu")
    assert (c.refine_above, c.refine_budget, c.refine_share, c.refine_window) == (0.05, 0.3, 0.25, 2)
    assert (c.adapt, c.adapt_dir) == (True, "/tmp/adapted")
    assert "secret" not in repr(c)  # the key is never printed


def test_defaults_and_clear_errors():
    c = PipelineConfig.from_env({})
    assert c.model == "cdinn-32" and c.precision in PRECISIONS and c.refine_every is None
    with pytest.raises(ValueError, match="CDINN_VIEWS"):
        PipelineConfig.from_env({"CDINN_VIEWS": "many"})
    with pytest.raises(ValueError, match="CDINN_ADAPT.*flag"):
        PipelineConfig.from_env({"CDINN_ADAPT": "maybe"})
    with pytest.raises(ValueError, match="refine_budget"):
        PipelineConfig(refine_budget=1.5)
    with pytest.raises(ValueError, match="precision"):
        PipelineConfig(precision="int4")
    with pytest.raises(ValueError, match="views"):
        PipelineConfig(views=9)


def test_build_gives_the_callback_its_sinks_and_no_refiner_when_refinement_is_off(tiny):
    cb = PipelineConfig(zmq_out="tcp://127.0.0.1:0", bin=2, batch_size=16).build(model=tiny)
    try:
        assert [type(s) for s in cb.sinks] == [ZmqPublisherSink]
        assert cb.cropper.bin == 2 and cb.cropper.size == 32 and cb.engine.batch_size == 16
        assert cb.engine.refiner is None
        assert not any(t.name == "cdinn-refine" for t in threading.enumerate())
        with pytest.raises(ValueError, match="refinement is off"):
            cb.refine("some-run", [1])
    finally:
        cb.close()
        for s in cb.sinks:
            s.close()


def test_build_with_refinement_has_a_refiner(tiny):
    cb = PipelineConfig(refine_every=0).build(model=tiny)
    try:
        assert cb.engine.refiner is not None and cb.engine.refiner.alive
    finally:
        cb.close()
    assert not cb.engine.refiner.alive and not cb.engine.alive


def test_serve_and_replay_take_the_environment_for_options_not_given(monkeypatch):
    from cdinn_stream.apps.cli import _pipeline, build_parser

    monkeypatch.setenv("CDINN_MODEL", "cdinn-64")
    monkeypatch.setenv("CDINN_BATCH_SIZE", "32")
    monkeypatch.setenv("CDINN_TILED_PARENT", "beamline")
    args = build_parser().parse_args(["serve", "--zmq", "tcp://127.0.0.1:5578", "--views", "2"])
    c = _pipeline(args)
    assert (c.model, c.batch_size, c.views, c.tiled_parent) == ("cdinn-64", 32, 2, "beamline")
    args = build_parser().parse_args(["replay", "uid", "--tiled", "http://127.0.0.1:8000", "--batch-size", "8"])
    c = _pipeline(args, parent=args.parent)
    assert (c.batch_size, c.tiled_parent) == (8, "cdinn-replay")  # a replay never writes over live results


def test_a_misspelled_variable_is_named_and_a_bad_device_refused(caplog):
    PipelineConfig.from_env({"CDINN_MODLE": "lab-net", "CDINN_MODELS": "/somewhere"})
    assert "CDINN_MODLE" in caplog.text and "CDINN_MODELS" not in caplog.text.split("ignoring")[1].split("(")[0]
    with pytest.raises(ValueError, match="device"):
        PipelineConfig(device="gpu")
    assert PipelineConfig(device="cuda:1").device == "cuda:1"
