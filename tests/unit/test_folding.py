"""The folded inference form computes what the trained network computes."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cdinn_stream.core.simulate import simulate
from cdinn_stream.nn.folding import FoldedCDINN, depth_to_space, fold, space_to_depth
from cdinn_stream.nn.model import CDINN, ModelConfig, count_flops
from cdinn_stream.nn.reconstruct import CDIModel, load_model

CONFIGS = [
    ModelConfig(32, (8, 16, 32), 2, 4),  # the shipped cdinn-32's shape, narrower
    ModelConfig(32, (8, 16), 1, 4, patterson=True),
    ModelConfig(16, (8, 16, 32), 2, 2),
    ModelConfig(64, (8, 16, 32), 2, 4),
    ModelConfig(32, (8, 16, 32), 2, 4, phase_head="vector"),
    ModelConfig(16, (8, 16, 32), 2, 2, patterson=True, phase_head="vector"),
]


def _random_network(config: ModelConfig) -> CDINN:
    torch.manual_seed(1)
    net = CDINN(config).eval()
    with torch.no_grad():  # biases away from zero so that every ReLU and pooling has work to do
        for p in net.parameters():
            if p.ndim == 1:
                p.uniform_(-0.2, 0.2)
    return net


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.size}-{c.widths}-r{c.space_to_depth}"
                         f"{'-patterson' if c.patterson else ''}-{c.phase_head}")
def test_folded_network_equals_the_trained_network(config):
    net = _random_network(config)
    folded = fold(net)
    assert isinstance(folded, FoldedCDINN) and folded.dense_steps > 0
    x = torch.rand(6, 1, config.size, config.size)
    x /= x.amax(dim=(-2, -1), keepdim=True)
    with torch.no_grad():
        want, got = net.forward_logits(x), folded.forward_logits(x)
        want_out, got_out = net(x), folded(x)
    for w, g in zip(want, got, strict=True):
        assert g.shape == w.shape and g.dtype == torch.float32
        scale = float(w.abs().max())
        assert scale > 0
        torch.testing.assert_close(g, w, rtol=0, atol=1e-5 * scale)
    for w, g in zip(want_out, got_out, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-5)
    assert count_flops(folded) < count_flops(net)


def test_nothing_to_fold_gives_the_network_itself(tiny_model):
    net = tiny_model.network  # no space-to-depth: its smallest grid is 4x4
    assert fold(net) is net
    assert CDIModel(net, device="cpu").folded is None


def test_cdimodel_folds_on_the_cpu_with_the_same_results():
    shipped = load_model("cdinn-32", device="cpu", precision="fp32")
    assert isinstance(shipped.folded, FoldedCDINN)
    assert count_flops(shipped.folded) < 0.7 * count_flops(shipped.network)
    plain = CDIModel(shipped.network, device="cpu", precision="fp32", fold_small_steps=False, centre=shipped.centre)
    assert plain.folded is None
    frames = simulate(16, 32, seed=5, photons=1e6).intensity
    a, b = shipped.predict(frames), plain.predict(frames)
    np.testing.assert_allclose(a.amplitude, b.amplitude, atol=1e-5)
    np.testing.assert_allclose(a.phase, b.phase, atol=1e-4)
    eight = [CDIModel(shipped.network, device="cpu", precision="fp32", views=8, fold_small_steps=f,
                      centre=shipped.centre).predict(frames[:4])
             for f in (True, False)]  # the symmetry ensemble goes through the folded form too
    np.testing.assert_allclose(eight[0].amplitude, eight[1].amplitude, atol=1e-5)
    np.testing.assert_allclose(eight[0].phase, eight[1].phase, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("r,channels", [(4, 1), (2, 3), (3, 1)])  # r=3 in float32: no 12-byte dtype
def test_pixel_shuffles_in_one_copy_equal_torchs(dtype, r, channels):
    x = torch.rand(5, channels, 6 * r, 6 * r).to(dtype)
    got = space_to_depth(x, r)
    want = F.pixel_unshuffle(x, r)
    assert got.shape == want.shape and torch.equal(got, want)
    assert got.is_contiguous(memory_format=torch.channels_last)
    y = torch.rand(5, r * r, 6, 6).to(dtype).contiguous(memory_format=torch.channels_last)
    out = depth_to_space(y, r)
    assert out.dtype == torch.float32 and torch.equal(out, F.pixel_shuffle(y, r)[:, 0].float())


@pytest.mark.parametrize("layout", ["every other frame", "transposed", "offset by one", "channels-last view"])
def test_pixel_shuffles_take_any_layout(layout):
    """Strides or a storage offset that a wide-element view cannot take fall back to a plain copy."""
    base = torch.rand(9, 1, 24, 24)
    x = {"every other frame": base[::2], "transposed": base.transpose(2, 3),
         "offset by one": base.flatten()[1:].view(-1)[: 4 * 576].view(4, 1, 24, 24),
         "channels-last view": base[:, :, :, :].contiguous(memory_format=torch.channels_last)[1:]}[layout]
    assert torch.equal(space_to_depth(x, 4), F.pixel_unshuffle(x, 4))
    y = torch.rand(9, 16, 6, 6).contiguous(memory_format=torch.channels_last)
    y = {"every other frame": y[::2], "transposed": y.transpose(2, 3),
         "offset by one": y.flatten()[1:][: 4 * 576].view(4, 6, 6, 16).permute(0, 3, 1, 2),
         "channels-last view": y[1:]}[layout]
    assert torch.equal(depth_to_space(y, 4), F.pixel_shuffle(y, 4)[:, 0])


def test_folded_model_takes_non_contiguous_amplitudes():
    shipped = load_model("cdinn-32", device="cpu", precision="fp32")
    plain = CDIModel(shipped.network, device="cpu", precision="fp32", fold_small_steps=False, centre=shipped.centre)
    amplitude = torch.rand(6, 32, 32)
    for x in (amplitude[::2], amplitude.transpose(1, 2), amplitude.flatten()[1:][: 4 * 1024].view(4, 32, 32)):
        got, want = shipped.predict_tensor(x), plain.predict_tensor(x)
        torch.testing.assert_close(got[0], want[0], rtol=0, atol=1e-4)  # amplitude
        inside = want[0] > 0.1  # the phase where it means something (the vector head's angle is noise outside)
        torch.testing.assert_close(got[1][inside], want[1][inside], rtol=0, atol=1e-4)
