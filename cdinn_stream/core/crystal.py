"""The realistic crystal recipe: measured-like Bragg CDI samples (pure numpy).

The paper's recipe (:mod:`cdinn_stream.core.simulate`) draws 2-D convex blobs of flat amplitude with
smooth sine/Gaussian phases, the Bragg peak on a pixel. Crystals measured at a beamline differ on
every count, and this recipe draws them as they are:

* **Shape**: 3-D Wulff-like polyhedra ({100}, {111} and {110} facets at random distances, stretched
  by a random affine map), rotated at random and *sectioned* by a plane (most samples, as 2-D
  slices of 3-D reconstructions are) or *projected* along a direction (the amplitude is then the
  thickness); rounded edges and corners (a smooth minimum of the facet distances), a 0.5-1.5 px
  soft edge; twinned or merged pairs of particles; re-entrant (concave) notches; voids.
* **Amplitude** that is not flat: smooth density variations of +-10-30 % and a weak speckle-like
  texture, normalised to a maximum of 1.
* **Strain phase** from displacement fields projected on the Bragg vector ``g`` (a random direction
  in the plane): surface relaxation, a misfitting inclusion or core (radial field), thermal
  gradients (quadratic), smooth long-wavelength fields, and edge and screw dislocations (phase
  vortices of winding +-1). The smooth part's peak-to-peak is drawn log-uniformly in
  0.1-4 rad; the phase is wrapped to [-pi, pi).
* **Oversampling** from about 1.1x to 3.3x (the crystal spans 30-90 % of the field).
* **The Bragg peak off the window's centre** by a random integer (-2..2) plus sub-pixel amount on each
  axis: a linear phase ramp across the object, kept in the returned phase (the phase that matches
  the pattern; :func:`cdinn_stream.core.physics.strain` removes it).
* **Detector effects** (:func:`detector_counts`): partial coherence (the pattern blurred by the
  coherence function), a +-5 % flat field, Poisson counts of 1e3-1e8 photons per frame (log-uniform)
  over a background, gaps and dead pixels (0 counts), hot pixels.

Every function takes a ``numpy.random.Generator`` and is vectorised over the batch where it can be.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.ndimage import distance_transform_edt, gaussian_filter

from .physics import SUPPORT_THRESHOLD, ramp, wrap

__all__ = ["crystal_objects", "crystal_shapes", "displacement_phase", "detector_counts", "phase_ramp",
           "PHOTONS", "MAX_OFFSET"]

#: Photon range of the recipe's Poisson noise (total counts per frame, drawn log-uniformly).
PHOTONS = (1e3, 1e8)
#: Largest integer part of the Bragg peak's offset from the window's centre, in pixels per axis.
MAX_OFFSET = 2


def _facet_normals() -> np.ndarray:
    """The 26 unit normals of the {100}, {111} and {110} facets of a cubic crystal, ``(26, 3)``."""
    out = []
    for v in np.array(np.meshgrid([-1, 0, 1], [-1, 0, 1], [-1, 0, 1])).reshape(3, -1).T:
        if v.any():
            out.append(v / np.linalg.norm(v))
    return np.array(out)


_NORMALS = _facet_normals()
_FAMILY = np.abs(_NORMALS).astype(bool).sum(axis=1)  # 1: {100}, 2: {110}, 3: {111}


def _rotations(rng: np.random.Generator, n: int) -> np.ndarray:
    """``(n, 3, 3)`` rotation matrices, uniform on SO(3) (random unit quaternions)."""
    q = rng.normal(size=(n, 4))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    w, x, y, z = q.T
    return np.stack([
        np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], -1),
        np.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], -1),
        np.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1),
    ], axis=1)


def _polyhedra(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Random Wulff-like polyhedra ``{x : normals @ x <= distances}`` in the lab frame.

    Returns ``normals (n, 26, 3)`` (not unit: the facets of a stretched crystal) and
    ``distances (n, 26)``."""
    family_d = np.stack([np.ones(n), rng.uniform(1.0, 1.45, n), rng.uniform(0.85, 1.75, n)], axis=1)
    d = family_d[:, _FAMILY - 1] * rng.uniform(0.9, 1.1, (n, len(_NORMALS)))  # truncation asymmetry
    stretch = np.exp(rng.uniform(-0.35, 0.35, (n, 3)))  # platelets and rods
    # facets of A x (x in the crystal frame): normals A^-T m, same distances
    normals = _NORMALS[None] / stretch[:, None, :]
    rot = _rotations(rng, n)
    return np.einsum("nij,nkj->nki", rot, normals), d


def _soft_inside(margin: np.ndarray, rounding: np.ndarray, axis: int) -> np.ndarray:
    """Smooth minimum over ``axis`` of the (pixel) distances to each facet: rounds the corners."""
    r = rounding.reshape((-1,) + (1,) * (margin.ndim - 2))
    m = margin.min(axis=axis)
    return m - r * np.log(np.exp(-(np.moveaxis(margin, axis, 0) - m) / r).sum(axis=0))


def crystal_shapes(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    """Amplitudes ``(n, size, size)`` of faceted crystals (before texture), in [0, 1], centred.

    A plane section (80 %) or a projection (20 %) of a random polyhedron, scaled so that it spans
    30-90 % of the field; 20 % are merged or twinned pairs, 15 % have a re-entrant notch, 10 % a void.
    """
    yy, xx = (np.mgrid[0:size, 0:size].astype(np.float64) - size // 2)
    pix = np.stack([yy.ravel(), xx.ravel()], axis=1)  # (P, 2)
    out = np.empty((n, size, size), np.float32)
    project = rng.random(n) < 0.2
    pair = rng.random(n) < 0.2
    fill = rng.uniform(0.3, 0.9, n)
    edge = rng.uniform(0.5, 1.5, n)  # soft-edge width in pixels
    rounding = rng.uniform(0.05, 1.5, n)  # corner rounding in pixels
    for i in range(n):
        parts = 2 if pair[i] else 1
        normals, dist = _polyhedra(rng, parts)
        basis = _rotations(rng, 1)[0]  # rows: section plane axes u, v and the view direction w
        centres = np.zeros((parts, 3))
        if parts == 2:  # a second grain beside the first, overlapping it
            direction = rng.normal(size=3)
            centres[1] = direction / np.linalg.norm(direction) * rng.uniform(0.6, 1.4)
        cut = rng.uniform(-0.3, 0.3)  # the section plane's offset from the centre, along w
        # the crystal in units where the {100} facets sit at 1; pixels -> crystal units by `scale`
        scale = 2.2 / (fill[i] * size)

        grains = (normals, dist, basis, centres, cut, bool(project[i]), float(rounding[i]), float(edge[i]))
        for _ in range(6):  # scale to the drawn fill, and so that the centred crystal keeps off the edges
            amp = _section(pix, size, scale, *grains)
            factor = _misfit(amp, fill[i] * size)
            if factor is None:
                scale *= 0.5
                continue
            scale *= factor
            if abs(factor - 1) < 0.03:
                break
        amp = _section(pix, size, scale, *grains)
        if project[i]:
            amp = gaussian_filter(amp / max(amp.max(), 1e-9), edge[i] / 2)
        out[i] = amp / max(amp.max(), 1e-9)
    _notches(rng, out)
    _voids(rng, out)
    return _centre(out)


def _section(pix: np.ndarray, size: int, scale: float, normals: np.ndarray, dist: np.ndarray, basis: np.ndarray,
             centres: np.ndarray, cut: float, project: bool, rounding: float, edge: float) -> np.ndarray:
    """``(size, size)`` amplitude of the grains ``(normals, dist)`` (centred at ``centres``) cut by
    the plane ``cut`` along ``basis[2]`` (or projected along it), ``scale`` crystal units per pixel."""
    amp = np.zeros(size * size)
    for k in range(len(normals)):
        nu, nv, nw = (normals[k] @ basis.T).T  # (26,) components along u, v, w
        free = dist[k] - normals[k] @ (cut * basis[2] - centres[k])  # (26,)
        if project:
            amp = np.maximum(amp, _thickness(pix * scale, nu, nv, nw, free) / scale)
        else:
            norm = np.hypot(nu, nv).clip(1e-6)
            margin = (free[:, None] - (nu[:, None] * pix[:, 0] + nv[:, None] * pix[:, 1]) * scale)
            margin = margin / (norm[:, None] * scale)  # in pixels
            inside = _soft_inside(margin[None], np.array([rounding]), axis=1)[0]
            amp = np.maximum(amp, np.clip(inside / edge + 0.5, 0, 1))
    return amp.reshape(size, size)


def _misfit(amp: np.ndarray, target: float) -> float | None:
    """By how much to scale the crystal units per pixel so that ``amp`` spans ``target`` pixels and,
    centred on its centre of mass, keeps a pixel off each edge (``None``: nothing drawn)."""
    size = amp.shape[-1]
    on = amp > SUPPORT_THRESHOLD * max(amp.max(), 1e-30)
    if not on.any():
        return None
    rows, cols = np.nonzero(on)
    extent = max(np.ptp(rows), np.ptp(cols)) + 1
    mass = amp.sum()
    cy, cx = (amp.sum(axis=1) * np.arange(size)).sum() / mass, (amp.sum(axis=0) * np.arange(size)).sum() / mass
    room = min(size // 2 - 1, size - 2 - size // 2)  # pixels between the centre and the last row kept free
    reach = max(cy - rows.min(), rows.max() - cy, cx - cols.min(), cols.max() - cx) + 1
    return max(extent / target, reach / room)


def _thickness(p: np.ndarray, nu: np.ndarray, nv: np.ndarray, nw: np.ndarray, free: np.ndarray) -> np.ndarray:
    """Length inside ``{x: n.x <= free}`` of the lines through ``p (P, 2)`` along ``w``."""
    rhs = free[:, None] - nu[:, None] * p[:, 0] - nv[:, None] * p[:, 1]  # n_w * t <= rhs
    with np.errstate(divide="ignore", invalid="ignore"):
        bound = rhs / nw[:, None]
    up = np.where(nw[:, None] > 1e-9, bound, np.inf).min(axis=0)
    low = np.where(nw[:, None] < -1e-9, bound, -np.inf).max(axis=0)
    flat_ok = np.where(np.abs(nw[:, None]) <= 1e-9, rhs >= 0, True).all(axis=0)
    return np.where(flat_ok, np.clip(up - low, 0, None), 0)


def _notches(rng: np.random.Generator, amp: np.ndarray) -> None:
    """Cut a wedge (two half-planes meeting inside the crystal) out of 15 % of the crystals."""
    n, size, _ = amp.shape
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    for i in np.nonzero(rng.random(n) < 0.15)[0]:
        rows, cols = np.nonzero(amp[i] > 0.5)
        if len(rows) < 20:
            continue
        j = rng.integers(len(rows))
        y0, x0 = rows[j], cols[j]
        a1 = rng.uniform(0, 2 * np.pi)
        a2 = a1 + rng.uniform(np.pi / 3, 2 * np.pi / 3)
        d1 = np.cos(a1) * (yy - y0) + np.sin(a1) * (xx - x0)
        d2 = np.cos(a2) * (yy - y0) + np.sin(a2) * (xx - x0)
        keep = np.clip(0.5 - np.minimum(d1, d2), 0, 1)  # 0 inside the wedge, a 1-px soft edge
        amp[i] *= keep


def _voids(rng: np.random.Generator, amp: np.ndarray) -> None:
    """One or two small elliptical voids (radius 1-3 px) inside 10 % of the crystals."""
    n, size, _ = amp.shape
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    for i in np.nonzero(rng.random(n) < 0.1)[0]:
        depth = distance_transform_edt(amp[i] > 0.5)
        for _ in range(rng.integers(1, 3)):
            deep = np.argwhere(depth > 3)
            if len(deep) == 0:
                break
            y0, x0 = deep[rng.integers(len(deep))]
            ry, rx = rng.uniform(1, 3, 2)
            r = np.sqrt(((yy - y0) / ry) ** 2 + ((xx - x0) / rx) ** 2)
            amp[i] *= np.clip(r - 0.5, 0, 1) * 0.9 + 0.1 * (r < 1)  # empty, or a thin residue


def _centre(amp: np.ndarray) -> np.ndarray:
    """Roll each amplitude so that its centre of mass sits at ``N // 2``."""
    n, size, _ = amp.shape
    idx = np.arange(size)
    mass = amp.sum(axis=(1, 2)).clip(1e-9)
    cy = (amp.sum(axis=2) * idx).sum(axis=1) / mass
    cx = (amp.sum(axis=1) * idx).sum(axis=1) / mass
    for i in range(n):
        amp[i] = np.roll(amp[i], (size // 2 - int(round(cy[i])), size // 2 - int(round(cx[i]))), axis=(0, 1))
    return amp


def _texture(rng: np.random.Generator, shape: np.ndarray) -> np.ndarray:
    """Density variations: smooth (+-10-30 %) and speckle-like (a few %), as reconstructions show."""
    n, size, _ = shape.shape
    smooth = gaussian_filter(rng.normal(size=shape.shape), sigma=(0, 3.0, 3.0), mode="wrap")
    smooth /= smooth.std(axis=(1, 2), keepdims=True).clip(1e-9)
    speckle = gaussian_filter(rng.normal(size=shape.shape), sigma=(0, 0.7, 0.7), mode="wrap")
    speckle /= speckle.std(axis=(1, 2), keepdims=True).clip(1e-9)
    level = rng.uniform(0.05, 0.15, (n, 1, 1)) * (rng.random((n, 1, 1)) < 0.9)
    grain = rng.uniform(0.0, 0.05, (n, 1, 1))
    amp = shape * np.clip(1 + level * smooth + grain * speckle, 0.3, None)
    return (amp / amp.max(axis=(1, 2), keepdims=True).clip(1e-9)).astype(np.float32)


def displacement_phase(rng: np.random.Generator, amplitude: np.ndarray) -> np.ndarray:
    """Strain phases ``(n, N, N)`` of the crystals in ``amplitude``: ``g . u`` of random
    displacement fields, wrapped to [-pi, pi), circular mean 0 inside the support, 0 outside.

    Each crystal gets a random mix of surface relaxation, a misfitting inclusion or core, a
    thermal gradient and a smooth long-wavelength field, scaled together to a peak-to-peak drawn
    log-uniformly in 0.1-4 rad; 25 % also hold one or two dislocations (edge or screw: a phase
    vortex of winding +-1 at a random point, mostly inside the crystal).
    """
    n, size, _ = amplitude.shape
    support = amplitude > SUPPORT_THRESHOLD
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    out = np.empty((n, size, size), np.float32)
    ptp = 10 ** rng.uniform(-1, np.log10(4.0), n)
    for i in range(n):
        theta = rng.uniform(0, 2 * np.pi)
        gy, gx = np.sin(theta), np.cos(theta)  # the Bragg vector's in-plane direction
        field = np.zeros((size, size))
        inside = support[i]
        rows, cols = np.nonzero(inside)
        cy, cx = rows.mean(), cols.mean()
        radius = max(np.sqrt(inside.sum() / np.pi), 1.0)
        ry, rx = (yy - cy) / radius, (xx - cx) / radius
        if rng.random() < 0.6:  # surface relaxation: displacement along the outward normal, decaying inwards
            depth = distance_transform_edt(inside)
            dy, dx = np.gradient(gaussian_filter(depth, 1.0))
            norm = np.hypot(dy, dx).clip(1e-6)
            decay = np.exp(-depth / rng.uniform(1.0, 4.0))
            field += rng.choice([-1, 1]) * decay * -(gy * dy + gx * dx) / norm
        if rng.random() < 0.4:  # misfitting inclusion or core: radial displacement
            j = rng.integers(len(rows))
            py, px = (rows[j] + cy) / 2, (cols[j] + cx) / 2
            r0 = rng.uniform(0.15, 0.6) * radius
            dy, dx = yy - py, xx - px
            r = np.hypot(dy, dx).clip(1e-6)
            ur = np.where(r < r0, r / r0, r0 / r)  # continuous at r0; 1/r outside (2-D elastic)
            field += rng.choice([-1, 1]) * ur * (gy * dy + gx * dx) / r
        if rng.random() < 0.5:  # thermal gradient or bending: a quadratic displacement
            q = rng.normal(size=3)
            field += q[0] * ry**2 + q[1] * rx**2 + q[2] * ry * rx
        if rng.random() < 0.5 or not field.any():  # smooth long-wavelength field
            k = rng.uniform(0.3, 1.5, 2) * np.pi
            field += np.sin(k[0] * ry + rng.uniform(0, 2 * np.pi)) * np.cos(k[1] * rx + rng.uniform(0, 2 * np.pi))
        lo, hi = field[inside].min(), field[inside].max()
        phase = (field - (lo + hi) / 2) / max(hi - lo, 1e-9) * ptp[i]
        if rng.random() < 0.25:
            for _ in range(rng.integers(1, 3)):
                j = rng.integers(len(rows))
                py, px = rows[j] + rng.uniform(-0.5, 0.5), cols[j] + rng.uniform(-0.5, 0.5)
                phase += _dislocation(rng, yy - py, xx - px)
        weights = amplitude[i] * inside
        phase -= np.angle((weights * np.exp(1j * phase)).sum())
        out[i] = np.where(inside, wrap(phase), 0)
    return out


def _dislocation(rng: np.random.Generator, dy: np.ndarray, dx: np.ndarray) -> np.ndarray:
    """Phase ``g . u`` of a straight dislocation through (0, 0): a screw one (line along the
    beam: a pure vortex) or an edge one (isotropic elasticity, Poisson ratio 0.3), ``g . b = 2 pi``
    times +-1, rotated at random."""
    sign = rng.choice([-1, 1])
    a = rng.uniform(0, 2 * np.pi)
    y = np.cos(a) * dy - np.sin(a) * dx
    x = np.sin(a) * dy + np.cos(a) * dx
    theta = np.arctan2(y, x)
    if rng.random() < 0.5:
        return sign * theta
    nu = 0.3
    r2 = (x * x + y * y).clip(0.25)
    m = rng.uniform(-1, 1)  # the component of g normal to b, in units of 2 pi / b
    ux = theta + x * y / (2 * (1 - nu) * r2)
    uy = -((1 - 2 * nu) / (4 * (1 - nu)) * np.log(r2) + (x * x - y * y) / (4 * (1 - nu) * r2))
    return sign * ux + m * uy


def phase_ramp(offset: np.ndarray, size: int) -> np.ndarray:
    """The object phase ``(n, N, N)`` that moves the Bragg peak by ``offset (n, 2)`` pixels
    (row, column) from ``N // 2`` (:func:`cdinn_stream.core.physics.ramp`, in float64), not wrapped."""
    return ramp(torch.as_tensor(np.asarray(offset, np.float64)), size).numpy()


def crystal_objects(rng: np.random.Generator, n: int, size: int, *, offset: bool = True
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Random crystals: ``(amplitude, phase)``, each ``(n, size, size)`` float32, centred.

    The phase is the strain phase (:func:`displacement_phase`) plus, with ``offset``, the ramp of
    a Bragg peak ``U{-2..2} + U(-0.5, 0.5)`` pixels off the window's centre on each axis, wrapped
    to [-pi, pi) and 0 outside the support.
    """
    amplitude = _centre(_texture(rng, crystal_shapes(rng, n, size)))
    empty = ~(amplitude > SUPPORT_THRESHOLD).any(axis=(1, 2))
    for _ in range(100):  # rare (a sliver that the texture took below the threshold): draw those again
        if not empty.any():
            break
        amplitude[empty] = _centre(_texture(rng, crystal_shapes(rng, int(empty.sum()), size)))
        empty = ~(amplitude > SUPPORT_THRESHOLD).any(axis=(1, 2))
    if empty.any():
        raise RuntimeError(f"the crystal recipe drew {int(empty.sum())} crystals with no support 100 times over")
    phase = displacement_phase(rng, amplitude)
    if offset:
        off = rng.integers(-MAX_OFFSET, MAX_OFFSET + 1, (n, 2)) + rng.uniform(-0.5, 0.5, (n, 2))
        support = amplitude > SUPPORT_THRESHOLD
        phase = np.where(support, wrap(phase + phase_ramp(off, size)), 0).astype(np.float32)
    return np.ascontiguousarray(amplitude), np.ascontiguousarray(phase)


def _coherence_blur(rng: np.random.Generator, intensity: np.ndarray) -> np.ndarray:
    """Partial coherence: each pattern convolved with a Gaussian of 0-0.8 px (half of them sharp)."""
    n, size, _ = intensity.shape
    sigma = rng.uniform(0, 0.8, n) * (rng.random(n) < 0.5)
    f = np.fft.fftfreq(size)
    kernel = np.exp(-2 * np.pi**2 * sigma[:, None, None] ** 2 * (f[:, None] ** 2 + f[None, :] ** 2))
    out = np.fft.ifft2(np.fft.fft2(intensity) * kernel).real
    return np.clip(out, 0, None)


def detector_counts(rng: np.random.Generator, intensity: np.ndarray, *,
                    photons: float | tuple[float, float] | None = PHOTONS, background: float = 0.0) -> np.ndarray:
    """What a detector records of ``(n, M, M)`` intensities: partial-coherence blur, a +-5 % flat
    field, ``photons`` in total per frame (a number or a log-uniform range) over a background of
    0-1 counts per pixel, Poisson counts, then gaps (20 %: a row or column band 1-3 px wide, away
    from the peak), dead pixels (30 %: up to 5) at 0 and hot pixels (20 %: 1-3 at 0.5-2x the
    frame's maximum). ``background`` adds that many counts per pixel to the drawn background.
    ``photons=None``: no counting noise (``background`` is then added as it is)."""
    n, m, _ = intensity.shape
    out = _coherence_blur(rng, intensity.astype(np.float64))
    out *= 1 + rng.uniform(-0.05, 0.05, out.shape)
    if photons is not None:
        if isinstance(photons, tuple | list):
            lo, hi = np.log10(photons[0]), np.log10(photons[1])
            total = 10 ** rng.uniform(lo, hi, (n, 1, 1))
        else:
            total = np.full((n, 1, 1), float(photons))
        drawn = 10 ** rng.uniform(-2, 0, (n, 1, 1)) * (rng.random((n, 1, 1)) < 0.8)
        out = out * total / out.sum(axis=(1, 2), keepdims=True).clip(1e-30) + drawn + background
        out = rng.poisson(out).astype(np.float64)
    elif background:
        out = out + background
    centre = m // 2
    for i in np.nonzero(rng.random(n) < 0.2)[0]:
        width = rng.integers(1, 4)
        start = rng.choice(np.r_[0 : centre - 3 - width, centre + 4 : m - width])
        if rng.random() < 0.5:
            out[i, start : start + width] = 0
        else:
            out[i, :, start : start + width] = 0
    for i in np.nonzero(rng.random(n) < 0.3)[0]:
        k = rng.integers(1, 6)
        out[i, rng.integers(0, m, k), rng.integers(0, m, k)] = 0
    for i in np.nonzero(rng.random(n) < 0.2)[0]:
        k = rng.integers(1, 4)
        out[i, rng.integers(0, m, k), rng.integers(0, m, k)] = np.rint(rng.uniform(0.5, 2.0, k) * out[i].max())
    return out.astype(np.float32)
