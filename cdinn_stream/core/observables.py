"""Observables of each reconstructed frame: the few numbers a beamline steers by (pure torch).

Computed next to the model, batched on its device, for every frame the live pipeline makes
(:class:`~cdinn_stream.live.engine.InferenceEngine`), and published with the result: ZeroMQ
header fields, the ``observables`` array of the run's Tiled container, PVs of the latest value.
:data:`OBSERVABLES` is the one table of their names, units and meanings (docs, sinks and PVs read
it). The strain convention is the real-crystals one (:func:`cdinn_stream.core.physics.strain`):
the object's linear phase ramp (where the Bragg peak sits) is removed by demodulating it with its
mean phase step between neighbouring pixels, amplitude-weighted over the support; the full
``strain`` then also fits and removes a least-squares plane, which these per-frame figures skip
(it costs more than the rest together; the difference is measured in the tests).
"""

from __future__ import annotations

import torch

from .physics import SUPPORT_THRESHOLD

__all__ = ["OBSERVABLES", "PEAK_WINDOW", "frame_observables", "reference_objects"]

#: name -> (unit, meaning), in publishing order; ``chi2`` is the trust figure the engine computes
#: with the model (:func:`cdinn_stream.core.metrics.fourier_chi2`), listed here for the table
OBSERVABLES: dict[str, tuple[str, str]] = {
    "peak_row": ("detector pixel", "Bragg peak row on the detector, sub-pixel: intensity centre of mass of the "
                                   "crop's 7 x 7 pixels around the peak (rows count down from the frame's top)"),
    "peak_col": ("detector pixel", "Bragg peak column on the detector, sub-pixel (as peak_row)"),
    "intensity": ("counts", "integrated intensity: the counts in the crop the model saw (its window, binned)"),
    "support_area": ("object pixel", "pixels of the support: amplitude above 0.1 of the frame's maximum"),
    "centroid_row": ("object pixel", "amplitude-weighted centroid of the support, row, from the window's centre"),
    "centroid_col": ("object pixel", "amplitude-weighted centroid of the support, column, from the window's centre"),
    "phase_mean": ("rad", "amplitude-weighted circular mean of the phase in the support, ramp removed (the "
                          "network's phase reference: compare frames of a run, not runs)"),
    "strain_rms": ("rad", "amplitude-weighted RMS of the phase in the support about phase_mean, ramp removed: "
                          "the spread of the strain (g . u) over the crystal"),
    "chi2": ("", "trust figure: chi^2 of the reconstruction's |FT|^2 against the measured crop (0 = explains it)"),
    "correlation": ("", "|<o, o_0>| / (|o| |o_0|) of the complex object o (ramp removed) against the run's first "
                        "frame's o_0: 1 = unchanged, lower = the crystal's shape or strain moved"),
}

#: half side of the window whose intensity centre of mass is the sub-pixel peak (7 x 7 pixels)
PEAK_WINDOW = 3


def _demodulated(amplitude: torch.Tensor, phase: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Support weights ``w`` (amplitude in the support, 0 outside) and the real and imaginary parts
    of ``w exp(i (phase - ramp))``: the object with its linear ramp taken out by its mean phase step."""
    a, p = amplitude.float(), phase.float()
    b, n = a.shape[0], a.shape[-1]
    top = a.flatten(1).amax(dim=1).clamp_min(1e-30)[:, None, None]
    w = torch.where(a > SUPPORT_THRESHOLD * top, a, 0.0)
    re, im = w * torch.cos(p), w * torch.sin(p)
    # mean phase step along rows and columns: angle of sum z[r + 1] conj(z[r])
    step_r = torch.atan2((im[:, 1:] * re[:, :-1] - re[:, 1:] * im[:, :-1]).sum(dim=(1, 2)),
                         (re[:, 1:] * re[:, :-1] + im[:, 1:] * im[:, :-1]).sum(dim=(1, 2)))
    step_c = torch.atan2((im[:, :, 1:] * re[:, :, :-1] - re[:, :, 1:] * im[:, :, :-1]).sum(dim=(1, 2)),
                         (re[:, :, 1:] * re[:, :, :-1] + im[:, :, 1:] * im[:, :, :-1]).sum(dim=(1, 2)))
    r = torch.arange(n, device=a.device, dtype=torch.float32) - n // 2
    ramp = (step_r[:, None] * r)[:, :, None] + (step_c[:, None] * r)[:, None, :]
    q = p - ramp
    return w, w * torch.cos(q), w * torch.sin(q)


def reference_objects(amplitude: torch.Tensor, phase: torch.Tensor) -> torch.Tensor:
    """``(B, 2, N, N)`` float32: the ramp-removed objects (real, imaginary) that ``correlation``
    compares later frames with (the engine keeps each run's first)."""
    _, re, im = _demodulated(amplitude, phase)
    return torch.stack([re, im], dim=1)


def frame_observables(amplitude: torch.Tensor, phase: torch.Tensor, crops: torch.Tensor, origins: torch.Tensor, *,
                      bin: int = 1, reference: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """:data:`OBSERVABLES` (but ``chi2``) of ``(B, N, N)`` reconstructions, each ``(B,)`` float32.

    ``crops`` are the measured ``(B, M, M)`` crops the model saw (counts, the peak at ``M // 2``),
    ``origins`` ``(B, 2)`` their top-left detector pixel and ``bin`` their binning; ``reference``
    ``(B, 2, N, N)`` or ``(1, 2, N, N)`` the objects of :func:`reference_objects` that
    ``correlation`` compares with (NaN without one)."""
    b, n = amplitude.shape[0], amplitude.shape[-1]
    w, re, im = _demodulated(amplitude, phase)
    mass = w.sum(dim=(1, 2)).clamp_min(1e-30)
    coords = torch.arange(n, device=w.device, dtype=torch.float32) - n // 2
    centroid_row = (w.sum(dim=2) * coords).sum(dim=1) / mass
    centroid_col = (w.sum(dim=1) * coords).sum(dim=1) / mass
    sum_re, sum_im = re.sum(dim=(1, 2)), im.sum(dim=(1, 2))
    phase_mean = torch.atan2(sum_im, sum_re)
    # phase about its mean: angle of z exp(-i mean), from the parts (no second angle of every pixel)
    c, s = torch.cos(phase_mean)[:, None, None], torch.sin(phase_mean)[:, None, None]
    deviation = torch.atan2(im * c - re * s, re * c + im * s)
    strain_rms = ((deviation.square() * w).sum(dim=(1, 2)) / mass).sqrt()
    if reference is None:
        correlation = torch.full((b,), float("nan"), device=w.device)
    else:
        r_re, r_im = reference[:, 0].float(), reference[:, 1].float()
        dot_re = (re * r_re + im * r_im).sum(dim=(1, 2))
        dot_im = (im * r_re - re * r_im).sum(dim=(1, 2))
        own = (re.square() + im.square()).sum(dim=(1, 2))
        theirs = (r_re.square() + r_im.square()).sum(dim=(1, 2))
        correlation = torch.hypot(dot_re, dot_im) / (own * theirs).sqrt().clamp_min(1e-30)
    m = crops.shape[-1]
    x = crops.float()
    k = PEAK_WINDOW
    around = x[:, m // 2 - k : m // 2 + k + 1, m // 2 - k : m // 2 + k + 1].clamp_min(0)
    offsets = torch.arange(-k, k + 1, device=x.device, dtype=torch.float32)
    total = around.sum(dim=(1, 2))
    dy = (around.sum(dim=2) * offsets).sum(dim=1) / total.clamp_min(1e-30)
    dx = (around.sum(dim=1) * offsets).sum(dim=1) / total.clamp_min(1e-30)
    centre = float(m // 2 * bin + (bin - 1) / 2)  # the detector pixel (from the origin) at the crop's centre
    o = origins.to(device=x.device, dtype=torch.float32)
    return {"peak_row": o[:, 0] + centre + dy * bin, "peak_col": o[:, 1] + centre + dx * bin,
            "intensity": x.sum(dim=(1, 2)), "support_area": (w > 0).sum(dim=(1, 2)).float(),
            "centroid_row": centroid_row, "centroid_col": centroid_col, "phase_mean": phase_mean,
            "strain_rms": strain_rms, "correlation": correlation}
