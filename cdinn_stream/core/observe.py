"""The observables of each reconstructed frame (:data:`cdinn_stream.core.observables.OBSERVABLES`),
batched in torch on the model's device: :func:`frame_observables`."""

from __future__ import annotations

import threading

import torch

from .observables import PEAK_WINDOW
from .physics import SUPPORT_THRESHOLD

__all__ = ["complex_objects", "frame_observables", "reference_objects"]


_WORKSPACE = threading.local()  # per thread: work tensors of the last batch shape (fresh ones page-fault on a CPU)


def _work(name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The calling thread's work tensor ``name``, the first ``shape[0]`` frames of one kept for the
    largest batch seen (a batch's 1-2 MB temporaries, allocated afresh, cost more than the
    arithmetic on them; live batches vary in size)."""
    store = _WORKSPACE.__dict__.setdefault("tensors", {})
    key = (name, tuple(shape[1:]), dtype, device, torch.is_inference_mode_enabled())
    kept = store.get(key)
    if kept is None or kept.shape[0] < shape[0]:
        kept = store[key] = torch.empty(tuple(shape), dtype=dtype, device=device)
    return kept[: shape[0]]


def complex_objects(amplitude: torch.Tensor, phase: torch.Tensor) -> torch.Tensor:
    """``amplitude * exp(i phase)`` as complex64: made once a batch and shared by the trust figure
    (:func:`cdinn_stream.core.metrics.fourier_chi2`) and :func:`frame_observables` (its cosine
    and sine are the largest part of either's cost). A work tensor of the calling thread: the next
    call overwrites it (clone it to keep it)."""
    a, p = amplitude.float(), phase.float()
    shape, device = tuple(a.shape), a.device
    re = torch.cos(p, out=_work("re", shape, torch.float32, device)).mul_(a)
    im = torch.sin(p, out=_work("im", shape, torch.float32, device)).mul_(a)
    return torch.complex(re, im, out=_work("obj", shape, torch.complex64, device))


def _demodulated(amplitude: torch.Tensor, obj: torch.Tensor, scope: str = ""
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Support weights ``w`` (the amplitude in the support, 0 outside), the support (1.0 in it, 0.0
    outside) and the complex object in the support with its linear ramp taken out,
    ``z exp(-i ramp)``: the ramp ``steps . (r - N // 2)`` from the mean phase steps between
    neighbouring pixels (the angle of the amplitude-weighted ``sum z[r + 1] conj(z[r])`` along rows
    and columns). The ramp is separable, so it is applied as a column and then a row factor (no
    exponential a pixel). All three are work tensors of the calling thread (named within ``scope``)."""
    a = amplitude.float()
    b, n = a.shape[0], a.shape[-1]
    shape, device = tuple(a.shape), a.device
    top = a.flatten(1).amax(dim=1).clamp_min(1e-30)
    threshold = (SUPPORT_THRESHOLD * top)[:, None, None]
    mask = torch.gt(a, threshold, out=_work(scope + "mask", shape, torch.float32, device))
    z = torch.mul(obj, mask, out=_work(scope + "z", shape, torch.complex64, device))
    rows = torch.mul(z[:, 1:], z[:, :-1].conj(), out=_work(scope + "rows", (b, n - 1, n), torch.complex64, device))
    cols = torch.mul(z[:, :, 1:], z[:, :, :-1].conj(),
                     out=_work(scope + "cols", (b, n, n - 1), torch.complex64, device))
    steps = torch.stack([torch.angle(rows.sum(dim=(1, 2))), torch.angle(cols.sum(dim=(1, 2)))], dim=1)
    r = torch.arange(n, device=a.device, dtype=torch.float32) - n // 2
    angles = -steps[:, :, None] * r
    factors = torch.complex(torch.cos(angles), torch.sin(angles))  # (B, 2, N): the rows' and the columns'
    w = torch.mul(a, mask, out=_work(scope + "w", shape, torch.float32, device))
    return w, mask, z.mul_(factors[:, 1, None, :]).mul_(factors[:, 0, :, None])


def reference_objects(amplitude: torch.Tensor, phase: torch.Tensor) -> torch.Tensor:
    """The ramp-removed complex objects in their supports ``(B, N, N)`` that ``correlation``
    compares later frames with (the engine keeps each run's first frame's)."""
    a, p = amplitude.float(), phase.float()
    obj = torch.complex(a * torch.cos(p), a * torch.sin(p))  # its own: the batch's work tensors stay as they are
    return _demodulated(amplitude, obj, scope="reference.")[2].clone()


def frame_observables(amplitude: torch.Tensor, phase: torch.Tensor, crops: torch.Tensor, origins: torch.Tensor, *,
                      bin: int = 1, reference: torch.Tensor | None = None,
                      obj: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """:data:`OBSERVABLES` (but ``chi2``) of ``(B, N, N)`` reconstructions, each ``(B,)`` float32.

    ``crops`` are the measured ``(B, M, M)`` crops the model saw (counts, the peak at ``M // 2``),
    ``origins`` ``(B, 2)`` their top-left detector pixel and ``bin`` their binning; ``reference``
    the objects of :func:`reference_objects` (one, or one a frame) that ``correlation`` compares
    with (NaN without one); ``obj`` the reconstructions' :func:`complex_objects`, when the caller
    has them. About 15 passes over the objects, without an exponential a pixel: 4-5 us a frame on
    two CPU cores, 15-20 % of the network's time (``cdinn-stream bench --suite observables``)."""
    b, n = amplitude.shape[0], amplitude.shape[-1]
    w, support, z = _demodulated(amplitude, complex_objects(amplitude, phase) if obj is None else obj)
    by_row = w.sum(dim=2)
    mass = by_row.sum(dim=1).clamp_min(1e-30)
    coords = torch.arange(n, device=w.device, dtype=torch.float32) - n // 2
    centroid_row = (by_row * coords).sum(dim=1) / mass
    centroid_col = (w.sum(dim=1) * coords).sum(dim=1) / mass
    total = z.sum(dim=(1, 2))
    phase_mean = torch.angle(total)
    # circular standard deviation of the phase, amplitude-weighted: sqrt(-2 ln R), R the length of
    # the mean unit phasor; the RMS about the mean for a spread well under a radian, and defined
    # (not wrapped into nonsense) for phases spread over the whole circle
    strain_rms = (-2 * torch.log((total.abs() / mass).clamp(1e-12, 1.0))).sqrt()
    if reference is None:
        correlation = torch.full((b,), float("nan"), device=w.device)
    else:
        own = torch.mul(w, w, out=_work("own", tuple(w.shape), torch.float32, w.device)).sum(dim=(1, 2))
        theirs = reference.abs().square().sum(dim=(1, 2))  # |z exp(-i ramp)|^2 = w^2
        cross = torch.mul(z, reference.conj(), out=_work("cross", tuple(z.shape), torch.complex64, z.device))
        correlation = cross.sum(dim=(1, 2)).abs() / (own * theirs).sqrt().clamp_min(1e-30)
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
            "intensity": x.sum(dim=(1, 2)), "support_area": support.sum(dim=(1, 2)),
            "centroid_row": centroid_row, "centroid_col": centroid_col, "phase_mean": phase_mean,
            "strain_rms": strain_rms, "correlation": correlation}
