import numpy as np
import pytest

from cdinn_stream.core.physics import SUPPORT_THRESHOLD, far_field, twin
from cdinn_stream.core.simulate import CHUNK, add_noise, diffraction_intensity, simulate


@pytest.mark.parametrize("size", [32, 64, 128])
def test_shapes_ranges_and_conventions(size):
    s = simulate(40, size, seed=1)
    assert s.intensity.shape == s.amplitude.shape == s.phase.shape == (40, size, size)
    assert s.intensity.dtype == np.float32
    assert s.amplitude.min() >= 0 and s.amplitude.max() <= 1 + 1e-6
    support = s.amplitude > SUPPORT_THRESHOLD
    assert np.all(s.phase[~support] == 0), "phase must be 0 outside the object"
    for ph, sup in zip(s.phase, support, strict=True):
        inside = ph[sup]
        assert inside.max() - inside.min() <= 2 * np.pi + 1e-5  # no phase wraps
        assert abs(inside.max() + inside.min()) < 1e-4  # mid-range centred
    # centre of mass at N // 2 (within half a pixel, after rounding)
    idx = np.arange(size)
    cy = (s.amplitude.sum(2) * idx).sum(1) / s.amplitude.sum((1, 2))
    cx = (s.amplitude.sum(1) * idx).sum(1) / s.amplitude.sum((1, 2))
    assert np.all(np.abs(cy - size // 2) <= 0.5 + 1e-6) and np.all(np.abs(cx - size // 2) <= 0.5 + 1e-6)
    # the edge is blurred: values strictly between 0 and 1 exist in every object
    assert np.all(((s.amplitude > 0.05) & (s.amplitude < 0.95)).sum((1, 2)) > 0)


def test_statistics_vary():
    s = simulate(500, 32, seed=2)
    area = (s.amplitude > 0.5).sum((1, 2))
    ptp = np.array([np.ptp(p[a > SUPPORT_THRESHOLD]) for p, a in zip(s.phase, s.amplitude, strict=True)])
    assert area.min() >= 20 and area.max() <= 32 * 32
    assert area.std() > 30, "object sizes should vary"
    assert 0 < ptp.min() < 1.0 and ptp.max() > 5.0, "phase strength from weak to nearly 2 pi"
    assert np.median(ptp) == pytest.approx(np.pi, abs=0.6)


def test_intensity_is_centred_fourier_modulus():
    s = simulate(8, 32, seed=4)
    obj = s.amplitude * np.exp(1j * s.phase)
    np.testing.assert_allclose(s.intensity, np.abs(far_field(obj)) ** 2, rtol=1e-4, atol=1e-5)
    # Parseval with the orthonormal transform
    np.testing.assert_allclose(s.intensity.sum((1, 2)), (s.amplitude**2).sum((1, 2)), rtol=1e-4)
    # zero frequency at N // 2: a positive object has its brightest pixel there
    flat = diffraction_intensity(s.amplitude, np.zeros_like(s.phase))
    peak = np.array([np.unravel_index(f.argmax(), f.shape) for f in flat])
    assert np.all(peak == 16)


def test_far_field_of_centred_delta_is_flat_and_real():
    d = np.zeros((32, 32), complex)
    d[16, 16] = 1
    f = far_field(d)
    np.testing.assert_allclose(f, np.full((32, 32), 1 / 32), atol=1e-12)


def test_twin_has_same_modulus():
    s = simulate(4, 32, seed=5)
    obj = s.amplitude * np.exp(1j * s.phase)
    np.testing.assert_allclose(np.abs(far_field(np.conj(twin(obj)))), np.abs(far_field(obj)), atol=1e-5)


def test_seeded_and_reproducible():
    a = simulate(CHUNK + 10, 32, seed=7)
    b = simulate(CHUNK + 10, 32, seed=7)
    np.testing.assert_array_equal(a.intensity, b.intensity)
    small = simulate(100, 32, seed=7)
    np.testing.assert_array_equal(small.amplitude, a.amplitude[:100])  # a bigger set starts the same
    other = simulate(100, 32, seed=8)
    assert not np.array_equal(other.amplitude, small.amplitude)


def test_oversampled_patterns_have_the_same_objects():
    a = simulate(10, 32, seed=9)
    b = simulate(10, 32, seed=9, pad=2)
    assert b.intensity.shape == (10, 64, 64)
    np.testing.assert_array_equal(a.amplitude, b.amplitude)
    # the 2x pattern sampled at even offsets from the centre is the 1x pattern
    np.testing.assert_allclose(b.intensity[:, ::2, ::2] * 4, a.intensity, rtol=1e-3, atol=1e-6)


def test_poisson_noise_and_background():
    rng = np.random.default_rng(0)
    s = simulate(20, 32, seed=3)
    counts = add_noise(rng, s.intensity, photons=1e5, background=2.0)
    assert np.allclose(counts, np.round(counts))
    total = counts.sum((1, 2))
    expected = 1e5 + 2.0 * 32 * 32
    assert np.all(np.abs(total - expected) < 6 * np.sqrt(expected))
    noisy = simulate(5, 32, seed=3, photons=1e4)
    assert noisy.intensity.sum((1, 2)) == pytest.approx(1e4, rel=0.05)


def test_bad_arguments():
    with pytest.raises(ValueError, match="size"):
        simulate(3, 48)
    with pytest.raises(ValueError):
        simulate(-1, 32)


def test_removing_the_phase_ramp_centres_the_brightest_pixel():
    plain = simulate(400, 32, seed=12)
    flat = simulate(400, 32, seed=12, remove_ramp=True)
    np.testing.assert_array_equal(plain.amplitude, flat.amplitude)  # same crystals
    for ph, a in zip(flat.phase, flat.amplitude, strict=True):
        inside = ph[a > SUPPORT_THRESHOLD]
        assert np.ptp(inside) <= 2 * np.pi + 1e-5  # still no wraps
    def centred(s):
        peak = s.intensity.reshape(len(s), -1).argmax(axis=1)
        return np.mean(peak == 16 * 32 + 16)
    assert centred(flat) > 0.9 > 0.6 > centred(plain)


def test_photon_range_is_log_uniform_per_frame():
    d = simulate(3000, 32, seed=5, photons=(1e4, 1e7))
    decades = np.log10(d.intensity.sum(axis=(1, 2)))
    assert 3.99 < decades.min() and decades.max() < 7.01
    counts = np.histogram(decades, bins=[4, 5, 6, 7])[0]
    assert counts.min() > 0.8 * counts.max(), "as many frames in each decade"
    same = simulate(3000, 32, seed=5)
    np.testing.assert_array_equal(d.amplitude, same.amplitude)  # noise does not change the crystals
    with pytest.raises(ValueError, match="photon range"):
        simulate(4, 32, photons=(1e5, 1e4))


def test_workers_give_the_same_samples():
    kw = {"photons": (1e4, 1e7), "background": 0.2}
    one = simulate(2500, 32, seed=11, **kw)
    two = simulate(2500, 32, seed=11, workers=2, **kw)
    for key in ("intensity", "amplitude", "phase"):
        assert np.array_equal(getattr(one, key), getattr(two, key))


def test_torch_noise_scales_to_the_photons_and_is_fresh_each_call():
    import torch

    from cdinn_stream.core.simulate import add_noise_torch

    clean = torch.from_numpy(simulate(200, 32, seed=12).intensity)
    g = torch.Generator().manual_seed(0)
    a = add_noise_torch(clean, photons=1e5, background=0.0, generator=g)
    b = add_noise_torch(clean, photons=1e5, background=0.0, generator=g)
    assert torch.equal(a, a.round()) and not torch.equal(a, b)
    totals = a.sum(dim=(-2, -1))
    assert abs(float(totals.mean()) / 1e5 - 1) < 0.01
    ranged = add_noise_torch(clean, photons=(1e4, 1e7), background=0.5, generator=g).sum(dim=(-2, -1))
    assert float(ranged.min()) > 0.5e4 and float(ranged.max()) < 2e7 and float(ranged.max() / ranged.min()) > 30
