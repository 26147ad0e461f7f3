import numpy as np
import pytest
import torch

from cdinn_stream.core.metrics import align, chi2, phase_rmse, score, support_iou
from cdinn_stream.core.physics import twin
from cdinn_stream.core.simulate import simulate


@pytest.fixture(scope="module")
def truth():
    return simulate(16, 32, seed=11)


def _perturbed(s, seed=0):
    """A plausible imperfect prediction: eroded shape, phase with an added smooth error."""
    rng = np.random.default_rng(seed)
    amp = np.clip(s.amplitude * 1.0 - 0.15, 0, 1) / 0.85
    yy, xx = np.mgrid[0:32, 0:32] / 32
    err = 0.3 * np.sin(2 * np.pi * (xx + rng.uniform()))
    phase = np.where(amp > 0.1, s.phase + err, 0)
    return amp.astype(np.float32), phase.astype(np.float32)


def test_perfect_prediction_scores_perfectly(truth):
    m = score(truth.amplitude, truth.phase, truth.amplitude, truth.phase, truth.intensity)
    assert np.all(m["chi2"] < 1e-10)
    assert np.all(m["support_iou"] == 1)
    assert np.all(m["phase_rmse"] < 1e-6)


def test_a_worse_prediction_scores_worse(truth):
    amp, phase = _perturbed(truth)
    m = score(amp, phase, truth.amplitude, truth.phase, truth.intensity)
    assert np.all(m["chi2"] > 1e-3)
    assert np.all(m["support_iou"] < 1)
    assert np.all(m["phase_rmse"] > 0.05)
    # a different object altogether is worse still
    other = simulate(16, 32, seed=99)
    bad = score(other.amplitude, other.phase, truth.amplitude, truth.phase, truth.intensity)
    assert np.median(bad["support_iou"]) < np.median(m["support_iou"])
    assert np.median(bad["chi2"]) > np.median(m["chi2"])


def test_chi2_formula_and_scale_invariance(truth):
    amp, phase = _perturbed(truth)
    c = chi2(amp, phase, truth.intensity).numpy()
    c_scaled = chi2(amp * 3.7, phase, truth.intensity * 11).numpy()
    np.testing.assert_allclose(c, c_scaled, rtol=1e-5)  # float32 inputs
    # explicit formula with the best scale
    f = np.abs(np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(amp * np.exp(1j * phase), axes=(1, 2)),
                                           norm="ortho"), axes=(1, 2)))
    m = np.sqrt(truth.intensity)
    s = (f * m).sum((1, 2)) / (f**2).sum((1, 2))
    ref = ((s[:, None, None] * f - m) ** 2).sum((1, 2)) / truth.intensity.sum((1, 2))
    np.testing.assert_allclose(c, ref, rtol=1e-4)


@pytest.mark.parametrize("op", ["shift", "twin", "offset", "all"])
def test_scores_invariant_to_what_the_modulus_cannot_see(truth, op):
    amp, phase = _perturbed(truth, seed=1)
    obj = amp * np.exp(1j * phase)
    if op in ("shift", "all"):
        obj = np.roll(obj, (3, -5), axis=(1, 2))
    if op in ("twin", "all"):
        obj = np.conj(twin(obj))
    if op in ("offset", "all"):
        obj = obj * np.exp(1j * 1.234)
    ref = score(amp, phase, truth.amplitude, truth.phase, truth.intensity)
    got = score(np.abs(obj), np.angle(obj), truth.amplitude, truth.phase, truth.intensity)
    for k in ref:
        # strain RMSE fits a plane to the wrapped error: an error within float rounding of +-pi may
        # fall on either side of the cut, which moves the plane a little
        np.testing.assert_allclose(got[k], ref[k], atol=2e-3 if k == "strain_rmse" else 1e-5, err_msg=k)


def test_align_recovers_the_truth(truth):
    obj = truth.amplitude * np.exp(1j * truth.phase)
    moved = np.conj(twin(np.roll(obj, (7, 2), axis=(1, 2)))) * np.exp(-0.5j)
    back = align(torch.from_numpy(moved), torch.from_numpy(obj)).numpy()
    np.testing.assert_allclose(back, obj, atol=1e-5)


def test_iou_and_rmse_on_hand_made_cases():
    t = np.zeros((1, 8, 8))
    t[0, 2:6, 2:6] = 1
    p = np.zeros((1, 8, 8))
    p[0, 2:6, 2:4] = 1
    aligned = torch.from_numpy(p).to(torch.complex128)
    assert float(support_iou(aligned, t)[0]) == pytest.approx(0.5)
    ph = np.zeros((1, 8, 8))
    ph[0, 2:6, 2:6] = 0.3
    ph[0, 2:4, 2:6] = -0.3  # half the support off by -0.3, half by +0.3 -> rms 0.3 after the offset
    aligned = torch.from_numpy(t * np.exp(1j * ph))
    assert float(phase_rmse(aligned, t, np.zeros((1, 8, 8)))[0]) == pytest.approx(0.3, abs=1e-9)


def test_noise_sweep_scores_against_the_truth(tiny_model):
    from cdinn_stream.lab.evaluate import noise_sweep, noise_table

    sweep = noise_sweep(tiny_model, (1e3, 1e8), n=16, seed=3)
    assert list(sweep) == ["clean", "1000", "1e+08"]
    for m in sweep.values():
        assert set(m) == {"chi2", "support_iou", "phase_rmse", "strain_rmse", "chi2_measured"}
    # at 1e8 photons the network sees (almost) the clean pattern
    assert (abs(sweep["1e+08"]["chi2"]["median"] - sweep["clean"]["chi2"]["median"])
            < 0.05 * sweep["clean"]["chi2"]["median"])
    assert "| 1000 |" in noise_table(sweep)
