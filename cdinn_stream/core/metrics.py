"""Accuracy metrics of a reconstruction (pure torch; numpy arrays are accepted).

* :func:`chi2` -- the paper's reciprocal-space error
  ``sum (s*sqrt(I_p) - sqrt(I_t))**2 / sum I_t`` with the best overall scale ``s`` of the
  prediction, ``I_p = |far_field(amplitude * exp(i*phase))|**2``; :func:`fourier_chi2` is the
  same number in float32 for the live pipeline's trust figure (every frame, next to the model).
* :func:`align` -- moves a predicted object onto the truth through what ``|F|`` cannot see:
  a circular shift, the twin image (inversion + conjugation) and a global phase offset.
* :func:`support_iou` and :func:`phase_rmse` (inside the true support) are computed after
  :func:`align`, so both are invariant to those three operations.
* :func:`strain_rmse` is :func:`phase_rmse` after the linear ramp of the phase error is removed
  (as :func:`cdinn_stream.core.physics.strain` removes it): blind to where the Bragg peak sits, it
  scores the strain map a BCDI user reads.
"""

from __future__ import annotations

import threading

import numpy as np
import torch

from .physics import SUPPORT_THRESHOLD, far_field_torch, strain, twin_torch

__all__ = ["chi2", "centred_planes", "fourier_chi2", "align", "support_iou", "phase_rmse", "strain_rmse", "score"]

ArrayLike = np.ndarray | torch.Tensor


def _t(x: ArrayLike) -> torch.Tensor:
    return torch.as_tensor(x)


def _complex(amplitude: ArrayLike, phase: ArrayLike) -> torch.Tensor:
    return torch.polar(_t(amplitude).double(), _t(phase).double())


def chi2(amplitude: ArrayLike, phase: ArrayLike, intensity: ArrayLike) -> torch.Tensor:
    """Per-frame chi^2 ``(B,)`` of predicted objects against measured intensities.

    ``amplitude`` and ``phase`` are ``(B, n, n)``; ``intensity`` is ``(B, M, M)`` with ``M >= n``
    (the object is zero-padded to ``M`` before the transform, as for oversampled data).
    """
    obj = _complex(amplitude, phase)
    measured = torch.sqrt(_t(intensity).double().clamp_min(0))
    m, n = measured.shape[-1], obj.shape[-1]
    if m != n:
        before = (m - n) // 2
        obj = torch.nn.functional.pad(obj, (before, m - n - before, before, m - n - before))
    predicted = far_field_torch(obj).abs()
    scale = (predicted * measured).sum(dim=(-2, -1)) / (predicted**2).sum(dim=(-2, -1)).clamp_min(1e-300)
    err = ((scale[:, None, None] * predicted - measured) ** 2).sum(dim=(-2, -1))
    return err / (measured**2).sum(dim=(-2, -1)).clamp_min(1e-300)


_WORKSPACE = threading.local()  # per thread: buffers of the last batch shape (fresh ones page-fault on a CPU)


def _buffers(shape: torch.Size, device: torch.device) -> tuple[torch.Tensor, ...]:
    """The calling thread's checkerboard and work tensors for ``shape`` (kept for the last shape)."""
    key = (tuple(shape), device, torch.is_inference_mode_enabled())  # inference tensors stay in inference mode
    cached = getattr(_WORKSPACE, "buffers", None)
    if cached is None or cached[0] != key:
        n = shape[-1]
        k = torch.arange(n, device=device)
        checkerboard = (1 - 2 * ((k[:, None] + k) % 2)).float()
        cached = (key, checkerboard, *(torch.empty(shape, device=device) for _ in range(4)),
                  torch.empty(shape, device=device, dtype=torch.complex64))
        _WORKSPACE.buffers = cached
    return cached[1:]


def centred_planes(amplitude: torch.Tensor, phase: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The real and imaginary planes, float32 ``(B, N, N)``, of the objects ``amplitude *
    exp(i phase)`` times the ``(-1)**(r + c)`` checkerboard that puts their Fourier transform's
    zero frequency at ``N // 2``: what :func:`fourier_chi2` transforms. Work tensors of the
    calling thread (its next call, or :func:`fourier_chi2`'s without ``planes``, overwrites them).

    The live pipeline makes them once a batch for the trust figure and the observables
    (:func:`cdinn_stream.core.observe.frame_observables`: the checkerboard is a phase ramp of pi a
    pixel, which their ramp removal takes out, so they are the plain objects' figures)."""
    a, p = amplitude.float(), phase.float()
    checkerboard, signed, _, re, im, _ = _buffers(a.shape, a.device)
    torch.mul(a, checkerboard, out=signed)
    torch.mul(signed, torch.sin(p, out=im), out=im)
    torch.mul(signed, torch.cos(p, out=re), out=re)
    return re, im


def fourier_chi2(amplitude: torch.Tensor, phase: torch.Tensor, measured: torch.Tensor, *,
                 planes: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """:func:`chi2` ``(B,)`` of objects ``(B, N, N)`` against measured *amplitudes* ``sqrt(I)``
    ``(B, N, N)`` (any overall scale, zero frequency at ``N // 2``, ``N`` even), in float32 on the
    tensors' device: the per-frame trust figure of the live pipeline.

    The best scale ``s`` leaves ``chi2 = 1 - (sum |P| |M|)**2 / (sum |P|**2 sum |M|**2)``, and
    ``sum |P|**2`` is the object's own (Parseval), so one FFT per frame suffices; the centring
    shift of the transform is a ``(-1)**(k1 + k2)`` checkerboard on the object. Agrees with
    :func:`chi2` to about 1e-6 (float32). ``planes``: the objects' :func:`centred_planes`, when
    the caller has them (the live pipeline's engine: they are shared with the observables).
    """
    n = amplitude.shape[-1]
    if n % 2 or measured.shape != amplitude.shape:
        return chi2(amplitude.float().cpu(), phase.float().cpu(), measured.float().cpu().square()).float().to(
            amplitude.device)
    a, m = amplitude.float(), measured.float()
    re, im = centred_planes(amplitude, phase) if planes is None else planes
    _, signed, work, _, _, centred = _buffers(a.shape, a.device)
    torch.complex(re, im, out=centred)
    f = torch.view_as_real(torch.fft.fft2(centred))
    modulus = torch.mul(f[..., 0], f[..., 0], out=work).addcmul_(f[..., 1], f[..., 1]).sqrt_()
    cross = modulus.mul_(m).sum(dim=(-2, -1))
    own = torch.mul(a, a, out=signed).sum(dim=(-2, -1)) * float(n * n)
    measured_power = torch.mul(m, m, out=work).sum(dim=(-2, -1))
    return (1 - cross.square() / (own * measured_power).clamp_min(1e-30)).clamp_min(0)


def align(pred: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """The copy of complex ``pred`` ``(B, n, n)`` (shifted, possibly twinned, phase-offset) that
    best matches ``truth``: the maximum of the complex cross-correlation over both twins.

    Computed in ``pred``'s complex precision (complex128 for real or complex128 input, complex64
    for complex64 input), on its device, without a loop over the batch.
    """
    pred, truth = _t(pred), _t(truth)
    ctype = torch.complex64 if pred.dtype == torch.complex64 else torch.complex128
    pred, truth = pred.to(ctype), truth.to(device=pred.device, dtype=ctype)
    b, n = pred.shape[0], pred.shape[-1]
    ft = torch.fft.fft2(truth)
    rows = torch.arange(n, device=pred.device)
    batch = torch.arange(b, device=pred.device)[:, None, None]
    best_val = out = None
    for cand in (pred, twin_torch(pred.conj())):
        xc = torch.fft.ifft2(ft * torch.fft.fft2(cand).conj())  # xc[s] = sum_n truth[n] conj(cand[n-s])
        flat = xc.flatten(1)
        idx = flat.abs().argmax(dim=1)
        val = flat.gather(1, idx[:, None])[:, 0]
        sy, sx = idx // n, idx % n
        iy = (rows[None, :] - sy[:, None]) % n  # roll(cand, (sy, sx))[y, x] = cand[y - sy, x - sx]
        ix = (rows[None, :] - sx[:, None]) % n
        shifted = cand[batch, iy[:, :, None], ix[:, None, :]] * torch.exp(1j * torch.angle(val))[:, None, None]
        if best_val is None:
            out, best_val = shifted, val.abs()
        else:
            better = val.abs() > best_val
            out = torch.where(better[:, None, None], shifted, out)
            best_val = torch.maximum(best_val, val.abs())
    return out


def _support(amplitude: torch.Tensor) -> torch.Tensor:
    peak = amplitude.flatten(1).amax(dim=1).clamp_min(1e-300)[:, None, None]
    return amplitude / peak > SUPPORT_THRESHOLD


def support_iou(aligned: torch.Tensor, true_amplitude: ArrayLike) -> torch.Tensor:
    """Intersection over union ``(B,)`` of the supports (amplitude > 0.1 of each frame's maximum)."""
    p, t = _support(aligned.abs()), _support(_t(true_amplitude).double())
    inter = (p & t).sum(dim=(-2, -1)).double()
    union = (p | t).sum(dim=(-2, -1)).double().clamp_min(1)
    return inter / union


def phase_rmse(aligned: torch.Tensor, true_amplitude: ArrayLike, true_phase: ArrayLike) -> torch.Tensor:
    """RMS phase error ``(B,)`` in radians inside the true support, after removing the mean offset."""
    t = _t(true_amplitude).double()
    mask = _support(t)
    diff = torch.angle(aligned * torch.polar(torch.ones_like(t), _t(true_phase).double()).conj())
    w = mask.double()
    offset = torch.angle((torch.polar(torch.ones_like(diff), diff) * w).sum(dim=(-2, -1)))
    diff = torch.angle(torch.polar(torch.ones_like(diff), diff - offset[:, None, None]))
    return torch.sqrt((diff**2 * w).sum(dim=(-2, -1)) / w.sum(dim=(-2, -1)).clamp_min(1))


def strain_rmse(amplitude: ArrayLike, phase: ArrayLike, true_amplitude: ArrayLike, true_phase: ArrayLike
                ) -> torch.Tensor:
    """RMS phase error ``(B,)`` in radians of the strain map: the strain views of prediction and
    truth (:func:`cdinn_stream.core.physics.strain`: each phase less its linear ramp) are aligned
    (:func:`align`), and the linear ramp and offset left in their difference are removed
    (weighted by the true amplitude) before the RMS inside the true support. Blind to where the
    Bragg peak sits, it scores the strain map a BCDI user reads."""
    a, t = _t(amplitude).double(), _t(true_amplitude).double()
    predicted = torch.polar(a, torch.from_numpy(strain(a, _t(phase))).double())
    true_strain = torch.from_numpy(strain(t, _t(true_phase))).double()
    aligned = align(predicted, torch.polar(t, true_strain))
    error = torch.angle(aligned * torch.polar(torch.ones_like(t), true_strain).conj())
    residual = torch.from_numpy(strain(t, error)).double()
    return phase_rmse(torch.polar(torch.ones_like(t), residual), t, torch.zeros_like(t))


def score(
    amplitude: ArrayLike, phase: ArrayLike, true_amplitude: ArrayLike, true_phase: ArrayLike,
    intensity: ArrayLike,
) -> dict[str, np.ndarray]:
    """chi^2, support IoU, phase RMSE and strain RMSE (phase RMSE after ramp removal) per frame,
    as numpy arrays under those names.

    A prediction on a larger grid than the truth (ER/HIO on oversampled data) is compared with
    the truth zero-padded to that grid.
    """
    amplitude, phase = _t(amplitude).double(), _t(phase).double()
    ta, tp = _t(true_amplitude).double(), _t(true_phase).double()
    m, n = amplitude.shape[-1], ta.shape[-1]
    if m != n:
        b = (m - n) // 2
        pad = (b, m - n - b, b, m - n - b)
        ta, tp = torch.nn.functional.pad(ta, pad), torch.nn.functional.pad(tp, pad)
    aligned = align(torch.polar(amplitude, phase), torch.polar(ta, tp))
    return {
        "chi2": chi2(amplitude, phase, intensity).numpy(),
        "support_iou": support_iou(aligned, ta).numpy(),
        "phase_rmse": phase_rmse(aligned, ta, tp).numpy(),
        "strain_rmse": strain_rmse(amplitude, phase, ta, tp).numpy(),
    }
