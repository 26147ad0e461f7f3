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
