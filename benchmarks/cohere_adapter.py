"""Run the external ``cohere-core`` ER/HIO (CPU, numpy backend) on 2-D patterns, for comparison.

Settings mirror :func:`cdinn_stream.core.phase_retrieval.er_hio` (620 iterations):
``algorithm_sequence`` = 6 x (80 HIO + 20 ER) + 20 ER, ``hio_beta`` 0.9, shrink-wrap every 20
iterations (at iterations 20, 40, ..., 600, before the projection, i.e. after ours' 19, 39, ...,
599) with threshold ``support_threshold`` and a Gaussian width falling linearly from 2 to 1 px as
in ours (one cohere shrink-wrap sub-trigger per 20-iteration block, each with its own sigma); the
starting support is ours too: the autocorrelation thresholded at 0.1 (``support.npy`` in the
``continue_dir``). No twin trigger, phase constraint, low-pass filter, partial coherence or GA.

Differences that cohere cannot express / that we kept as cohere does them:
* start: cohere's own random complex image inside the support (time-seeded, not reproducible)
  instead of our random-phase back-propagation of the measured modulus;
* averaging: cohere's ``average_trigger`` over the last 20 (ER) iterates averages the *amplitude*
  only (the phase is the last iterate's); ours averages the complex iterates;
* shrink-wrap blur uses ``scipy.ndimage.gaussian_filter`` (reflecting edges, ``>=`` threshold)
  instead of our periodic FFT blur (``>``); float64 instead of our float32.

Conventions: cohere reads the *modulus* (``sqrt(I)``, centred) from ``data.npy`` and propagates
with an inverse FFT, so its object is the conjugate of ours (no flip needed: a centred object and
its shift only differ by a phase ramp in |F|). The result is conjugated and rescaled so that
``|fftshift(fft2(ifftshift(obj)))|**2`` matches the input intensity in the least-squares sense.
"""

from __future__ import annotations

import contextlib
import io
import time
from pathlib import Path

import numpy as np

__all__ = ["cohere_er_hio", "cohere_version"]

_MISSING = "cohere-core is not installed: pip install cohere-core"


def cohere_version() -> str | None:
    """The installed cohere-core version, or None."""
    try:
        from importlib.metadata import PackageNotFoundError, version

        return version("cohere-core")
    except PackageNotFoundError:
        return None


def _config(iterations: int, threshold: float) -> dict:
    """cohere parameters; the sequence is cut into runs of one algorithm, split at multiples of 20,
    and a run starting at iteration k (20 | k, k <= iterations - 20) opens with a shrink-wrap."""
    body = max(iterations - 20, 0)
    steps = ((["HIO"] * 80 + ["ER"] * 20) * (body // 100 + 1))[:body] + ["ER"] * (iterations - body)
    runs: list[list] = []
    for k, alg in enumerate(steps):
        if not runs or k % 20 == 0 or alg != runs[-1][0]:
            runs.append([alg, 0, k % 20 == 0 and 0 < k <= body])
        runs[-1][1] += 1
    n_sw = max(iterations // 20, 1)  # ours: sigma 2 -> 1 over n_sw shrink-wraps
    seq, sigmas = [], []
    for alg, n, sw in runs:
        seq.append(f"{n}*{alg}" + (f".SW{len(sigmas)}" if sw else ""))
        if sw:
            sigmas.append(2.0 - len(sigmas) / max(n_sw - 1, 1))
    params: dict = {"algorithm_sequence": "+".join(seq), "hio_beta": 0.9,
                    "average_trigger": [max(iterations - 20, 0), 1]}
    if sigmas:
        params.update(shrink_wrap_trigger=[[0, 20]] * len(sigmas), shrink_wrap_type="GAUSS",
                      shrink_wrap_threshold=[threshold] * len(sigmas), shrink_wrap_gauss_sigma=sigmas)
    return params


def cohere_er_hio(intensity: np.ndarray, *, iterations: int = 620, support_threshold: float = 0.1,
                  workdir: str | Path) -> tuple[np.ndarray, float]:
    """Run cohere-core's ER/HIO + shrink-wrap on one 2-D, centred (zero frequency at N//2) diffraction
    intensity (M, M) (2x oversampled: the object fits in the central M/2 x M/2). Returns the complex
    object (M, M) in OUR convention and the wall-clock seconds of cohere's reconstruction alone."""
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            import cohere_core.controller.phasing as phasing
    except ImportError as err:
        raise RuntimeError(_MISSING) from err
    intensity = np.asarray(intensity, dtype=np.float64)
    if intensity.ndim != 2 or intensity.shape[0] != intensity.shape[1]:
        raise ValueError(f"expected one square (M, M) intensity, got {intensity.shape}")
    if iterations < 1:
        raise ValueError("iterations must be >= 1")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    modulus = np.sqrt(np.clip(intensity, 0, None))
    np.save(workdir / "data.npy", modulus)
    autocorr = np.abs(np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(intensity))))
    np.save(workdir / "support.npy", (autocorr > 0.1 * autocorr.max()).astype(np.int64))
    (workdir / "image.npy").unlink(missing_ok=True)  # else cohere would continue from it
    params = _config(iterations, support_threshold) | {"continue_dir": str(workdir)}
    rng_state = np.random.get_state()  # cohere reseeds numpy's global RNG from the clock
    try:
        with contextlib.redirect_stdout(io.StringIO()), np.errstate(divide="ignore", invalid="ignore"):
            t0 = time.perf_counter()
            rec = phasing.create_rec(params, str(workdir / "data.npy"), "np", -1, debug=True)
            if rec is None or rec.iterate() < 0:
                raise RuntimeError("cohere-core reconstruction failed")
            seconds = time.perf_counter() - t0
    finally:
        np.random.set_state(rng_state)
    obj = np.conj(np.asarray(rec.get_image(), dtype=np.complex128))  # cohere's ifft -> our fft
    far = np.abs(np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(obj))))
    obj *= (far * modulus).sum() / max(float((far**2).sum()), 1e-300)
    return obj, seconds
