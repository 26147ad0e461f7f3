"""The realistic crystal recipe, the centring rule, the strain view and off-centre patterns."""

import numpy as np
import pytest
import torch

from cdinn_stream.core.crystal import crystal_objects, detector_counts, phase_ramp
from cdinn_stream.core.metrics import score
from cdinn_stream.core.physics import SUPPORT_THRESHOLD, far_field, peak_offsets, ramp, strain, wrap
from cdinn_stream.core.simulate import diffraction_intensity, simulate
from cdinn_stream.lab.losses import sample_losses
from cdinn_stream.live.crop import find_peaks


@pytest.fixture(scope="module")
def crystals():
    return simulate(200, 32, seed=11, recipe="crystal")


def test_crystal_recipe_conventions(crystals):
    s = crystals
    assert s.intensity.shape == s.amplitude.shape == s.phase.shape == (200, 32, 32)
    assert s.amplitude.min() >= 0 and np.allclose(s.amplitude.max(axis=(1, 2)), 1)
    support = s.amplitude > SUPPORT_THRESHOLD
    assert np.all(s.phase[~support] == 0)
    assert s.phase.min() >= -np.pi and s.phase.max() < np.pi
    idx = np.arange(32)
    cy = (s.amplitude.sum(2) * idx).sum(1) / s.amplitude.sum((1, 2))
    cx = (s.amplitude.sum(1) * idx).sum(1) / s.amplitude.sum((1, 2))
    assert np.all(np.abs(cy - 16) <= 0.5 + 1e-6) and np.all(np.abs(cx - 16) <= 0.5 + 1e-6)
    np.testing.assert_allclose(s.intensity, np.abs(far_field(s.amplitude * np.exp(1j * s.phase))) ** 2,
                               rtol=1e-3, atol=1e-5)


def test_crystal_recipe_is_varied_like_measured_crystals(crystals):
    s = crystals
    support = s.amplitude > SUPPORT_THRESHOLD
    extent = np.array([max(np.ptp(np.nonzero(m)[0]), np.ptp(np.nonzero(m)[1])) + 1 for m in support]) / 32
    assert extent.min() >= 0.2 and extent.max() <= 1.0
    assert np.percentile(extent, 10) < 0.45 and np.percentile(extent, 90) > 0.75, "30-90 % of the field"
    # amplitude that is not flat: inside the crystal (away from its edge) it varies by >= 5 % in most
    core = s.amplitude > 0.5
    spread = np.array([a[c].std() / a[c].mean() for a, c in zip(s.amplitude, core, strict=True)])
    assert np.median(spread) > 0.05
    # strain from weak (0.1 rad) to several rad, once the peak's ramp is taken out
    rms = np.array([st[m].std() for st, m in zip(s.strain, support, strict=True)])
    assert rms.min() < 0.1 and rms.max() > 0.8
    # the Bragg peak is off the centre for most patterns (the ramp is kept)
    assert (peak_offsets(s.intensity) != 0).any(dim=1).float().mean() > 0.5


def test_same_seed_same_crystals_for_any_workers():
    a = simulate(40, 32, seed=3, recipe="crystal", photons=1e5)
    b = simulate(40, 32, seed=3, recipe="crystal", photons=1e5, workers=2)
    np.testing.assert_array_equal(a.intensity, b.intensity)
    np.testing.assert_array_equal(a.phase, b.phase)


def test_dislocations_are_phase_vortices():
    rng = np.random.default_rng(5)
    a, p = crystal_objects(rng, 300, 32, offset=False)
    winding = []
    for ph, am in zip(p, a, strict=True):
        inside = am > 0.3
        # winding number around every 2x2 plaquette fully inside the crystal
        d1 = wrap(ph[:-1, 1:] - ph[:-1, :-1])
        d2 = wrap(ph[1:, 1:] - ph[:-1, 1:])
        d3 = wrap(ph[1:, :-1] - ph[1:, 1:])
        d4 = wrap(ph[:-1, :-1] - ph[1:, :-1])
        w = np.rint((d1 + d2 + d3 + d4) / (2 * np.pi))
        ok = inside[:-1, :-1] & inside[1:, 1:] & inside[:-1, 1:] & inside[1:, :-1]
        winding.append(np.abs(w[ok]).sum())
    frac = np.mean(np.array(winding) > 0)
    assert 0.05 < frac < 0.5, f"{frac:.2f} of crystals hold a vortex"


def test_phase_ramp_moves_the_bragg_peak_by_whole_pixels():
    rng = np.random.default_rng(1)
    a, _ = crystal_objects(rng, 4, 32, offset=False)
    flat = diffraction_intensity(a, np.zeros_like(a))
    moved = diffraction_intensity(a, phase_ramp(np.array([[1, -2]] * 4), 32).astype(np.float32))
    np.testing.assert_allclose(moved, np.roll(flat, (1, -2), axis=(1, 2)), rtol=1e-3, atol=1e-6)


def test_detector_counts():
    rng = np.random.default_rng(2)
    clean = simulate(300, 32, seed=2, recipe="crystal").intensity
    counts = detector_counts(rng, clean, photons=1e5)
    assert np.all(counts == np.round(counts)) and counts.min() >= 0
    totals = counts.sum(axis=(1, 2))
    assert np.median(totals) == pytest.approx(1e5, rel=0.3)  # hot pixels add, gaps remove
    zero_rows = ((counts == 0).all(axis=2).any(axis=1) | (counts == 0).all(axis=1).any(axis=1)).mean()
    assert 0.1 < zero_rows < 0.35, "a gap in about a fifth of the frames"
    # hot pixels: a lone pixel far brighter than all its neighbours
    padded = np.pad(counts, ((0, 0), (1, 1), (1, 1)))
    around = np.max([np.roll(padded, (dy, dx), (1, 2)) for dy in (-1, 0, 1) for dx in (-1, 0, 1)
                     if dy or dx], axis=0)[:, 1:-1, 1:-1]
    assert 0.1 < (counts > 3 * around + 10).any(axis=(1, 2)).mean() < 0.4


def test_peak_offsets_follow_rolls_and_ignore_a_hot_pixel(crystals):
    x = torch.from_numpy(crystals.intensity[:50])
    base = peak_offsets(x)
    rolled = peak_offsets(torch.roll(x, (2, -1), dims=(1, 2)))
    assert torch.equal(rolled, base + torch.tensor([2, -1]))
    hot = x.clone()
    hot[:, 3, 5] = hot.amax(dim=(1, 2)) * 2
    assert torch.equal(peak_offsets(hot), base)


def test_peak_offsets_read_a_known_ramp():
    rng = np.random.default_rng(4)
    a, _ = crystal_objects(rng, 64, 32, offset=False)
    off = rng.uniform(-2.5, 2.5, (64, 2))
    intensity = diffraction_intensity(a, phase_ramp(off, 32).astype(np.float32))
    found = peak_offsets(intensity, subpixel=True).numpy()
    assert np.median(np.abs(found - off)) < 0.15
    assert np.all(peak_offsets(intensity).numpy() == np.rint(found))


def test_strain_view_removes_ramp_and_offset(crystals):
    s = crystals
    support = s.amplitude > SUPPORT_THRESHOLD
    extra = wrap(s.phase + phase_ramp(np.tile([[0.7, -1.3]], (len(s), 1)), 32) + 2.0)
    moved = strain(s.amplitude, np.where(support, extra, 0))
    err = np.abs(wrap(moved - s.strain))[support]
    assert np.median(err) < 1e-3 and np.percentile(err, 95) < 0.05
    assert np.all(s.strain[~support] == 0)
    # a phase that is only a ramp has no strain
    flat = strain(s.amplitude, np.where(support, wrap(phase_ramp(np.tile([[1.5, 0.5]], (len(s), 1)), 32)), 0))
    assert np.abs(flat).max() < 1e-3


def test_strain_rmse_is_blind_to_the_ramp(crystals):
    s = crystals[:40]
    support = s.amplitude > SUPPORT_THRESHOLD
    ramped = np.where(support, wrap(s.phase + phase_ramp(np.tile([[0.4, 0.9]], (len(s), 1)), 32)), 0)
    m = score(s.amplitude, ramped, s.amplitude, s.phase, s.intensity)
    assert np.median(m["phase_rmse"]) > 0.3
    assert np.max(m["strain_rmse"]) < 1e-3


def test_phase_loss_is_taken_modulo_two_pi():
    torch.manual_seed(0)
    amp = torch.full((2, 32, 32), 0.8)
    target = torch.full((2, 32, 32), np.pi - 0.05)
    near = torch.full((2, 32, 32), -np.pi + 0.05)  # 0.1 rad from the target, across the cut
    far = torch.full((2, 32, 32), np.pi - 1.05)  # 1 rad from it, on the same side
    logit = lambda phase: torch.logit(phase / (2 * np.pi) + 0.5)  # noqa: E731 (the network's phase head, inverted)
    shape = torch.zeros(2, 32, 32)
    for invariant in (False, True):
        a = sample_losses(shape, logit(near), amp, target, offset_invariant=invariant)
        b = sample_losses(shape, logit(far), amp, target, offset_invariant=invariant)
        assert torch.all(a < b), "0.1 rad across the cut must cost less than 1 rad"
    exact = sample_losses(shape, logit(target), amp, target)
    torch.testing.assert_close(sample_losses(shape, logit(near), amp, target) - exact,
                               torch.full((2,), 0.1**2), atol=1e-4, rtol=1e-3)


def test_training_targets_match_the_centred_patterns(crystals):
    """The target phase `_centred` makes is the object of the rolled pattern (the ramp's sign)."""
    from cdinn_stream.lab.train import _centred

    x = torch.from_numpy(crystals.intensity)
    rolled, target = _centred(x, torch.from_numpy(crystals.amplitude), torch.from_numpy(crystals.phase))
    moved = peak_offsets(x).any(dim=1)
    assert moved.float().mean() > 0.5 and not peak_offsets(rolled).any()
    pattern = np.abs(far_field(crystals.amplitude * np.exp(1j * target.numpy()))) ** 2
    err = np.abs(pattern - rolled.numpy()).sum(axis=(1, 2)) / rolled.numpy().sum(axis=(1, 2))
    assert np.median(err) < 0.01, "the rolled pattern is the target object's (up to the soft rim)"


def test_predict_centres_and_returns_the_pattern_s_own_phase(tiny_model, crystals):
    assert not tiny_model.centre  # as the network was trained: its config says
    tiny_model.centre = True
    x = crystals.intensity[:16]
    rolled = np.roll(x, (1, -2), axis=(1, 2))
    a, b = tiny_model.predict(x), tiny_model.predict(rolled)
    np.testing.assert_allclose(a.amplitude, b.amplitude, atol=1e-5)
    expected = wrap(a.phase + ramp(torch.tensor([[1, -2]] * 16), 32).numpy())
    assert np.abs(wrap(b.phase - expected)).max() < 1e-4
    np.testing.assert_allclose(a.strain, b.strain, atol=2e-3)


@pytest.mark.parametrize("precision,views", [("fp32", 8), ("bf16", 1)])
def test_centring_with_views_and_bf16(tiny_model, crystals, precision, views):
    from cdinn_stream.nn.reconstruct import CDIModel

    model = CDIModel(tiny_model.network, device="cpu", precision=precision, views=views, centre=True)
    x = crystals.intensity[:8]
    a, b = model.predict(x), model.predict(np.roll(x, (-2, 1), axis=(1, 2)))
    assert a.phase.dtype == b.phase.dtype == np.float32
    expected = wrap(a.phase + ramp(torch.tensor([[-2, 1]] * 8), 32).numpy())
    tol = 1e-4 if precision == "fp32" else 0.05
    assert np.median(np.abs(wrap(b.phase - expected))) < tol


def test_peak_offsets_of_an_empty_frame_is_zero():
    assert torch.equal(peak_offsets(np.zeros((2, 32, 32))), torch.zeros((2, 2), dtype=torch.long))


def test_crop_centres_where_the_model_does(crystals):
    frames = np.zeros((50, 96, 96), np.float32)
    frames[:, 20:52, 40:72] = crystals.intensity[:50]
    peaks = find_peaks(frames)
    expected = peak_offsets(crystals.intensity[:50]).numpy() + np.array([20 + 16, 40 + 16])
    assert np.mean(np.all(peaks == expected, axis=1)) > 0.95


def test_crop_and_model_agree_on_noisy_detector_frames():
    """Noisy frames with the recipe's detector effects, peaks anywhere: the crops the crop cuts need
    no further centring by the model's rule in at least 9 of 10 frames."""
    from cdinn_stream.live.crop import crop_around_peaks

    noisy = simulate(200, 32, seed=21, recipe="crystal", photons=(1e4, 1e8)).intensity
    rng = np.random.default_rng(0)
    frames = rng.poisson(0.3, (200, 80, 80)).astype(np.float32)
    at = rng.integers(0, 48, (200, 2))
    for f, (r, c), pattern in zip(frames, at, noisy, strict=True):
        f[r : r + 32, c : c + 32] += pattern
    crops = crop_around_peaks(frames, 32)
    assert (~peak_offsets(crops.frames).any(dim=1)).float().mean() >= 0.9


def test_roll_frames_add_ramp_and_gap_to_edge():
    from cdinn_stream.core.physics import _gap_to_edge, add_ramp, roll_frames

    x = torch.rand(3, 16, 16)
    shifts = torch.tensor([[1, -2], [0, 0], [-7, 15]])
    for frame, got, s in zip(x, roll_frames(x, shifts), shifts, strict=True):
        assert torch.equal(got, torch.roll(frame, tuple(s.tolist()), dims=(0, 1)))
    with pytest.raises(ValueError, match="N, N"):
        roll_frames(torch.rand(2, 16, 32), shifts[:2])
    phase = (torch.rand(3, 16, 16) - 0.5) * 6
    offsets = torch.tensor([[0.5, -1.25], [2.0, 0.0], [-3.0, 7.0]])
    assert wrap(add_ramp(phase, offsets) - (phase + ramp(offsets, 16))).abs().max() < 1e-5
    support = torch.zeros(2, 16, 16, dtype=torch.bool)
    support[0, 14:, 3:6] = support[0, :2, 3:6] = True  # a crystal across the top/bottom edge
    support[1, 5:9, 5:9] = True
    moved = roll_frames(support, _gap_to_edge(support))
    rows = torch.nonzero(moved[0].any(dim=1))[:, 0]
    assert int(rows.max() - rows.min()) == 3, "the crystal is in one piece"
    assert torch.equal(moved[1].sum(), support[1].sum())


def test_a_crystal_with_no_support_is_drawn_again(monkeypatch):
    """A drawn shape that ends up wholly below the support threshold is replaced, not passed on to
    the strain fields (which need pixels inside)."""
    from cdinn_stream.core import crystal

    real, calls = crystal.crystal_shapes, []

    def first_empty(rng, n, size):
        shapes = real(rng, n, size)
        if not calls:
            shapes[1] = 0.0
        calls.append(n)
        return shapes

    monkeypatch.setattr(crystal, "crystal_shapes", first_empty)
    amplitude, phase = crystal.crystal_objects(np.random.default_rng(0), 4, 32)
    assert calls == [4, 1]
    assert ((amplitude > SUPPORT_THRESHOLD).sum(axis=(1, 2)) > 0).all() and np.isfinite(phase).all()
