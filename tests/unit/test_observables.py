"""Observables of each frame (issue 19): the figures agree with what they claim to measure, on
objects whose answer is known (simulated crystals, shifted, ramped, strained)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cdinn_stream.core.observables import OBSERVABLES
from cdinn_stream.core.observe import complex_objects, frame_observables, reference_objects
from cdinn_stream.core.physics import SUPPORT_THRESHOLD, ramp, strain
from cdinn_stream.core.simulate import diffraction_intensity, simulate


@pytest.fixture(scope="module")
def crystals():
    data = simulate(64, 32, seed=3)
    return torch.from_numpy(data.amplitude.astype(np.float32)), torch.from_numpy(data.phase.astype(np.float32))


def _observe(amp, phase, crops=None, origins=None, **kw):
    crops = torch.from_numpy(diffraction_intensity(amp.numpy(), phase.numpy())) if crops is None else crops
    origins = torch.zeros(len(amp), 2) if origins is None else origins
    return frame_observables(amp, phase, crops, origins, **kw)


def test_every_observable_in_the_table_is_computed_and_the_table_says_its_unit():
    amp, phase = simulate(4, 32, seed=1).amplitude, simulate(4, 32, seed=1).phase
    obs = _observe(torch.from_numpy(amp), torch.from_numpy(phase))
    assert set(obs) == set(OBSERVABLES) - {"chi2"}  # chi2 is the engine's trust figure, computed with the model
    assert all(v.shape == (4,) and v.dtype == torch.float32 for v in obs.values())
    assert all(isinstance(unit, str) and meaning for unit, meaning in OBSERVABLES.values())


def test_the_peak_position_is_sub_pixel_and_in_detector_pixels(crystals):
    """A phase ramp moves the Bragg peak by a known fraction of a pixel; the crop's origin and
    binning put it on the detector."""
    amp, phase = crystals
    offsets = torch.tensor([[0.3, -0.4]]).repeat(len(amp), 1)
    moved = phase + ramp(offsets, 32)
    obs = _observe(amp, moved, origins=torch.tensor([[100.0, 200.0]]).repeat(len(amp), 1))
    np.testing.assert_allclose(np.median(obs["peak_row"]), 116.3, atol=0.08)
    np.testing.assert_allclose(np.median(obs["peak_col"]), 215.6, atol=0.08)
    still = _observe(amp, phase)
    assert np.abs(still["peak_row"].numpy() - 16).max() < np.abs(obs["peak_row"].numpy() - 100 - 16).max() + 0.5
    # binned 2 x 2: the crop's centre bin spans detector pixels 2 * 16 and 2 * 16 + 1 from the origin
    binned = _observe(amp, phase, origins=torch.zeros(len(amp), 2), bin=2)
    np.testing.assert_allclose(binned["peak_row"].numpy(), 2 * still["peak_row"].numpy() + 0.5, atol=1e-4)


def test_support_and_centroid_follow_the_crystal(crystals):
    amp, phase = crystals
    obs = _observe(amp, phase)
    a = amp.numpy()
    expected = (a > SUPPORT_THRESHOLD * a.reshape(len(a), -1).max(axis=1)[:, None, None]).sum(axis=(1, 2))
    np.testing.assert_array_equal(obs["support_area"].numpy(), expected)
    shifted = _observe(torch.roll(amp, (2, -3), dims=(1, 2)), torch.roll(phase, (2, -3), dims=(1, 2)))
    edges = np.concatenate([a[:, :4].reshape(len(a), -1), a[:, -4:].reshape(len(a), -1),
                            a[:, :, :4].reshape(len(a), -1), a[:, :, -4:].reshape(len(a), -1)], axis=1)
    inside = edges.max(axis=1) == 0  # crystals the roll does not wrap around the window's edge
    assert inside.sum() > 10
    np.testing.assert_allclose((shifted["centroid_row"] - obs["centroid_row"]).numpy()[inside], 2, atol=1e-3)
    np.testing.assert_allclose((shifted["centroid_col"] - obs["centroid_col"]).numpy()[inside], -3, atol=1e-3)


def test_strain_figures_ignore_the_ramp_and_match_the_full_strain_map(crystals):
    """phase_mean and strain_rms do not see where the Bragg peak sits (the ramp); strain_rms is
    the spread of the strain map that :func:`physics.strain` gives (which also fits a plane)."""
    amp, phase = crystals
    obs = _observe(amp, phase)
    ramped = _observe(amp, phase + ramp(torch.tensor([[1.7, -2.2]]).repeat(len(amp), 1), 32))
    np.testing.assert_allclose(ramped["strain_rms"].numpy(), obs["strain_rms"].numpy(), atol=2e-3)
    wrapped = np.angle(np.exp(1j * (ramped["phase_mean"] - obs["phase_mean"]).numpy()))
    assert np.abs(wrapped).max() < 2e-3
    a = amp.numpy().astype(np.float64)
    full = strain(amp, phase).astype(np.float64)
    w = a * (full != 0)
    rms = np.sqrt((w * full**2).sum(axis=(1, 2)) / w.sum(axis=(1, 2)))
    ours = obs["strain_rms"].numpy()
    assert np.median(np.abs(ours - rms) / rms) < 0.15, (ours[:8], rms[:8])
    assert np.corrcoef(ours, rms)[0, 1] > 0.9


def test_correlation_is_one_for_the_same_crystal_whatever_the_ramp_and_offset_and_drops_with_change(crystals):
    amp, phase = crystals
    reference = reference_objects(amp[:1], phase[:1])
    same = _observe(amp[:1], phase[:1] + 0.7 + ramp(torch.tensor([[0.4, 0.9]]), 32), reference=reference)
    assert float(same["correlation"][0]) > 0.999
    strained = _observe(amp[:1], phase[:1] * 2.0, reference=reference)
    others = _observe(amp[1:], phase[1:], reference=reference)
    assert 0.2 < float(strained["correlation"][0]) < 0.99
    assert np.median(others["correlation"].numpy()) < 0.6
    assert torch.isnan(_observe(amp[:2], phase[:2])["correlation"]).all()  # no reference: not a number, not 1


def test_the_shared_complex_objects_give_the_same_figures(crystals):
    amp, phase = crystals
    crops = torch.from_numpy(diffraction_intensity(amp.numpy(), phase.numpy()))
    own = frame_observables(amp, phase, crops, torch.zeros(len(amp), 2))
    shared = frame_observables(amp, phase, crops, torch.zeros(len(amp), 2), obj=complex_objects(amp, phase))
    for name in own:
        torch.testing.assert_close(own[name], shared[name], equal_nan=True)


def test_the_docs_table_lists_every_observable_with_its_unit():
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "pipeline.md").read_text()
    for name, (unit, _) in OBSERVABLES.items():
        assert f"| `{name}` | {unit or '-'} |" in text, name


def test_the_trust_figure_from_the_shared_objects_is_the_same(crystals):
    from cdinn_stream.core.metrics import fourier_chi2
    from cdinn_stream.core.physics import normalized_amplitude

    amp, phase = crystals
    x = normalized_amplitude(torch.from_numpy(diffraction_intensity(amp.numpy(), phase.numpy())))
    shared = fourier_chi2(amp, phase, x, obj=complex_objects(amp, phase))
    torch.testing.assert_close(shared, fourier_chi2(amp, phase, x))
