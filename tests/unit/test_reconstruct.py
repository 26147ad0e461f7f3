import numpy as np
import pytest
import torch

from cdinn_stream import load_model
from cdinn_stream.core.simulate import simulate
from cdinn_stream.nn.reconstruct import DEFAULT_MODEL, model_path


def test_predict_shapes_types_and_support(tiny_model, small_set):
    rec = tiny_model.predict(small_set.intensity)
    assert rec.amplitude.shape == rec.phase.shape == (64, 32, 32)
    assert rec.amplitude.dtype == rec.phase.dtype == np.float32
    assert rec.amplitude.min() >= 0 and rec.amplitude.max() <= 1
    assert np.all(rec.phase[~rec.support] == 0)
    one = tiny_model.predict(small_set.intensity[0])
    assert one.amplitude.shape == (1, 32, 32)
    np.testing.assert_allclose(one.amplitude[0], rec.amplitude[0], atol=1e-5)
    # torch input, integer counts, any overall scale
    t = tiny_model.predict(torch.from_numpy(small_set.intensity[:4]) * 1000)
    np.testing.assert_allclose(t.amplitude, rec.amplitude[:4], atol=1e-5)
    counts = np.round(small_set.intensity[:4] * 1e6).astype(np.uint32)
    assert tiny_model.predict(counts).amplitude.shape == (4, 32, 32)
    # batching does not change the answer
    np.testing.assert_allclose(tiny_model.predict(small_set.intensity, batch_size=7).phase, rec.phase, atol=1e-5)


@pytest.mark.parametrize(
    "frames, match",
    [
        (np.ones((2, 64, 64)), r"\(64, 64\) but this model takes \(32, 32\)"),
        (np.ones((2, 2, 32, 32)), "expected"),
        (np.ones(32), "expected"),
        (np.zeros((0, 32, 32)), "no frames"),
        (np.ones((32, 32), complex), "real numbers"),
        (np.array([["a"] * 32] * 32), "real numbers"),
    ],
)
def test_bad_shapes_and_types(tiny_model, frames, match):
    with pytest.raises(ValueError, match=match):
        tiny_model.predict(frames)


@pytest.mark.parametrize("value, match", [(np.nan, "NaN or inf in frame"), (np.inf, "NaN or inf"),
                                          (-1.0, "negative"), (None, "all-zero")])
def test_bad_values_name_the_frame(tiny_model, small_set, value, match):
    frames = small_set.intensity[:5].copy()
    if value is None:
        frames[3] = 0
    else:
        frames[3, 4, 5] = value
    with pytest.raises(ValueError, match=match) as err:
        tiny_model.predict(frames)
    assert "[3]" in str(err.value)


def test_shipped_default_model_loads_and_predicts(small_set):
    assert model_path(DEFAULT_MODEL).stat().st_size < 20_000_000
    model = load_model(device="cpu")
    assert model.size == 32 and model.card.get("name") == DEFAULT_MODEL
    rec = model.predict(small_set.intensity[:8])
    assert rec.amplitude.shape == (8, 32, 32)
    with pytest.raises(ValueError, match="no shipped model named"):
        load_model("cdinn-nope")


def test_shipped_default_model_is_accurate():
    """Regression guard on the shipped weights: 300 fresh samples (the card reports 1,000)."""
    from cdinn_stream import simulate
    from cdinn_stream.core.metrics import score

    data = simulate(300, 32, seed=424242)
    rec = load_model(device="cpu").predict(data.intensity)
    m = score(rec.amplitude, rec.phase, data.amplitude, data.phase, data.intensity)
    assert np.median(m["support_iou"]) >= 0.78
    assert np.median(m["chi2"]) <= 0.08
    assert np.median(m["phase_rmse"]) <= 0.25


def test_precision_options(tiny_model):
    import torch

    from cdinn_stream.nn.reconstruct import CDIModel, resolve_precision

    cpu = torch.device("cpu")
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision("int4", cpu)
    with pytest.raises(ValueError, match="fp16 inference needs a GPU"):
        resolve_precision("fp16", cpu)
    assert resolve_precision("auto", cpu) in ("bf16", "fp32")
    frames = simulate(8, 32, seed=3).intensity
    fp32 = CDIModel(tiny_model.network, precision="fp32").predict(frames)
    bf16 = CDIModel(tiny_model.network, precision="bf16").predict(frames)
    np.testing.assert_allclose(bf16.amplitude, fp32.amplitude, atol=0.02)  # bf16: ~3 significant digits
    auto = CDIModel(tiny_model.network, precision="auto")
    np.testing.assert_array_equal(auto.predict(frames).amplitude,
                                  (bf16 if auto.precision == "bf16" else fp32).amplitude)


def test_cuda_graphs_only_on_a_gpu(tiny_model):
    from cdinn_stream.nn.reconstruct import CDIModel

    assert CDIModel(tiny_model.network, device="cpu").cuda_graphs is False
    with pytest.raises(ValueError, match="CUDA"):
        CDIModel(tiny_model.network, device="cpu", cuda_graphs=True)


def test_allocator_tuning_is_opt_in_and_takes_on_linux(monkeypatch, tiny_model):
    import sys

    import cdinn_stream.nn.reconstruct as rc

    monkeypatch.setattr(rc, "_MALLOC_TUNED", False)
    monkeypatch.delenv("CDINN_MALLOC_TUNING", raising=False)
    rc.CDIModel(tiny_model.network, device="cpu", precision="fp32")
    assert rc._MALLOC_TUNED is False, "off unless asked for"
    monkeypatch.setenv("CDINN_MALLOC_TUNING", "1")
    rc.CDIModel(tiny_model.network, device="cpu", precision="fp32")
    if sys.platform.startswith("linux"):  # glibc's mallopt took both settings
        assert rc._MALLOC_TUNED is True and rc.keep_freed_memory() is True


def test_phase_is_the_networks_everywhere_and_masked_for_display():
    from cdinn_stream.core.physics import SUPPORT_THRESHOLD

    rec = load_model("cdinn-32", device="cpu").predict(simulate(4, 32, seed=3).intensity)
    outside = rec.amplitude <= SUPPORT_THRESHOLD
    assert outside.any() and np.abs(rec.phase[outside]).max() > 0, "no zeroing: the network's phase"
    assert np.all(rec.masked_phase[outside] == 0) and np.all(rec.masked_phase[~outside] == rec.phase[~outside])
    np.testing.assert_array_equal(rec.support, ~outside)


def test_without_onednn_int8_the_error_says_what_to_do(monkeypatch, tmp_path):
    """Runs on every torch build (the int8 tests in test_int8.py need oneDNN's operators)."""
    import cdinn_stream.nn.int8 as int8_module
    from cdinn_stream.nn.int8 import FORMAT, Int8CDINN
    from cdinn_stream.nn.model import ModelConfig
    from cdinn_stream.nn.reconstruct import read_network

    config = ModelConfig(32, (8, 16, 32), 2, 4)

    monkeypatch.setattr(int8_module, "int8_available", lambda: False)
    with pytest.raises(RuntimeError, match="no oneDNN int8 operators"):
        Int8CDINN(config, {}, (1 / 255, 0))
    path = tmp_path / "x-int8.pt"
    torch.save({"format": FORMAT, "config": config.to_dict(), "input_qparams": [1 / 255, 0], "layers": {}}, path)
    with pytest.raises(RuntimeError, match="use the float model"):
        read_network(path)
