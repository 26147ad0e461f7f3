import math

import numpy as np
import pytest
import torch

from cdinn_stream.core.physics import normalized_amplitude, twin_phase_torch, twin_torch
from cdinn_stream.core.simulate import simulate
from cdinn_stream.lab.losses import sample_losses, twin_aware_loss
from cdinn_stream.nn.model import CDINN, ModelConfig, count_flops
from cdinn_stream.nn.weights import WeightsError, read_weights, save_weights


@pytest.mark.parametrize(
    "cfg",
    [ModelConfig(32, (8, 16, 32), 2), ModelConfig(64, (4, 8, 16), 1), ModelConfig(32, (8, 16, 32), 1, 4),
     ModelConfig(128, (4, 8), 1, 2), ModelConfig(32, (8, 16, 32), 1, 4, True), ModelConfig(64, (4, 8, 16), 1, 1, True),
     ModelConfig(32, (8, 16, 32), 2, 4, phase_head="vector"), ModelConfig(32, (8, 16), 1, 1, phase_head="vector")],
)
def test_output_shapes_and_ranges(cfg):
    torch.manual_seed(0)
    m = CDINN(cfg).eval()
    x = torch.rand(3, 1, cfg.size, cfg.size)
    amp, phase = m(x)
    assert amp.shape == phase.shape == (3, cfg.size, cfg.size)
    assert amp.min() >= 0 and amp.max() <= 1
    assert phase.min() >= -math.pi and phase.max() <= math.pi
    assert count_flops(m) > 0


def test_paper_architecture_layers():
    m = CDINN(ModelConfig(32, (32, 64, 128), 2))
    convs = [layer for layer in m.encoder if isinstance(layer, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32, 32, 64, 64, 128, 128]
    assert sum(isinstance(layer, torch.nn.MaxPool2d) for layer in m.encoder) == 3
    assert sum(isinstance(layer, torch.nn.Upsample) for layer in m.shape_decoder) == 3


def test_size_must_fit_the_pooling():
    with pytest.raises(ValueError, match="multiple"):
        CDINN(ModelConfig(36, (8, 16, 32)))


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(1)
    m = CDINN(ModelConfig(32, (4, 8, 16), 1, 2, patterson=True)).eval()
    save_weights(m, tmp_path / "w.pt", meta={"note": "x"})
    back = read_weights(tmp_path / "w.pt")
    assert back.config == m.config
    x = torch.rand(2, 1, 32, 32)
    for a, b in zip(m(x), back(x), strict=True):
        torch.testing.assert_close(a, b)


def test_bad_weight_files_give_clear_errors(tmp_path):
    m = CDINN(ModelConfig(32, (4, 8, 16), 1))
    good = tmp_path / "good.pt"
    save_weights(m, good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:1000])
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a model" * 100)
    wrong = tmp_path / "wrong.pt"
    torch.save({"format": "cdinn-stream/999", "config": {}, "state_dict": {}}, wrong)
    code = tmp_path / "code.pt"
    torch.save({"format": "cdinn-stream/1", "payload": np.dtype}, code)  # needs unpickling a class
    for path, match in [(truncated, "cannot read"), (garbage, "cannot read"), (wrong, "not a cdinn-stream/1"),
                        (code, "cannot read"), (tmp_path / "missing.pt", "no weights file")]:
        with pytest.raises(WeightsError, match=match):
            read_weights(path)


def test_twin_aware_loss_forgives_the_twin_only():
    s = simulate(8, 32, seed=5)
    a, p = torch.from_numpy(s.amplitude), torch.from_numpy(s.phase)
    # logits that reproduce the twin exactly (up to the clamp of the logit)
    ta, tp = twin_torch(a), twin_phase_torch(p)
    shape_logits = torch.logit(ta.clamp(1e-4, 1 - 1e-4))
    phase_logits = torch.logit((tp / (2 * math.pi) + 0.5).clamp(1e-6, 1 - 1e-6))
    direct = sample_losses(shape_logits, phase_logits, a, p)
    best = twin_aware_loss(shape_logits, phase_logits, a, p)
    floor = sample_losses(shape_logits, phase_logits, ta, tp).mean()
    assert float(best) == pytest.approx(float(floor), rel=1e-5)
    assert float(direct.mean()) > float(best) + 0.05


def test_tiny_model_loss_falls():
    torch.manual_seed(0)
    s = simulate(256, 32, seed=6)
    x = normalized_amplitude(s.intensity)[:, None]
    a, p = torch.from_numpy(s.amplitude), torch.from_numpy(s.phase)
    m = CDINN(ModelConfig(32, (8, 16, 32), 1, 2))
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        sl, pl = m.forward_logits(x)
        loss = twin_aware_loss(sl, pl, a, p)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
    assert np.mean(losses[-5:]) < np.mean(losses[:5])


def test_offset_invariant_phase_loss_ignores_a_global_offset_only():
    s = simulate(8, 32, seed=5)
    a, p = torch.from_numpy(s.amplitude), torch.from_numpy(s.phase)
    shape_logits = torch.logit(a.clamp(1e-4, 1 - 1e-4))

    def logits(phase):
        return torch.logit((phase / (2 * math.pi) + 0.5).clamp(1e-6, 1 - 1e-6))

    exact = sample_losses(shape_logits, logits(p * (a > 0.1)), a, p, offset_invariant=True)
    shifted = sample_losses(shape_logits, logits((p + 0.4) * (a > 0.1)), a, p, offset_invariant=True)
    absolute = sample_losses(shape_logits, logits((p + 0.4) * (a > 0.1)), a, p, offset_invariant=False)
    # an offset costs only the small anchor term, not the full squared error
    torch.testing.assert_close(shifted - exact, torch.full_like(exact, 0.1 * 0.4**2), atol=2e-3, rtol=0)
    assert torch.all(absolute - exact > 0.15)
    yy = torch.arange(32.0)[:, None].expand(32, 32) / 32
    tilted = sample_losses(shape_logits, logits((p + yy) * (a > 0.1)), a, p, offset_invariant=True)
    assert torch.all(tilted - exact > 0.01)  # a phase ramp is a real error


def test_deepen_keeps_the_function_and_doubles_the_convolutions():
    from cdinn_stream.nn.model import deepen

    torch.manual_seed(3)
    m = CDINN(ModelConfig(32, (8, 16, 32), 1, 4)).eval()
    with torch.no_grad():  # non-trivial biases, as after training
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    d = deepen(m).eval()
    assert d.config.convs_per_stage == 2
    assert sum(isinstance(x, torch.nn.Conv2d) for x in d.modules()) == 2 * sum(
        isinstance(x, torch.nn.Conv2d) for x in m.modules()) - 2  # the decoders' last convs stay single
    x = torch.rand(4, 1, 32, 32)
    with torch.no_grad():
        for a, b in zip(m(x), d(x), strict=True):
            torch.testing.assert_close(a, b)


def test_patterson_channels_are_the_autocorrelation_of_the_object():
    """IFT(|F|^2) is the object's circular autocorrelation, centred, with 1 at zero lag."""
    from cdinn_stream.core.physics import far_field_torch
    from cdinn_stream.nn.model import patterson_channels

    torch.manual_seed(4)
    n = 16
    obj = torch.zeros(2, n, n, dtype=torch.complex128)
    obj[:, 5:10, 6:9] = torch.polar(torch.rand(2, 5, 3, dtype=torch.float64) + 0.5,
                                    torch.rand(2, 5, 3, dtype=torch.float64))
    amplitude = far_field_torch(obj).abs()
    x = (amplitude / amplitude.amax(dim=(-2, -1), keepdim=True))[:, None].float()
    feats = patterson_channels(x)
    assert feats.shape == (2, 3, n, n) and feats.dtype == torch.float32
    torch.testing.assert_close(feats[:, 0], x[:, 0])
    # direct circular autocorrelation: A[s] = sum_r o[r + s] conj(o[r]), centred at n // 2
    acf = torch.stack([torch.stack([torch.stack([(torch.roll(o, (-sy, -sx), dims=(0, 1)) * o.conj()).sum()
                                                 for sx in range(n)]) for sy in range(n)]) for o in obj])
    acf = torch.fft.fftshift(acf, dim=(-2, -1))
    acf = acf / acf[:, n // 2, n // 2].real[:, None, None]
    torch.testing.assert_close(feats[:, 1].double(), acf.real, atol=1e-5, rtol=0)
    torch.testing.assert_close(feats[:, 2].double(), acf.imag, atol=1e-5, rtol=0)
    assert torch.allclose(feats[:, 1, n // 2, n // 2], torch.ones(2))


def test_with_patterson_keeps_the_function_and_adds_two_input_channels():
    from cdinn_stream.nn.model import with_patterson

    torch.manual_seed(5)
    for cfg in (ModelConfig(32, (8, 16, 32), 1, 4), ModelConfig(32, (8, 16, 32), 2, 1)):
        m = CDINN(cfg).eval()
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.05 * torch.randn_like(p))
        w = with_patterson(m).eval()
        assert w.config.patterson and with_patterson(w) is w
        first = next(x for x in w.encoder if isinstance(x, torch.nn.Conv2d))
        assert first.in_channels == 3 * cfg.space_to_depth**2
        x = torch.rand(3, 1, 32, 32)
        with torch.no_grad():
            for a, b in zip(m(x), w(x), strict=True):
                torch.testing.assert_close(a, b)
        assert count_flops(w) > count_flops(m)


def test_vector_phase_head_starts_from_the_angle_head_and_survives_a_weights_file(tmp_path):
    """with_vector_phase keeps the shape and, where the angle head's phase is small, the phase; the
    vector network's loss has gradients; its weights file says which head it has."""
    from cdinn_stream.nn.model import phase_of, with_vector_phase

    torch.manual_seed(6)
    for cfg in (ModelConfig(32, (8, 16, 32), 2, 4), ModelConfig(32, (8, 16), 1, 1)):
        m = CDINN(cfg).eval()
        with torch.no_grad():  # small phase logits, as a network trained on weak strain gives
            last = [x for x in m.phase_decoder if isinstance(x, torch.nn.Conv2d)][-1]
            last.weight.mul_(0.1)
            last.bias.mul_(0.1)
        v = with_vector_phase(m).eval()
        assert v.config.phase_head == "vector" and with_vector_phase(v) is v
        x = torch.rand(4, 1, 32, 32)
        with torch.no_grad():
            (a0, p0), (a1, p1) = m(x), v(x)
            s, ph = v.forward_logits(x)
        assert ph.shape == (4, 2, 32, 32)
        torch.testing.assert_close(a1, a0)
        assert 0.01 < float(p0.abs().max()) < 0.5
        assert float((p1 - p0).abs().max()) < 0.05 * float(p0.abs().max())  # atan(pi z / 2) against the sigmoid's
        torch.testing.assert_close(phase_of(ph), p1)
        save_weights(v, tmp_path / "v.pt")
        back = read_weights(tmp_path / "v.pt")
        assert back.config.phase_head == "vector"
    with pytest.raises(ValueError, match="phase_head"):
        ModelConfig(phase_head="cos")
    # the loss: gradients reach both channels and stay finite; a dislocation's vortex is exactly
    # representable (loss ~0 for the unit vector field)
    v.train()
    amp = torch.zeros(2, 32, 32)
    amp[:, 8:24, 8:24] = 1.0
    yy, xx = torch.meshgrid(torch.arange(32.0) - 15.5, torch.arange(32.0) - 15.5, indexing="ij")
    vortex = torch.atan2(yy, xx).expand(2, 32, 32)
    s, ph = v.forward_logits(torch.rand(2, 1, 32, 32))
    loss = twin_aware_loss(s, ph, amp, vortex, support_weight=1.0)
    loss.backward()
    grad = [x for x in v.phase_decoder if isinstance(x, torch.nn.Conv2d)][-1].weight.grad
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    exact = torch.stack([torch.cos(vortex), torch.sin(vortex)], 1)
    logits = torch.full((2, 32, 32), 20.0) * (2 * amp - 1)  # the true shape, sure of itself
    assert float(sample_losses(logits, exact, amp, vortex).max()) < 1e-6
