"""The int8 network: oneDNN's integer steps compute the quantized arithmetic, and the whole
network follows its float self."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cdinn_stream.core.physics import normalized_amplitude
from cdinn_stream.core.simulate import simulate
from cdinn_stream.nn.folding import fold
from cdinn_stream.nn.int8 import (
    FORMAT,
    Int8CDINN,
    _QuantizedStep,
    _symmetric_int8,
    int8_available,
    quantize,
    save_int8_weights,
)
from cdinn_stream.nn.model import CDINN, ModelConfig
from cdinn_stream.nn.reconstruct import CDIModel, load_model, read_network
from cdinn_stream.nn.weights import WeightsError, save_weights

pytestmark = pytest.mark.skipif(not int8_available(), reason="no oneDNN int8 operators in this torch build")

CONFIGS = [
    ModelConfig(32, (8, 16, 32), 2, 4),  # the shipped cdinn-32's shape, narrower
    ModelConfig(16, (8, 16, 32), 2, 2),
    ModelConfig(64, (8, 16, 32), 1, 4),
    ModelConfig(16, (8, 16), 2, 1),  # no space-to-depth, nothing folded
    ModelConfig(32, (8, 16, 32), 2, 4, phase_head="vector"),
    ModelConfig(16, (8, 16), 2, 1, phase_head="vector"),
]


def _amplitudes(n: int, size: int, seed: int = 3) -> torch.Tensor:
    intensity = simulate(n, max(size, 32), seed=seed).intensity
    lo = (intensity.shape[-1] - size) // 2  # the centre of a larger pattern for small sizes
    intensity = intensity[:, lo : lo + size, lo : lo + size]
    return normalized_amplitude(torch.as_tensor(intensity))[:, None].contiguous(
        memory_format=torch.channels_last)


def _network(config: ModelConfig) -> CDINN:
    torch.manual_seed(1)
    net = CDINN(config).eval()
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim == 1:
                p.uniform_(-0.2, 0.2)
    return net


def _layer(module: nn.Module, out_scale: float, out_zero_point: int) -> dict:
    weight, scale = _symmetric_int8(module.weight.detach())
    return {"weight": weight, "weight_scale": scale, "bias": module.bias.detach().clone(), "out_scale": out_scale,
            "out_zero_point": out_zero_point}


@pytest.mark.parametrize("kind", ["conv", "linear"])
@pytest.mark.parametrize("relu", [True, False])
def test_quantized_step_computes_the_quantized_arithmetic(kind, relu):
    torch.manual_seed(0)
    module = nn.Conv2d(16, 24, 3, padding=1) if kind == "conv" else nn.Linear(64, 48)
    shape = (8, 16, 6, 6) if kind == "conv" else (8, 64)
    x = torch.randint(0, 256, shape, dtype=torch.uint8)
    if kind == "conv":
        x = x.contiguous(memory_format=torch.channels_last)
    x_scale, x_zero_point, out_scale, out_zero_point = 0.01, 7, 0.004, 0 if relu else 100
    layer = _layer(module, out_scale, out_zero_point)
    step = _QuantizedStep(module, layer, (x_scale, x_zero_point), relu, to_float=False)
    got = step(x)
    assert got.dtype == torch.uint8 and got.shape[:2] == (8, 24 if kind == "conv" else 48)

    w = layer["weight"].float() * layer["weight_scale"].view(-1, *[1] * (module.weight.dim() - 1))
    xf = (x.float() - x_zero_point) * x_scale
    y = F.conv2d(xf, w, layer["bias"], padding=1) if kind == "conv" else F.linear(xf, w, layer["bias"])
    y = F.relu(y) if relu else y
    want = torch.clamp(torch.round(y / out_scale) + out_zero_point, 0, 255)
    diff = (got.float() - want).abs()
    assert diff.max() <= 1  # float rounding at the half-way points only
    assert (diff > 0).float().mean() < 1e-3

    as_float = _QuantizedStep(module, layer, (x_scale, x_zero_point), relu, to_float=True)(x)
    assert as_float.dtype == torch.float32
    torch.testing.assert_close(as_float, y, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("config", CONFIGS,
                         ids=lambda c: f"{c.size}-{c.widths}-{c.convs_per_stage}-r{c.space_to_depth}-{c.phase_head}")
def test_int8_network_follows_the_float_network(config):
    net = _network(config)
    x = _amplitudes(64, config.size)
    int8 = quantize(net, x)
    with torch.no_grad():
        want = fold(net).forward_logits(x)
    got = int8.forward_logits(x)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape and g.dtype == torch.float32
        rel = float((g - w).norm() / w.norm())
        assert rel < 0.01, rel
    amplitude, phase = int8(x)
    assert 0 <= float(amplitude.min()) and float(amplitude.max()) <= 1
    assert -np.pi <= float(phase.min()) and float(phase.max()) <= np.pi


def test_int8_weights_file_round_trip(tmp_path):
    config = CONFIGS[0]
    net = _network(config)
    x = _amplitudes(16, config.size)
    int8 = quantize(net, x)
    path = tmp_path / "tiny-int8.pt"
    save_int8_weights(int8, path, meta={"note": "test"})
    assert torch.load(path, weights_only=True)["format"] == FORMAT
    assert isinstance(read_network(path), Int8CDINN)
    model = load_model(path)
    assert model.precision == "int8" and model.device.type == "cpu" and model.folded is None
    intensity = simulate(5, config.size, seed=9).intensity
    got = model.predict(intensity)
    want = CDIModel(int8, device="cpu").predict(intensity)
    np.testing.assert_array_equal(got.amplitude, want.amplitude)
    np.testing.assert_array_equal(got.phase, want.phase)
    eight = CDIModel(int8, device="cpu", views=8).predict(intensity)  # the ensemble runs it too
    assert eight.amplitude.shape == (5, config.size, config.size)


def test_int8_refuses_what_it_cannot_run(tmp_path):
    config = CONFIGS[0]
    int8 = quantize(_network(config), _amplitudes(8, config.size))
    with pytest.raises(ValueError, match="computes in int8"):
        CDIModel(int8, device="cpu", precision="bf16")
    with pytest.raises(ValueError, match="CPU only"):
        CDIModel(int8, device="cuda")
    with pytest.raises(ValueError, match="needs an int8 network"):
        CDIModel(_network(config), device="cpu", precision="int8")
    with pytest.raises(ValueError, match="autocorrelation"):
        quantize(_network(ModelConfig(32, (8, 16), 1, 4, patterson=True)), _amplitudes(4, 32))
    layers = int8.layers
    name = next(iter(layers))
    bad = {**layers, name: {**layers[name], "weight": layers[name]["weight"].float()}}
    with pytest.raises(ValueError, match="int8 weight"):
        Int8CDINN(config, bad, int8.input_qparams)
    with pytest.raises(ValueError, match="no layer"):
        Int8CDINN(config, {k: v for k, v in layers.items() if k != name}, int8.input_qparams)
    layer = layers[name]
    for change, message in (({"weight_scale": layer["weight_scale"][:2]}, "weight_scale"),
                            ({"weight_scale": -layer["weight_scale"]}, "weight_scale"),
                            ({"bias": layer["bias"][:-1]}, "bias"),
                            ({"out_zero_point": 300}, "zero point"),
                            ({"out_scale": float("nan")}, "scale")):
        with pytest.raises(ValueError, match=message):
            Int8CDINN(config, {**layers, name: {**layer, **change}}, int8.input_qparams)
    with pytest.raises(ValueError, match="input"):
        Int8CDINN(config, layers, (0.0, 0))
    with pytest.raises(ValueError, match="folded form itself"):
        CDIModel(int8, device="cpu", fold_small_steps=False)
    path = tmp_path / "broken-int8.pt"
    torch.save({"format": FORMAT, "config": config.to_dict(), "input_qparams": [1 / 255, 0], "layers": bad}, path)
    with pytest.raises(WeightsError, match="do not match"):
        load_model(path)


def test_int8_network_copies_lands_on_the_cpu_and_leaves_the_seed(monkeypatch):
    import copy

    config = CONFIGS[0]
    int8 = quantize(_network(config), _amplitudes(8, config.size))
    x = _amplitudes(4, config.size, seed=5)
    twin = copy.deepcopy(int8)
    for a, b in zip(int8.forward_logits(x), twin.forward_logits(x), strict=True):
        assert torch.equal(a, b)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert CDIModel(int8).device.type == "cpu"
    torch.manual_seed(0)
    want = torch.rand(3)
    torch.manual_seed(0)
    Int8CDINN(config, int8.layers, int8.input_qparams)
    assert torch.equal(torch.rand(3), want)


def test_command_line_offers_every_precision():
    from cdinn_stream import cli, reconstruct

    assert cli.PRECISIONS == reconstruct.PRECISIONS


def test_int8_model_evaluates_and_publishes_with_a_card(tmp_path):
    import json

    from cdinn_stream.apps.cli import main
    from cdinn_stream.lab.card import publish_int8

    config = CONFIGS[0]
    weights = tmp_path / "tiny-int8.pt"
    save_int8_weights(quantize(_network(config), _amplitudes(16, config.size)), weights)
    ev = tmp_path / "ev"
    assert main(["evaluate", "--model", str(weights), "--out", str(ev), "-n", "12", "--no-erhio",
                 "--refine-iterations", "0"]) == 0
    report = json.loads((ev / "report.json").read_text())
    assert report["precision"] == "int8" and report["methods"]["nn"]["ms_per_pattern_batched"] > 0
    models = tmp_path / "models"
    models.mkdir()
    (models / "tiny.json").write_text(json.dumps({"name": "tiny", "code_commit": "abc1234", "evaluation": {"n": 1}}))
    stage = {"recipe": {"lr": 1e-4, "data_seed": 123, "photons": [1e4, 1e7]}, "steps": 100, "batch": 256,
             "train_samples": 1000, "training_seconds": 60.0}
    card_path = publish_int8(weights, ev, "tiny-int8", models, source="tiny", stages=[stage, stage])
    card = json.loads(card_path.read_text())
    assert card["format"] == FORMAT and card["fine_tuned_from"]["name"] == "tiny"
    assert card["steps"] == 200 and card["epochs_run"] == 51.2 and card["total_training_seconds"] == 120.0
    assert card["computed_flops_per_frame"] < card["flops_per_frame"]
    assert card["evaluation"]["precision"] == "int8" and len(card["code_commit"]) >= 7
    model = load_model(models / "tiny-int8.pt")
    assert model.precision == "int8" and model.card["name"] == "tiny-int8"
    float_weights = tmp_path / "tiny.pt"
    save_weights(_network(config), float_weights)
    with pytest.raises(ValueError, match="not an int8 weights file"):
        publish_int8(float_weights, ev, "x", models, source="tiny", stages=[stage])


def test_shipped_int8_model_reconstructs_like_its_card_says():
    model = load_model("cdinn-32", precision="int8")
    assert model.name == "cdinn-32-int8" and model.precision == "int8" and model.device.type == "cpu"
    card = model.card
    assert card["format"] == FORMAT and card["fine_tuned_from"]["name"] == "cdinn-32"
    from cdinn_stream.core.metrics import score

    data = simulate(200, 32, seed=31415926)
    rec = model.predict(data.intensity)
    iou = float(np.median(score(rec.amplitude, rec.phase, data.amplitude, data.phase, data.intensity)["support_iou"]))
    card_iou = card["evaluation"]["methods"]["nn"]["metrics"]["support_iou"]["median"]
    assert iou > card_iou - 0.02  # 200 of the card's 1,000 samples

