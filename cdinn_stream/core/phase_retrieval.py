"""Iterative phase retrieval: batched ER/HIO with shrink-wrap (pure torch, CPU or GPU).

The paper's baseline: the object is zero-padded to twice its size (the pattern is oversampled
2x), then 620 iterations alternate hybrid input-output (HIO) and error reduction (ER) with a
shrink-wrapped support, and the last 20 (ER) iterates are averaged.

Schedule (620 iterations): 6 cycles of 80 HIO + 20 ER, then 20 ER that are averaged. The support
starts from the thresholded autocorrelation (or from a given guess) and is shrink-wrapped every
20 iterations: the amplitude blurred by a Gaussian whose width shrinks from 2 to 1 px,
thresholded at 0.1 of its maximum.

:func:`er_hio` runs a batch ``(B, M, M)`` of patterns at once; a single ``(M, M)`` pattern works
too. ``init=`` starts from a given object, e.g. the network's prediction (NN-seeded refinement).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

__all__ = ["er_hio", "schedule", "pad_object", "ITERATIONS"]

#: The paper's iteration count.
ITERATIONS = 620


def schedule(iterations: int = ITERATIONS, *, hio: int = 80, er: int = 20, average: int = 20) -> list[str]:
    """Algorithm per iteration: cycles of ``hio`` HIO + ``er`` ER, ending in ``average`` ER."""
    body = max(iterations - average, 0)
    steps: list[str] = []
    while len(steps) < body:
        steps += ["HIO"] * hio + ["ER"] * er
    return steps[:body] + ["ER"] * (iterations - body)


def pad_object(obj: torch.Tensor, size: int) -> torch.Tensor:
    """Zero-pad centred ``(..., n, n)`` arrays to ``(..., size, size)``, keeping the centre."""
    n = obj.shape[-1]
    b = (size - n) // 2
    return torch.nn.functional.pad(obj, (b, size - n - b, b, size - n - b))


def _gauss_kernel(m: int, sigma: float, device) -> torch.Tensor:
    """Fourier transform of a unit-sum Gaussian of width ``sigma`` px, unshifted ``(m, m)``."""
    f = torch.fft.fftfreq(m, device=device, dtype=torch.float32)
    g = torch.exp(-2 * (np.pi * sigma) ** 2 * f**2)
    return g[:, None] * g[None, :]


def _shrinkwrap(x: torch.Tensor, sigma: float, threshold: float) -> torch.Tensor:
    blurred = torch.fft.ifft2(torch.fft.fft2(x.abs()) * _gauss_kernel(x.shape[-1], sigma, x.device)).real
    peak = blurred.flatten(1).amax(dim=1)[:, None, None]
    return blurred > threshold * peak


#: Patterns per internal batch: larger batches thrash memory on CPU (measured on 2 cores).
CHUNK = 256


def er_hio(
    intensity: np.ndarray | torch.Tensor,
    *,
    chunk: int = CHUNK,
    iterations: int = ITERATIONS,
    beta: float = 0.9,
    init: torch.Tensor | None = None,
    support: torch.Tensor | None = None,
    shrinkwrap_every: int = 20,
    threshold: float = 0.1,
    sigma: tuple[float, float] = (2.0, 1.0),
    average: int = 20,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Reconstruct complex objects from centred intensities ``(B, M, M)`` or ``(M, M)``.

    Args:
        intensity: measured intensities, zero frequency at ``M // 2`` (oversampled 2x for ER/HIO).
        iterations: total iterations (the paper: 620).
        beta: HIO feedback.
        init: optional starting object(s), centred, ``(B, m, m)`` with ``m <= M`` (zero-padded).
        support: optional starting support, same layout as ``init``; else from ``init`` or the
            autocorrelation.
        shrinkwrap_every: iterations between support updates (0 turns shrink-wrap off).
        threshold: shrink-wrap threshold, a fraction of the blurred amplitude's maximum.
        sigma: shrink-wrap blur width at the start and the end, in pixels.
        average: the last ``average`` iterates (ER) are averaged into the result.
        seed: seed of the random starting phases.
        device: where to compute; default: ``intensity``'s device.
        progress: called with 1 after every iteration (of each chunk).
        chunk: patterns reconstructed together; a larger batch runs chunk after chunk.

    Returns:
        Complex objects ``(B, M, M)`` (or ``(M, M)``), centred, complex64.
    """
    measured = torch.as_tensor(intensity)
    single = measured.ndim == 2
    if single:
        measured = measured[None]
    if len(measured) > chunk:
        kw = dict(iterations=iterations, beta=beta, shrinkwrap_every=shrinkwrap_every, threshold=threshold,
                  sigma=sigma, average=average, seed=seed, device=device, progress=progress, chunk=chunk)
        parts = []
        for i in range(0, len(measured), chunk):
            part_init = None if init is None else init[i : i + chunk]
            part_support = None if support is None else support[i : i + chunk]
            parts.append(er_hio(measured[i : i + chunk], init=part_init, support=part_support, **kw))
        return torch.cat(parts)
    if device is not None:
        measured = measured.to(device)
    measured = measured.float().clamp_min(0)
    b, m, _ = measured.shape
    dims = (-2, -1)
    modulus = torch.fft.ifftshift(torch.sqrt(measured), dim=dims)  # unshifted, zero frequency at 0
    g = torch.Generator(device="cpu").manual_seed(seed)
    if init is not None:
        start = pad_object(
            torch.as_tensor(init, device=measured.device).to(torch.complex64).reshape(b, *init.shape[-2:]), m)
        x = torch.fft.ifftshift(start, dim=dims)
        if support is None:
            s = _shrinkwrap(x, 1.0, threshold)
        else:
            s = torch.fft.ifftshift(pad_object(
                torch.as_tensor(support, device=measured.device).reshape(b, *support.shape[-2:]).float(), m),
                dim=dims) > 0.5
    else:
        phases = torch.rand(measured.shape, generator=g).to(measured.device) * (2 * np.pi)
        x = torch.fft.ifft2(torch.polar(modulus, phases), norm="ortho")
        if support is None:
            autocorr = torch.fft.ifft2(modulus**2, norm="ortho").abs()
            s = autocorr > 0.1 * autocorr.flatten(1).amax(dim=1)[:, None, None]
        else:
            s = torch.fft.ifftshift(pad_object(
                torch.as_tensor(support, device=measured.device).reshape(b, *support.shape[-2:]).float(), m),
                dim=dims) > 0.5
    steps = schedule(iterations, average=average)
    n_sw = max(iterations // max(shrinkwrap_every, 1), 1)
    total = torch.zeros_like(x)
    sw_count = 0
    for k, algorithm in enumerate(steps):
        f = torch.fft.fft2(x, norm="ortho")
        f = modulus * f / f.abs().clamp_min(1e-12)
        y = torch.fft.ifft2(f, norm="ortho")
        if algorithm == "ER":
            x = y * s
        else:
            x = torch.where(s, y, x - beta * y)
        if shrinkwrap_every and (k + 1) % shrinkwrap_every == 0 and k < iterations - average:
            frac = sw_count / max(n_sw - 1, 1)
            sw_count += 1
            s = _shrinkwrap(x, sigma[0] + (sigma[1] - sigma[0]) * frac, threshold)
        if k >= iterations - average:
            total += x
        if progress is not None:
            progress(1)
    result = total / max(min(average, iterations), 1)
    result = torch.fft.fftshift(result, dim=dims).to(torch.complex64)
    return result[0] if single else result
