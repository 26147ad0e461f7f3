"""Observables of each reconstructed frame, the few numbers a beamline steers by: their names,
units and meanings (:data:`OBSERVABLES`, the one table of them: docs, sinks, PVs and views read
it; no torch here, so that sinks and viewers load without it).

Computed next to the model, batched on its device, for every frame the live pipeline makes
(:func:`cdinn_stream.core.observe.frame_observables`, in
:class:`~cdinn_stream.live.engine.InferenceEngine`), and published with the result: ZeroMQ
header fields, the ``observables`` array of the run's Tiled container, PVs of the latest value.
The strain convention is the real-crystals one (:func:`cdinn_stream.core.physics.strain`):
the object's linear phase ramp (where the Bragg peak sits) is removed by demodulating it with its
mean phase step between neighbouring pixels, amplitude-weighted over the support; the full
``strain`` then also fits and removes a least-squares plane, which these per-frame figures skip
(it costs more than the rest together; the difference is measured in the tests).
"""

from __future__ import annotations

import numpy as np

__all__ = ["OBSERVABLES", "PEAK_WINDOW", "SUPPORT_FRACTION", "strain_map"]

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
    "strain_rms": ("rad", "spread of the phase in the support, ramp removed: its amplitude-weighted circular "
                          "standard deviation sqrt(-2 ln R), R the length of the mean phasor (the RMS about "
                          "phase_mean while that is well under 1 rad; defined for phases spread over the whole "
                          "circle too): the spread of the strain (g . u) over the crystal"),
    "chi2": ("", "trust figure: chi^2 of the reconstruction's |FT|^2 against the measured crop (0 = explains it)"),
    "correlation": ("", "|<o, o_0>| / (|o| |o_0|) of the complex object o (ramp removed) against the run's first "
                        "frame's o_0: 1 = unchanged, lower = the crystal's shape or strain moved"),
}

#: half side of the window whose intensity centre of mass is the sub-pixel peak (7 x 7 pixels)
PEAK_WINDOW = 3
#: the support: amplitude above this fraction of the frame's maximum (as
#: :data:`cdinn_stream.core.physics.SUPPORT_THRESHOLD`, here without torch)
SUPPORT_FRACTION = 0.1


def strain_map(amplitude: np.ndarray, phase: np.ndarray) -> np.ndarray:
    """The strain view of one ``(N, N)`` object, rad: the phase less its linear ramp and its offset
    inside the support (amplitude above 0.1 of the maximum), wrapped to ``[-pi, pi]``, 0 outside.

    The ramp is the amplitude-weighted mean phase step between neighbouring pixels (the angle of
    ``sum z[r + 1] conj(z[r])`` along each axis: exact for a ramp of any size, blind to wraps), the
    offset the circular mean of what is left: :func:`cdinn_stream.core.physics.strain` in numpy,
    without its least-squares plane (a display, not a measurement)."""
    a = np.asarray(amplitude, np.float64)
    top = a.max(initial=0.0)
    support = a > SUPPORT_FRACTION * top
    if top <= 0 or not support.any():
        return np.zeros(a.shape, np.float32)
    z = np.where(support, a, 0.0) * np.exp(1j * np.asarray(phase, np.float64))
    step_row = np.angle(np.sum(z[1:] * z[:-1].conj()))
    step_col = np.angle(np.sum(z[:, 1:] * z[:, :-1].conj()))
    rows, cols = (np.arange(n) - n // 2 for n in a.shape)
    flat = z * np.exp(-1j * (step_row * rows[:, None] + step_col * cols[None, :]))
    flat *= np.exp(-1j * np.angle(flat.sum()))
    return np.where(support, np.angle(flat), 0.0).astype(np.float32)
