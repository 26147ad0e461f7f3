"""A simulated Bragg CDI area detector for ``ophyd.sim`` (demos, tests, end-to-end accuracy).

:class:`OperandoCrystal` is the sample: one paper-recipe crystal whose strain phase evolves
from one smooth field to another as ``strain`` goes from 0 to 1 (an operando experiment).
:class:`BCDIFrameSource` makes detector frames: the crystal's diffraction intensity ``|F|**2``
placed with its Bragg peak at a position set by a motor, scaled to ``photons``, plus a constant
``background``, with Poisson noise. It records the ground truth of every frame it makes
(:attr:`BCDIFrameSource.truth`), so accuracy can be measured end to end.

:func:`make_detector` wraps a source as ``ophyd.sim.DirectImage`` (frames inline in events) or
``ophyd.sim.SynSignalWithRegistry`` (frames in ``.npy`` files, resource/datum documents).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
from scipy.ndimage import gaussian_filter

from ..core.crystal import MAX_OFFSET, crystal_objects, phase_ramp
from ..core.physics import wrap
from ..core.simulate import diffraction_intensity, simulate_objects, strain_phase

__all__ = ["OperandoCrystal", "BCDIFrameSource", "FrameTruth", "make_detector", "make_motors", "ring_shapes",
           "DetectorGeometry", "EIGER_1M", "EIGER_4M", "DETECTORS", "native_frames"]


class OperandoCrystal:
    """A crystal (``size x size`` object) whose phase blends from field 0 to field 1 with strain.

    ``recipe="paper"``: a paper-recipe crystal; both fields are strain relative to the crystal's
    mean lattice (their linear phase ramp over the crystal is removed), so the Bragg peak sits on
    the window's centre; every state's phase stays within 2*pi peak to peak.

    ``recipe="crystal"``: a crystal of the realistic recipe (:mod:`cdinn_stream.core.crystal`: a
    sectioned faceted crystal, textured amplitude, displacement-field strain, possibly a
    dislocation) whose strain grows by a smooth field as ``strain`` goes from 0 to 1, with the
    Bragg peak off the window's centre by a fixed random integer-plus-sub-pixel amount: the ramp
    is kept in the phase, as a real detector sees it.

    ``recipe="ring"``: a hollow crystal (a nanoring or hollow shell seen in section: an elliptical
    annulus, inner radius 45-65 % of the outer) with the paper recipe's smooth strain, centred: a
    crystal type neither shipped model was trained on (their median chi^2 on it is about 3x their
    crystal-recipe figure), for live adaptation (:mod:`cdinn_stream.live.adapt`).
    """

    def __init__(self, size: int = 32, *, seed: int = 0, recipe: str = "paper"):
        rng = np.random.default_rng(seed)
        self.size = size
        self.recipe = recipe
        if recipe == "crystal":
            amp, phase = crystal_objects(rng, 1, size, offset=False)
            offset = rng.integers(-MAX_OFFSET, MAX_OFFSET + 1, (1, 2)) + rng.uniform(-0.5, 0.5, (1, 2))
            self._ramp = phase_ramp(offset, size)[0]
        elif recipe == "paper":
            amp, phase = simulate_objects(rng, 1, size, remove_ramp=True)
            self._ramp = np.zeros((size, size))
        elif recipe == "ring":
            amp = ring_shapes(rng, 1, size)
            phase = strain_phase(rng, amp, remove_ramp=True)
            self._ramp = np.zeros((size, size))
        else:
            raise ValueError(f"recipe must be 'paper', 'crystal' or 'ring', not {recipe!r}")
        self.amplitude = amp[0]
        self._phases = (phase[0], strain_phase(rng, amp, remove_ramp=True)[0])

    def state(self, strain: float) -> tuple[np.ndarray, np.ndarray]:
        """``(amplitude, phase)`` at ``strain`` in [0, 1] (clipped)."""
        s = float(np.clip(strain, 0.0, 1.0))
        support = self.amplitude > 0.1
        if self.recipe == "crystal":  # the wrapped field 0 (dislocations allowed) plus a growing smooth field
            phase = wrap(self._phases[0] + s * self._phases[1] + self._ramp)
            return self.amplitude, np.where(support, phase, 0).astype(np.float32)
        phase = (1 - s) * self._phases[0] + s * self._phases[1]
        phase = np.where(support, phase - (phase[support].max() + phase[support].min()) / 2, 0)
        return self.amplitude, phase.astype(np.float32)


def ring_shapes(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    """``(n, size, size)`` float32 amplitudes of hollow crystals in section: elliptical annuli
    (outer radius 25-37 % of the frame, inner 45-65 % of the outer, axis ratio 0.7-1, any
    orientation), edges softened by a 1-pixel Gaussian, maximum 1."""
    yy, xx = np.mgrid[:size, :size] - size // 2
    out = np.empty((n, size, size), np.float32)
    for i in range(n):
        outer = rng.uniform(0.25, 0.37) * size
        inner = outer * rng.uniform(0.45, 0.65)
        ratio, angle = rng.uniform(0.7, 1.0), rng.uniform(0, np.pi)
        x = xx * np.cos(angle) + yy * np.sin(angle)
        y = (-xx * np.sin(angle) + yy * np.cos(angle)) / ratio
        r = np.hypot(x, y)
        out[i] = gaussian_filter(((r < outer) & (r > inner)).astype(np.float32), 1.0)
    return out / out.max(axis=(1, 2), keepdims=True).clip(1e-6)


@dataclass
class FrameTruth:
    """What the simulator used for one frame."""

    amplitude: np.ndarray
    phase: np.ndarray
    intensity: np.ndarray  # noise-free, centred, size x size
    peak: tuple[int, int]
    strain: float


class BCDIFrameSource:
    """Callable that returns a detector frame (see the module docstring).

    Args:
        crystal: the sample.
        frame_shape: detector shape (rows, columns).
        photons: total photons in a frame's Bragg peak (``None``: noise-free).
        background: mean background counts per pixel.
        peak_motor: motor whose position is the peak's column (an ``ophyd.sim.SynAxis``), or None.
        strain_motor: motor whose position (0..1) is the crystal's strain state, or None.
        peak_row: the peak's row.
        seed: seed of the Poisson noise.
        mask: ``frame_shape`` bool, False in the detector's gaps (:meth:`DetectorGeometry.mask`):
            no counts there.
    """

    def __init__(self, crystal: OperandoCrystal, *, frame_shape: tuple[int, int] = (256, 256),
                 photons: float | None = 1e6, background: float = 0.5, peak_motor=None, strain_motor=None,
                 peak_row: int | None = None, seed: int = 0, mask: np.ndarray | None = None):
        self.crystal = crystal
        self.frame_shape = frame_shape
        self.photons = photons
        self.background = background
        self.peak_motor = peak_motor
        self.strain_motor = strain_motor
        self.peak_row = frame_shape[0] // 2 if peak_row is None else peak_row
        self.mask = mask
        self.rng = np.random.default_rng(seed)
        self.truth: list[FrameTruth] = []
        self._lock = threading.Lock()

    @staticmethod
    def _position(motor, default: float) -> float:
        if motor is None:
            return default
        return float(motor.readback.get()) if hasattr(motor, "readback") else float(motor.position)

    def __call__(self) -> np.ndarray:
        strain = self._position(self.strain_motor, 0.0)
        col = int(round(self._position(self.peak_motor, self.frame_shape[1] / 2)))
        amp, phase = self.crystal.state(strain)
        clean = diffraction_intensity(amp[None], phase[None])[0]
        n = self.crystal.size
        frame = np.zeros(self.frame_shape, np.float64)
        r0, c0 = self.peak_row - n // 2, col - n // 2
        rows = slice(max(r0, 0), min(r0 + n, self.frame_shape[0]))
        cols = slice(max(c0, 0), min(c0 + n, self.frame_shape[1]))
        scale = 1.0 if self.photons is None else self.photons / clean.sum()
        if rows.stop <= rows.start or cols.stop <= cols.start:  # the peak is off the detector
            rows = cols = slice(0, 0)
        frame[rows, cols] = clean[rows.start - r0 : rows.stop - r0, cols.start - c0 : cols.stop - c0] * scale
        frame += self.background
        if self.photons is not None:
            frame = self.rng.poisson(frame).astype(np.float32)
        if self.mask is not None:
            frame = frame * self.mask
        with self._lock:
            self.truth.append(FrameTruth(amp, phase, clean, (self.peak_row, col), strain))
        return frame.astype(np.float32)


@dataclass(frozen=True)
class DetectorGeometry:
    """A hybrid pixel detector's frame: ``modules`` (rows, columns) of ``module`` (rows, columns)
    pixels with ``gap`` (rows, columns) of dead pixels between them (EIGER-like)."""

    name: str
    modules: tuple[int, int]
    module: tuple[int, int] = (514, 1030)
    gap: tuple[int, int] = (37, 10)

    @property
    def shape(self) -> tuple[int, int]:
        """Frame (rows, columns)."""
        return tuple(m * p + (m - 1) * g for m, p, g in zip(self.modules, self.module, self.gap, strict=True))

    def mask(self) -> np.ndarray:
        """``(rows, columns)`` bool, False in the gaps between modules."""
        good = np.zeros(self.shape, bool)
        for i in range(self.modules[0]):
            for j in range(self.modules[1]):
                r, c = i * (self.module[0] + self.gap[0]), j * (self.module[1] + self.gap[1])
                good[r : r + self.module[0], c : c + self.module[1]] = True
        return good


#: EIGER 1M: 1065 x 1030 pixels (two modules, one above the other)
EIGER_1M = DetectorGeometry("eiger1m", (2, 1))
#: EIGER 4M: 2167 x 2070 pixels (4 x 2 modules)
EIGER_4M = DetectorGeometry("eiger4m", (4, 2))
#: the detectors by name (``cdinn-stream demo --detector``)
DETECTORS = {g.name: g for g in (EIGER_1M, EIGER_4M)}


def _bounce(x: np.ndarray, lo: float, hi: np.ndarray) -> np.ndarray:
    """``x`` reflected back into ``[lo, hi]`` (a drifting peak turns at the detector's edges)."""
    span = hi - lo
    t = np.mod(x - lo, 2 * span)
    return lo + np.where(t > span, 2 * span - t, t)


def native_frames(n: int, geometry: DetectorGeometry = EIGER_1M, *, seed: int = 0, photons: float = 1e6,
                  background: float = 0.02, drift: tuple[float, float] = (0.3, 0.5), jump_every: int | None = None,
                  hot_pixels: int = 20) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``n`` detector frames ``(n, rows, columns)`` uint32 of one crystal's Bragg pattern (a
    paper-recipe crystal, 2x oversampled: 64 x 64 pixels around the peak) drifting ``drift``
    pixels a frame (turning back 64 pixels from the edges), jumping to a random place every
    ``jump_every`` frames (``None``: never), ``photons`` in the pattern, Poisson counts,
    ``background`` counts a pixel, ``hot_pixels`` random hot pixels a frame, zero in the module
    gaps. Returns the frames, the detector's mask (:meth:`DetectorGeometry.mask`) and the true peak
    (row, column) of each frame."""
    rng = np.random.default_rng(seed)
    rows, cols = geometry.shape
    amp, phase = simulate_objects(rng, 1, 32, remove_ramp=True)
    pattern = diffraction_intensity(amp, phase, pad=2)[0]
    pattern = pattern / pattern.sum() * photons
    mask = geometry.mask()
    frames = rng.poisson(background, (n, rows, cols)).astype(np.uint32)
    start = np.array([rows * 0.3, cols * 0.4])
    peaks = np.empty((n, 2), np.int64)
    for i in range(n):
        if jump_every and i and i % jump_every == 0:
            start = rng.uniform([64, 64], [rows - 64 - drift[0] * n, cols - 64 - drift[1] * n]) - np.array(drift) * i
        r, c = np.rint(_bounce(start + np.array(drift) * i, 64, np.array([rows, cols]) - 64)).astype(int)
        peaks[i] = r, c
        frames[i, r - 32 : r + 32, c - 32 : c + 32] += rng.poisson(pattern).astype(np.uint32)
    hot = rng.integers(0, [rows, cols], (n, hot_pixels, 2))
    frames[np.arange(n)[:, None], hot[..., 0], hot[..., 1]] = 60_000
    frames[:, ~mask] = 0
    return frames, mask, peaks


def make_motors(peak_start: float = 128.0):
    """``(peak, strain)`` simulated motors (``ophyd.sim.SynAxis``): the peak's column, the strain."""
    from ophyd.sim import SynAxis

    return SynAxis(name="peak_x", value=peak_start), SynAxis(name="strain", value=0.0)


def make_detector(source: BCDIFrameSource, *, name: str = "bcdi", external: bool = False,
                  save_path: str | None = None):
    """The source as an ophyd.sim detector: ``DirectImage`` (inline frames; data key
    ``f"{name}_img"``) or, with ``external=True``, ``SynSignalWithRegistry`` (``.npy`` files
    under ``save_path``; data key ``name``)."""
    from ophyd.sim import DirectImage, SynSignalWithRegistry

    if external:
        return SynSignalWithRegistry(source, name=name, save_path=save_path)
    return DirectImage(name=name, func=source)
