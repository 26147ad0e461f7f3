"""Fourier-optics conventions shared by every stage (pure numpy / torch).

Conventions (used everywhere in cdinn-stream):

* Arrays are indexed ``[..., row, column]`` = ``[..., y, x]``; row 0 is the top of an image
  (matplotlib ``origin="upper"``), as a detector frame is read out.
* Real-space objects are *centred*: the object's centre of mass sits at index ``N // 2``.
* Diffraction is *centred* too: zero frequency (the Bragg peak) at index ``N // 2``.
  ``far_field(obj) = fftshift(fft2(ifftshift(obj), norm="ortho"))``.
* "Diffraction amplitude" is ``|F|``; "intensity" is ``|F|**2`` (what a detector counts).
  The network's input is the amplitude ``sqrt(intensity)`` scaled to a maximum of 1.
* The twin image of ``x[n]`` is ``conj(x[-n])`` about the centre: ``n -> N - n`` (mod N),
  i.e. ``roll(flip(x), 1)`` on each axis. It has the same ``|F|``.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = [
    "far_field",
    "far_field_torch",
    "twin",
    "twin_torch",
    "twin_phase_torch",
    "normalized_amplitude",
    "masked_phase",
    "SUPPORT_THRESHOLD",
    "wrap",
    "peak_offsets",
    "ramp",
    "roll_frames",
    "add_ramp",
    "strain",
    "CENTRE_WINDOW",
]

#: Amplitude (0..1) above which a pixel belongs to the object's support (the paper's 0.1).
SUPPORT_THRESHOLD = 0.1


def far_field(obj: np.ndarray) -> np.ndarray:
    """Centred, orthonormal 2-D Fourier transform of ``(..., N, N)`` complex objects."""
    axes = (-2, -1)
    return np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(obj, axes=axes), norm="ortho"), axes=axes)


def far_field_torch(obj: torch.Tensor) -> torch.Tensor:
    """Torch version of :func:`far_field` (batched, any device)."""
    dims = (-2, -1)
    return torch.fft.fftshift(torch.fft.fft2(torch.fft.ifftshift(obj, dim=dims), norm="ortho"), dim=dims)


def masked_phase(amplitude, phase) -> np.ndarray:
    """The phase with 0 where the amplitude is at or below :data:`SUPPORT_THRESHOLD` (for display:
    the network predicts a phase at every pixel)."""
    return np.where(np.asarray(amplitude) > SUPPORT_THRESHOLD, phase, 0).astype(np.float32)


def twin(x: np.ndarray) -> np.ndarray:
    """Centrosymmetric inversion ``x[n] -> x[N - n]`` of ``(..., N, N)`` arrays (no conjugation)."""
    return np.roll(np.flip(x, axis=(-2, -1)), shift=(1, 1), axis=(-2, -1))


def twin_torch(x: torch.Tensor) -> torch.Tensor:
    """Torch version of :func:`twin` (no conjugation)."""
    return torch.roll(torch.flip(x, dims=(-2, -1)), shifts=(1, 1), dims=(-2, -1))


def twin_phase_torch(phase: torch.Tensor) -> torch.Tensor:
    """Phase of the twin image: inverted and negated (the conjugate)."""
    return -twin_torch(phase)


def normalized_amplitude(intensity: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Network input: ``sqrt(intensity)`` of ``(N, H, W)`` frames, each scaled to a maximum of 1."""
    t = torch.as_tensor(intensity)
    if not t.is_floating_point():
        t = t.float()
    amp = torch.sqrt(torch.clamp(t.float(), min=0.0))
    peak = amp.amax(dim=(-2, -1), keepdim=True).clamp_min(torch.finfo(amp.dtype).tiny)
    return amp / peak


def wrap(phase: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    """Phase wrapped to ``[-pi, pi)`` (numpy or torch, any shape)."""
    if isinstance(phase, torch.Tensor):
        return torch.remainder(phase + np.pi, 2 * np.pi) - np.pi
    return np.remainder(np.asarray(phase) + np.pi, 2 * np.pi) - np.pi


#: Half-width of the window around the brightest 3x3 blob over which :func:`peak_offsets` takes the
#: intensity-weighted centre of mass (7x7 pixels).
CENTRE_WINDOW = 3


def peak_offsets(intensity: np.ndarray | torch.Tensor, *, window: int = CENTRE_WINDOW,
                 subpixel: bool = False) -> torch.Tensor:
    """Where the Bragg peak of each ``(B, N, N)`` pattern sits relative to ``N // 2``: ``(B, 2)``
    (row, column) pixels, rounded to integers unless ``subpixel``.

    The centring rule of every stage (the crop, :meth:`CDIModel.predict`, training data): the
    brightest 3x3 blob (a lone hot pixel does not win over a Bragg peak whose 3x3 blob is
    brighter, as it is unless the crystal fills the whole field), then the intensity-weighted
    centre of mass of the ``(2 window + 1)**2`` pixels around it; 0 for a frame with nothing in
    that window. Periodic (indices wrap), so a pattern rolled by ``s`` gives offsets moved by ``s``
    (modulo ``N``; ties of the blob search aside). For a crystal, the centre of mass is where the mean
    lattice puts the peak (the amplitude-weighted mean phase gradient), which the brightest pixel
    of a strained crystal is not.
    """
    x = torch.as_tensor(intensity).float()
    if x.ndim == 2:
        x = x[None]
    b, n = x.shape[0], x.shape[-1]
    box = _box3(_box3(x, 1), 2)
    row = box.amax(dim=2).argmax(dim=1)  # the brightest blob in two small arg-maxima (3x cheaper than one flat one)
    col = box[torch.arange(b, device=x.device), row].argmax(dim=1)
    steps = torch.arange(-window, window + 1, device=x.device)
    rows = torch.remainder(row[:, None] + steps, n)  # (B, 2 window + 1): the window, periodically
    cols = torch.remainder(col[:, None] + steps, n)
    local = x[torch.arange(b, device=x.device)[:, None, None], rows[:, :, None], cols[:, None, :]]
    mass = local.sum(dim=(1, 2)).clamp_min(1e-30)
    offs = steps.to(x.dtype)
    com = torch.stack([(local.sum(dim=2) * offs).sum(dim=1), (local.sum(dim=1) * offs).sum(dim=1)], dim=1)
    peak = torch.stack([row, col], dim=1).to(x.dtype)
    com = com / mass[:, None]
    offsets = torch.remainder(peak + com, n) - n // 2
    offsets = torch.where((mass > 1e-30)[:, None], offsets, torch.zeros_like(offsets))  # nothing to centre on
    return offsets if subpixel else torch.round(offsets).long()


def _box3(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Periodic sum of each element of ``(B, N, N)`` ``x`` and its two neighbours along ``dim``
    (in-place adds on one copy: 4x cheaper than ``avg_pool2d`` on a CPU)."""
    out = x.clone()
    n = x.shape[dim]
    out.narrow(dim, 1, n - 1).add_(x.narrow(dim, 0, n - 1))
    out.narrow(dim, 0, n - 1).add_(x.narrow(dim, 1, n - 1))
    out.narrow(dim, 0, 1).add_(x.narrow(dim, n - 1, 1))
    out.narrow(dim, n - 1, 1).add_(x.narrow(dim, 0, 1))
    return out


def ramp(offsets: torch.Tensor, size: int) -> torch.Tensor:
    """``(B, N, N)`` object phase ``2 pi (offset . (r - N // 2)) / N`` that moves the Bragg peak
    by ``offsets (B, 2)`` (row, column) pixels; not wrapped; float64 for float64 offsets, else float32."""
    dtype = torch.float64 if offsets.dtype == torch.float64 else torch.float32
    r = torch.arange(size, device=offsets.device, dtype=dtype) - size // 2
    o = offsets.to(dtype)
    return (2 * np.pi / size) * (o[:, 0, None, None] * r[None, :, None] + o[:, 1, None, None] * r[None, None, :])


def add_ramp(phase: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``wrap(phase + ramp(offsets))`` for ``(B, N, N)`` phases, as float32, in a few in-place
    passes (the ramp is the sum of a row and a column term: it is never built whole)."""
    n = phase.shape[-1]
    r = torch.arange(n, device=phase.device, dtype=torch.float32) - n // 2
    o = offsets.to(device=phase.device, dtype=torch.float32) * (2 * np.pi / n)
    out = phase.float() + (o[:, 0, None] * r)[:, :, None]  # a new tensor: the caller's phase is kept
    out.add_((o[:, 1, None] * r + np.pi)[:, None, :])
    return out.remainder_(2 * np.pi).sub_(np.pi)


def roll_frames(x: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """Each ``(B, N, N)`` frame rolled by its own ``shifts (B, 2)`` (row, column), periodically
    (two 1-D gathers: 2x cheaper than one gather of every pixel)."""
    if x.ndim != 3 or x.shape[-1] != x.shape[-2]:
        raise ValueError(f"roll_frames takes (B, N, N) frames, not {tuple(x.shape)}")
    b, n = x.shape[0], x.shape[-1]
    idx = torch.arange(n, device=x.device)
    rows = torch.remainder(idx[None, :] - shifts[:, 0, None].to(x.device), n)
    cols = torch.remainder(idx[None, :] - shifts[:, 1, None].to(x.device), n)
    x = torch.gather(x, 1, rows[:, :, None].expand(b, n, x.shape[-1]))
    return torch.gather(x, 2, cols[:, None, :].expand(b, x.shape[1], n))


def _gap_to_edge(support: torch.Tensor) -> torch.Tensor:
    """``(B, 2)`` rolls that bring the middle of each frame's widest empty band of rows and of
    columns (periodically) to index 0."""
    out = np.zeros((len(support), 2), np.int64)
    for axis, other in ((0, 2), (1, 1)):
        occupied = support.any(dim=other).numpy()  # (B, N)
        n = occupied.shape[1]
        for i, occ in enumerate(occupied):
            if occ.all() or not occ.any():
                continue
            start = int(np.argmax(occ))  # an occupied index: empty runs do not wrap when read from it
            ring = np.roll(~occ, -start)
            edges = np.diff(np.r_[0, ring.astype(np.int8), 0])
            begins, ends = np.nonzero(edges == 1)[0], np.nonzero(edges == -1)[0]
            j = int(np.argmax(ends - begins))
            gap_middle = (start + (begins[j] + ends[j] - 1) // 2) % n
            out[i, axis] = -gap_middle
    return torch.from_numpy(out)


def strain(amplitude: np.ndarray | torch.Tensor, phase: np.ndarray | torch.Tensor) -> np.ndarray:
    """The strain view of ``(B, N, N)`` objects (or one ``(N, N)``, returned as ``(1, N, N)``): the
    phase less its amplitude-weighted linear ramp and offset over the support, wrapped to
    ``[-pi, pi)``, 0 outside the support. It is ``g . u``, the displacement along the Bragg vector
    relative to the mean lattice (whose Bragg peak is the zero frequency), as BCDI papers show it;
    the strain proper is its gradient.

    Works on wrapped phases: the object is first demodulated by its mean phase step between
    neighbouring pixels (the angle of the amplitude-weighted sum of ``z[r + 1] conj(z[r])`` along
    each axis: exact for a ramp of any size, blind to wraps), then the least-squares plane of what
    is left (amplitude-weighted, over the support, about its circular mean) is subtracted, twice.
    The object is rolled first so that its widest empty band of rows and of columns sits on the
    field's edge (a crystal across the periodic edge is then in one piece) and back at the end.
    """
    a = torch.as_tensor(amplitude).detach().cpu().double()
    p = torch.as_tensor(phase).detach().cpu().double()
    if a.ndim == 2:
        a, p = a[None], p[None]
    b, n = a.shape[0], a.shape[-1]
    support = a > SUPPORT_THRESHOLD * a.flatten(1).amax(dim=1).clamp_min(1e-300)[:, None, None]
    middle = _gap_to_edge(support)
    a, p, support = roll_frames(a, middle), roll_frames(p, middle), roll_frames(support, middle)
    w = a * support
    z = torch.polar(w, p)
    steps = torch.stack([torch.angle((z[:, 1:] * z[:, :-1].conj()).sum(dim=(1, 2))),
                         torch.angle((z[:, :, 1:] * z[:, :, :-1].conj()).sum(dim=(1, 2)))], dim=1)
    p = p - ramp(steps * n / (2 * np.pi), n).double()
    flat_w = w.reshape(b, -1)
    offset = torch.angle((flat_w * torch.exp(1j * p.reshape(b, -1))).sum(dim=1))
    p = wrap(p - offset[:, None, None])
    yy, xx = torch.meshgrid(torch.arange(n, dtype=torch.float64), torch.arange(n, dtype=torch.float64),
                            indexing="ij")
    basis = torch.stack([(yy - n // 2) / n, (xx - n // 2) / n, torch.ones_like(yy)]).reshape(3, -1)
    gram = torch.einsum("kp,bp,lp->bkl", basis, flat_w, basis) + 1e-9 * torch.eye(3, dtype=torch.float64)
    for _ in range(2):
        rhs = torch.einsum("kp,bp->bk", basis, flat_w * p.reshape(b, -1))
        coef = torch.linalg.solve(gram, rhs[..., None])[..., 0]
        p = wrap(p - torch.einsum("bk,kp->bp", coef, basis).reshape(b, n, n))
    return roll_frames(torch.where(support, p, torch.zeros_like(p)), -middle).float().numpy()
