import numpy as np
import torch
from scipy.ndimage import gaussian_filter

from cdinn_stream.core.metrics import chi2, score
from cdinn_stream.core.phase_retrieval import ITERATIONS, er_hio, schedule
from cdinn_stream.core.simulate import diffraction_intensity, simulate


def test_schedule_is_620_iterations_ending_in_averaged_er():
    s = schedule()
    assert len(s) == ITERATIONS == 620
    assert s[-20:] == ["ER"] * 20
    assert s.count("HIO") > 0 and s[:80] == ["HIO"] * 80


def test_recovers_a_simple_object():
    amp = np.zeros((1, 32, 32), np.float32)
    amp[0, 11:21, 13:19] = 1  # a 10 x 6 rectangle, centred, with the recipe's 1-px edge blur
    amp = gaussian_filter(amp, (0, 1, 1))
    amp /= amp.max()
    yy = np.mgrid[0:32, 0:32][0]
    phase = np.where(amp > 0.1, 0.05 * (yy - 16), 0).astype(np.float32)  # a weak linear strain
    intensity = diffraction_intensity(amp, phase, pad=2)
    rec = er_hio(intensity)
    c = chi2(rec.abs(), rec.angle(), intensity)
    assert float(c[0]) < 1e-3
    m = score(rec.abs(), rec.angle(), amp, phase, intensity)
    assert m["support_iou"][0] > 0.85
    assert m["phase_rmse"][0] < 0.15


def test_batched_and_single_agree_on_quality():
    s = simulate(6, 32, seed=21, pad=2)
    batch = er_hio(s.intensity, iterations=200)
    assert batch.shape == (6, 64, 64) and batch.dtype == torch.complex64
    single = er_hio(s.intensity[0], iterations=200)
    assert single.shape == (64, 64)
    cb = chi2(batch.abs(), batch.angle(), s.intensity)
    assert float(cb.median()) < 0.05


def test_seeded_from_the_truth_stays_at_the_truth():
    s = simulate(4, 32, seed=22, pad=2)
    init = torch.from_numpy(s.amplitude * np.exp(1j * s.phase))
    rec = er_hio(s.intensity, iterations=20, init=init)
    m = score(rec.abs(), rec.angle(), s.amplitude, s.phase, s.intensity)
    assert np.all(m["chi2"] < 1e-3)
    assert np.all(m["phase_rmse"] < 0.1)
    # and from a poor start, a few refinement iterations improve chi2
    rough = torch.from_numpy(np.clip(s.amplitude, 0.5, 1) * (s.amplitude > 0.1))
    before = chi2(rough.abs(), torch.zeros_like(rough), s.intensity)
    after_rec = er_hio(s.intensity, iterations=50, init=rough.to(torch.complex64))
    after = chi2(after_rec.abs(), after_rec.angle(), s.intensity)
    assert float(after.median()) < float(before.median())


def test_large_batches_run_in_chunks():
    s = simulate(5, 32, seed=23, pad=2)
    whole = er_hio(s.intensity, iterations=30, chunk=8)
    chunked = er_hio(s.intensity, iterations=30, chunk=2)
    assert chunked.shape == whole.shape == (5, 64, 64)
    torch.testing.assert_close(chunked[:2], whole[:2])  # each chunk starts from the same seed
    c = chi2(chunked.abs(), chunked.angle(), s.intensity)
    assert torch.isfinite(c).all()
