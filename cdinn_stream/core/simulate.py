"""Simulated Bragg-CDI training data after Cherukara et al. (pure numpy).

Each sample is a compact crystal: a convex hull of random points, 1 inside and 0 outside,
edges blurred by a Gaussian of 1 px; a smooth strain phase mixing sine gratings and Gaussians
with random weights, periods, positions and numbers, peak-to-peak up to 2*pi with no phase
wraps, centred on zero (mid-range) inside the support and 0 outside it; and its diffraction
intensity ``|F|**2`` with ``F = far_field(amplitude * exp(i*phase))``.

The object is rolled so that its centre of mass sits at ``N // 2``: ``|F|`` cannot see a
translation, so a centred object is the one answer a network can learn. See
:mod:`cdinn_stream.core.physics` for the conventions (centring, amplitude vs intensity, orientation).

Generation is vectorised in chunks of :data:`CHUNK` samples (at 32x32; ``CHUNK * (32/N)**2``
at ``N x N``), each with its own child seed of
``numpy.random.SeedSequence(seed)``, so a given seed gives the same samples on any machine and a
larger set starts with the samples of a smaller one.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from scipy.ndimage import gaussian_filter
from scipy.spatial import ConvexHull

from .crystal import crystal_objects, detector_counts, phase_ramp
from .physics import SUPPORT_THRESHOLD, far_field, strain, wrap

__all__ = ["SimulatedSet", "simulate", "RECIPES", "simulate_objects", "diffraction_intensity", "add_noise",
           "add_noise_torch", "remove_phase_ramp", "strain_phase", "SIZES", "CHUNK"]

#: Frame sizes the recipe is tuned for.
SIZES = (32, 64, 128)
#: Samples generated per seeded chunk at 32x32 (fewer at larger sizes: same pixels per chunk).
CHUNK = 2048
_MAX_POINTS = 16
_MAX_TERMS = 3


@dataclass
class SimulatedSet:
    """A batch of simulated samples; every array is ``(n, N, N)`` float32.

    Attributes:
        intensity: diffraction intensity ``|F|**2`` (or photon counts when noise was added),
            zero frequency at ``N // 2``.
        amplitude: object amplitude in [0, 1] (1 inside, blurred edge).
        phase: object phase in radians inside the support, 0 outside: for the paper recipe
            mid-range centred on 0; for the crystal recipe (or with an ``offset``) it includes the
            ramp of the off-centre Bragg peak, wrapped to [-pi, pi) (:attr:`strain` removes it).
    """

    intensity: np.ndarray
    amplitude: np.ndarray
    phase: np.ndarray

    def __len__(self) -> int:
        return len(self.intensity)

    @property
    def support(self) -> np.ndarray:
        """Boolean support: amplitude above :data:`~cdinn_stream.core.physics.SUPPORT_THRESHOLD`."""
        return self.amplitude > SUPPORT_THRESHOLD

    @property
    def strain(self) -> np.ndarray:
        """The phase less its linear ramp and offset (:func:`cdinn_stream.core.physics.strain`), 0 outside
        the support: the strain relative to the mean lattice."""
        return strain(self.amplitude, self.phase)

    def __getitem__(self, index) -> SimulatedSet:
        return SimulatedSet(self.intensity[index], self.amplitude[index], self.phase[index])


def _convex_masks(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    """Binary masks of convex hulls of random points, ``(n, size, size)`` float32."""
    margin = 2.0
    extent = rng.uniform(0.3, 0.85, n) * size  # side of the box that holds the points
    centre = size / 2 + rng.uniform(-1, 1, (n, 2)) * (size / 2 - margin - extent[:, None] / 2).clip(0)
    n_points = rng.integers(4, _MAX_POINTS + 1, n)
    # Hull vertices (counter-clockwise), padded by repeating the first vertex: a degenerate
    # edge of zero length passes every half-plane test. Slivers (hull area under a fifth of
    # the box) are drawn again, so that every object covers pixels.
    verts = np.empty((n, _MAX_POINTS + 1, 2))
    for i in range(n):
        while True:
            p = centre[i] + (rng.random((n_points[i], 2)) - 0.5) * extent[i]
            try:
                hull = ConvexHull(p)
            except Exception:  # collinear points
                continue
            if hull.volume >= 0.2 * extent[i] ** 2:
                break
        v = p[hull.vertices]
        verts[i, : len(v)] = v
        verts[i, len(v) :] = v[0]
    a = verts.astype(np.float32)
    b = np.roll(a, -1, axis=1)
    b[:, -1] = a[:, 0]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    py_, px_ = yy.ravel(), xx.ravel()
    ey, ex = b[..., 0] - a[..., 0], b[..., 1] - a[..., 1]
    out = np.empty((n, size * size), bool)
    step = max(1, 65_536 // (size * size))  # sub-batches keep the temporaries small (no page-fault storms)
    for i in range(0, n, step):
        sl = slice(i, i + step)
        cross = (ex[sl, :, None] * (py_ - a[sl, :, 0, None]) - ey[sl, :, None] * (px_ - a[sl, :, 1, None]))
        out[sl] = (cross >= -1e-6).all(axis=1) | (cross <= 1e-6).all(axis=1)
    return out.reshape(n, size, size).astype(np.float32)


def _phase_fields(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    """Smooth random fields mixing sine gratings and Gaussians, ``(n, size, size)``."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    n_sine = rng.integers(0, _MAX_TERMS + 1, n)
    n_gauss = rng.integers(0, _MAX_TERMS + 1, n)
    n_gauss[(n_sine + n_gauss) == 0] = 1
    terms = np.arange(_MAX_TERMS)
    field = np.zeros((n, size, size), np.float32)
    # Sine gratings: period 0.5..2 frame widths, random direction and phase.
    w = rng.uniform(0.2, 1.0, (n, _MAX_TERMS)) * (terms < n_sine[:, None])
    k = 1.0 / rng.uniform(0.5, 2.0, (n, _MAX_TERMS))
    theta = rng.uniform(0, 2 * np.pi, (n, _MAX_TERMS))
    phi0 = rng.uniform(0, 2 * np.pi, (n, _MAX_TERMS))
    arg = 2 * np.pi * k[..., None, None] * (
        np.cos(theta)[..., None, None] * xx + np.sin(theta)[..., None, None] * yy
    ) + phi0[..., None, None]
    field += (w[..., None, None] * np.sin(arg)).sum(axis=1)
    # Gaussians: width 1/16..1/4 of the frame, anywhere near the object, either sign.
    w = rng.uniform(-1.0, 1.0, (n, _MAX_TERMS)) * (terms < n_gauss[:, None])
    y0, x0 = rng.uniform(0.2, 0.8, (2, n, _MAX_TERMS))
    sig = rng.uniform(1 / 16, 1 / 4, (n, _MAX_TERMS))
    r2 = (yy - y0[..., None, None]) ** 2 + (xx - x0[..., None, None]) ** 2
    field += (w[..., None, None] * np.exp(-r2 / (2 * sig[..., None, None] ** 2))).sum(axis=1)
    return field


def _centre(amplitude: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    """Roll each sample so that its amplitude's centre of mass sits at ``N // 2``."""
    n, size, _ = amplitude.shape
    idx = np.arange(size)
    mass = amplitude.sum(axis=(1, 2))
    cy = (amplitude.sum(axis=2) * idx).sum(axis=1) / mass
    cx = (amplitude.sum(axis=1) * idx).sum(axis=1) / mass
    sy = size // 2 - np.rint(cy).astype(int)
    sx = size // 2 - np.rint(cx).astype(int)
    rows = (idx[None, :] - sy[:, None]) % size  # source row for each destination row
    cols = (idx[None, :] - sx[:, None]) % size
    out = []
    for arr in (amplitude, *others):
        out.append(arr[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]])
    return out


def remove_phase_ramp(field: np.ndarray, amplitude: np.ndarray, support: np.ndarray) -> np.ndarray:
    """Subtract from each ``(n, N, N)`` field its amplitude-weighted least-squares plane over
    ``support``: the strain relative to the mean lattice, whose Bragg peak is the zero frequency."""
    n, size, _ = field.shape
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / size
    basis = np.stack([yy, xx, np.ones_like(yy)]).reshape(3, -1)  # (3, P)
    w = (amplitude * support).reshape(n, -1).astype(np.float64)  # (n, P)
    gram = np.einsum("kp,np,lp->nkl", basis, w, basis)
    rhs = np.einsum("kp,np->nk", basis, w * field.reshape(n, -1))
    coef = np.linalg.solve(gram + 1e-9 * np.eye(3), rhs[..., None])[..., 0]
    return (field - np.einsum("nk,kp->np", coef, basis).reshape(n, size, size)).astype(np.float32)


def strain_phase(rng: np.random.Generator, amplitude: np.ndarray, *, remove_ramp: bool = False) -> np.ndarray:
    """A random smooth phase ``(n, N, N)`` on each object of ``amplitude`` (zero outside its
    support), scaled to a peak-to-peak drawn uniformly in [0, 2*pi] and centred on 0.

    ``remove_ramp`` subtracts the field's linear part first (strain relative to the mean lattice).
    """
    n, size, _ = amplitude.shape
    support = amplitude > SUPPORT_THRESHOLD
    field = _phase_fields(rng, n, size)
    if remove_ramp:
        field = remove_phase_ramp(field, amplitude, support)
    big = np.float32(np.inf)
    lo = np.where(support, field, big).min(axis=(1, 2), keepdims=True)
    hi = np.where(support, field, -big).max(axis=(1, 2), keepdims=True)
    ptp = rng.uniform(0.0, 2 * np.pi, (n, 1, 1)).astype(np.float32)
    phase = (field - (lo + hi) / 2) / np.maximum(hi - lo, 1e-6) * ptp
    return np.where(support, phase, 0).astype(np.float32)


def simulate_objects(rng: np.random.Generator, n: int, size: int, *, remove_ramp: bool = False
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Random centred objects: ``(amplitude, phase)``, each ``(n, size, size)`` float32.

    ``remove_ramp`` subtracts the linear part of each phase field (strain relative to the mean
    lattice, as BCDI reconstructions report it) before the field is scaled to its peak-to-peak:
    the pattern's brightest pixel is then the zero frequency for ~97% of samples (38% without).
    """
    mask = _convex_masks(rng, n, size)
    amplitude = gaussian_filter(mask, sigma=(0, 1.0, 1.0), mode="constant").astype(np.float32)
    amplitude /= amplitude.max(axis=(1, 2), keepdims=True).clip(1e-6)
    phase = strain_phase(rng, amplitude, remove_ramp=remove_ramp)
    amplitude, phase = _centre(amplitude, phase)
    return np.ascontiguousarray(amplitude), np.ascontiguousarray(phase)


def diffraction_intensity(amplitude: np.ndarray, phase: np.ndarray, *, pad: int = 1) -> np.ndarray:
    """Intensity ``|F|**2`` of ``(n, N, N)`` objects, zero-padded ``pad`` times (2 = oversampled)."""
    obj = amplitude * np.exp(1j * phase.astype(np.float32))
    if pad > 1:
        size = obj.shape[-1]
        extra = size * (pad - 1)
        before = extra // 2
        obj = np.pad(obj, ((0, 0), (before, extra - before), (before, extra - before)))
    return (np.abs(far_field(obj.astype(np.complex64))) ** 2).astype(np.float32)


Photons = float | tuple[float, float] | None


def photons_per_frame(rng: np.random.Generator, photons: Photons, n: int) -> np.ndarray | None:
    """``(n, 1, 1)`` photon totals: ``photons`` itself, or for a ``(low, high)`` range one draw per
    frame, log-uniform (as many frames at 1e4-1e5 as at 1e6-1e7)."""
    if photons is None:
        return None
    if isinstance(photons, tuple | list):
        lo, hi = (float(v) for v in photons)
        if not 0 < lo <= hi:
            raise ValueError(f"photon range must be 0 < low <= high, got {photons}")
        return 10 ** rng.uniform(np.log10(lo), np.log10(hi), (n, 1, 1))
    return np.full((n, 1, 1), float(photons))


def add_noise(
    rng: np.random.Generator, intensity: np.ndarray, *, photons: Photons, background: float = 0.0
) -> np.ndarray:
    """Detector counts: scale each frame to ``photons`` in total (a number, or a ``(low, high)``
    range drawn log-uniformly per frame), add ``background`` per pixel, then draw Poisson counts.
    ``photons=None`` keeps the noise-free intensity (plus background)."""
    out = intensity.astype(np.float64)
    if photons is not None:
        total = photons_per_frame(rng, photons, len(out) if out.ndim == 3 else 1)
        total = total if out.ndim == 3 else total[0]
        out = out * (total / out.sum(axis=(-2, -1), keepdims=True).clip(1e-30))
    out = out + background
    if photons is not None:
        out = rng.poisson(out)
    return out.astype(np.float32)


def add_noise_torch(intensity: torch.Tensor, *, photons: Photons, background: float = 0.0,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """Torch version of :func:`add_noise` on ``(n, N, N)`` intensities, on their device: fresh
    Poisson counts for each call (training draws new noise for every batch)."""
    out = intensity.float()
    if photons is not None:
        n = len(out)
        if isinstance(photons, tuple | list):
            lo, hi = (math.log10(float(v)) for v in photons)
            u = torch.rand((n, 1, 1), generator=generator, device=out.device)
            total = 10 ** (lo + (hi - lo) * u)
        else:
            total = torch.full((n, 1, 1), float(photons), device=out.device)
        out = out * (total / out.sum(dim=(-2, -1), keepdim=True).clamp_min(1e-30))
    out = out + background
    if photons is not None:
        out = torch.poisson(out, generator=generator)
    return out


def _simulate_chunk(job: tuple) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One seeded chunk of :func:`simulate`: ``(intensity, amplitude, phase)`` of its first ``keep`` samples."""
    seed, chunk, keep, size, pad, photons, background, remove_ramp, recipe, offset, detector = job
    rng = np.random.default_rng(seed)
    if recipe == "crystal":
        a, p = crystal_objects(rng, chunk, size, offset=offset is None)
    else:
        a, p = simulate_objects(rng, chunk, size, remove_ramp=remove_ramp)
    a, p = a[:keep], p[:keep]
    if offset:  # the Bragg peak `offset` pixels off the centre, in a random direction
        direction = np.random.SeedSequence(seed.entropy, spawn_key=(*seed.spawn_key, 2**31))  # not a child: the
        angle = np.random.default_rng(direction).uniform(0, 2 * np.pi, len(a))  # noise's seed stays the same
        shift = offset * np.stack([np.sin(angle), np.cos(angle)], axis=1)
        p = np.where(a > SUPPORT_THRESHOLD, wrap(p + phase_ramp(shift, size)), 0).astype(np.float32)
    clean = diffraction_intensity(a, p, pad=pad)
    noise_rng = np.random.default_rng(seed.spawn(1)[0])
    if recipe == "crystal" and (detector or (detector is None and photons is not None)):
        return detector_counts(noise_rng, clean, photons=photons, background=background), a, p
    return add_noise(noise_rng, clean, photons=photons, background=background), a, p


RECIPES = ("paper", "crystal")


def simulate(
    n: int,
    size: int = 32,
    *,
    seed: int = 0,
    photons: Photons = None,
    background: float = 0.0,
    pad: int = 1,
    remove_ramp: bool = False,
    progress: Callable[[int], None] | None = None,
    workers: int = 1,
    recipe: str = "paper",
    offset: float | None = None,
    detector: bool | None = None,
) -> SimulatedSet:
    """Generate ``n`` samples of ``size x size`` (32, 64 or 128) after the paper's recipe or the
    realistic crystal recipe.

    Args:
        n: number of samples.
        size: frame size ``N`` of the object and (for ``pad=1``) of the diffraction pattern.
        seed: seed; the same seed always gives the same samples.
        photons: total photons per frame for Poisson noise, or a ``(low, high)`` range drawn
            log-uniformly per frame; ``None`` for noise-free intensity.
        background: constant background added per pixel (counts when ``photons`` is set).
        pad: zero-padding of the object before the transform (``2`` for oversampled patterns,
            as the paper's ER/HIO baseline uses; the pattern is then ``pad*N`` wide).
        remove_ramp: remove the linear phase ramp (see :func:`simulate_objects`); off by default,
            as in the recipe the shipped models were trained on.
        progress: called with the number of samples finished after each chunk.
        workers: processes that simulate chunks in parallel; the samples are the same for any
            number of workers (each chunk has its own seed).
        recipe: ``"paper"`` (Cherukara et al.: convex blobs, flat amplitude, smooth phase, the
            Bragg peak on the centre pixel) or ``"crystal"`` (:mod:`cdinn_stream.core.crystal`:
            sectioned faceted crystals with textured amplitude, displacement-field strain and
            dislocations, the Bragg peak off-centre, detector effects). For ``"crystal"``,
            ``photons`` applies the recipe's detector (:func:`~cdinn_stream.core.crystal.detector_counts`;
            :data:`~cdinn_stream.core.crystal.PHOTONS` is its range of 1e3-1e8) and ``background`` adds to its
            own drawn background.
        offset: the Bragg peak this many pixels off the window's centre, in a random direction (a
            linear phase ramp across the object, kept in :attr:`SimulatedSet.phase`); ``None``: the
            recipe's own (paper: 0; crystal: a random integer -2..2 plus sub-pixel amount per axis).
        detector: apply the crystal recipe's detector effects other than counting noise (partial
            coherence, flat field, gaps, dead and hot pixels); ``None``: when ``photons`` is given.
    """
    if recipe not in RECIPES:
        raise ValueError(f"recipe must be one of {RECIPES}, not {recipe!r}")
    if remove_ramp and recipe == "crystal":
        raise ValueError("remove_ramp is for the paper recipe; the crystal recipe's strain has no ramp, and its "
                         "off-centre peak is set with offset (offset=0: none)")
    if detector and recipe != "crystal":
        raise ValueError("detector effects belong to the crystal recipe")
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    chunk = CHUNK * 32 * 32 // (size * size)
    chunks = -(-n // chunk)
    seeds = np.random.SeedSequence(seed).spawn(max(chunks, 1))
    m = size * pad
    intensity = np.empty((n, m, m), np.float32)
    amplitude = np.empty((n, size, size), np.float32)
    phase = np.empty((n, size, size), np.float32)
    jobs = [(seeds[c], chunk, min(chunk, n - c * chunk), size, pad, photons, background, remove_ramp, recipe,
             offset, detector)
            for c in range(chunks)]
    if workers > 1 and chunks > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # fork: the workers run numpy and scipy only (and spawn would re-run a caller's __main__)
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        pool = ProcessPoolExecutor(min(workers, chunks), mp_context=multiprocessing.get_context(method))
        results = pool.map(_simulate_chunk, jobs)
    else:
        pool, results = None, map(_simulate_chunk, jobs)
    try:
        for c, (i, a, p) in enumerate(results):
            lo, hi = c * chunk, c * chunk + len(a)
            intensity[lo:hi], amplitude[lo:hi], phase[lo:hi] = i, a, p
            if progress is not None:
                progress(hi - lo)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    return SimulatedSet(intensity, amplitude, phase)
