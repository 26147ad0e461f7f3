"""Iterative baseline suite: 620-iteration ER/HIO (ours) one pattern at a time and batched, the
NN's speed-up over it, and cohere-core's ER/HIO run side by side on the same patterns."""

from __future__ import annotations

import tempfile
import time

import numpy as np

from cdinn_stream.core.metrics import score
from cdinn_stream.core.phase_retrieval import ITERATIONS, er_hio
from cdinn_stream.core.simulate import simulate
from cdinn_stream.nn.reconstruct import load_model


def _medians(s: dict) -> dict:
    return {k: float(np.median(v)) for k, v in s.items()}


def run(model: str, *, n: int = 1024, n_single: int = 3, n_cohere: int = 32, quick: bool = False) -> dict:
    """Timings and, for the side-by-side patterns, accuracy of each method."""
    iters = 62 if quick else ITERATIONS
    n = 16 if quick else n
    size = load_model(model, device="cpu").size
    data = simulate(n, size, seed=7, pad=2)
    t = time.perf_counter()
    for i in range(n_single):
        er_hio(data.intensity[i], iterations=iters)
    single = (time.perf_counter() - t) / n_single
    t = time.perf_counter()
    er_hio(data.intensity, iterations=iters)
    batched = (time.perf_counter() - t) / n
    out = {"iterations": iters, "patterns": n, "ms_single": single * 1e3, "ms_per_pattern_batched": batched * 1e3}
    out["side_by_side"] = side_by_side(model, 2 if quick else n_cohere, iters)
    return out


def side_by_side(model: str, n: int, iters: int) -> dict:
    """NN, our ER/HIO and cohere-core's ER/HIO on the same ``n`` patterns, one at a time."""
    from .cohere_adapter import cohere_er_hio, cohere_version

    cdi = load_model(model, device="cpu")
    clean = simulate(n, cdi.size, seed=11)
    padded = simulate(n, cdi.size, seed=11, pad=2)
    res: dict = {"patterns": n, "iterations": iters}
    t = time.perf_counter()
    rec = cdi.predict(clean.intensity, batch_size=1)
    res["nn"] = {"ms_per_pattern": (time.perf_counter() - t) / n * 1e3,
                 **_medians(score(rec.amplitude, rec.phase, clean.amplitude, clean.phase, clean.intensity))}
    t = time.perf_counter()
    ours = np.stack([er_hio(padded.intensity[i], iterations=iters).numpy() for i in range(n)])
    res["erhio"] = {"ms_per_pattern": (time.perf_counter() - t) / n * 1e3,
                    **_medians(score(np.abs(ours), np.angle(ours), clean.amplitude, clean.phase, padded.intensity))}
    try:
        with tempfile.TemporaryDirectory(prefix="cdinn-cohere-") as tmp:
            cohere_er_hio(padded.intensity[0], iterations=iters, workdir=f"{tmp}/warm-up")  # first call: imports
            objs, secs = zip(*(cohere_er_hio(padded.intensity[i], iterations=iters, workdir=f"{tmp}/{i}")
                               for i in range(n)), strict=True)
        theirs = np.stack(objs)
        res["cohere"] = {"version": cohere_version(), "ms_per_pattern": float(np.mean(secs)) * 1e3,
                         **_medians(score(np.abs(theirs), np.angle(theirs), clean.amplitude, clean.phase,
                                          padded.intensity))}
    except RuntimeError as err:  # cohere-core not installed
        res["cohere"] = {"error": str(err)}
    return res


def table(r: dict, nn_us: dict[str, float]) -> list[str]:
    """Markdown lines; ``nn_us`` is the NN's best microseconds per frame by precision."""
    single, batched = r["ms_single"], r["ms_per_pattern_batched"]
    best = min(single, batched)
    lines = ["## NN against iterative phase retrieval (CPU)", "",
             f"ER/HIO ({r['iterations']} iterations, 2x oversampled, ours): {single:.1f} ms for one pattern, "
             f"{batched:.2f} ms per pattern in a batch of {r['patterns']}.", "",
             "| NN precision | NN us / frame (best batch) | speed-up, best vs best | target |", "|---|---|---|---|"]
    lines += [f"| {p} | {us:.1f} | {best * 1e3 / us:.0f}x | 2000x |" for p, us in nn_us.items()]
    s = r["side_by_side"]
    lines += ["", f"Side by side on the same {s['patterns']} patterns, one pattern at a time "
                  f"({s['iterations']} iterations for both iterative codes):", "",
              "| method | ms / pattern | chi2 median | support IoU median | phase RMSE median (rad) |",
              "|---|---|---|---|---|"]
    for key, label in (("nn", "NN (batch 1)"), ("erhio", "ER/HIO, cdinn-stream (torch)"),
                       ("cohere", f"ER/HIO, cohere-core {s.get('cohere', {}).get('version', '')}")):
        m = s.get(key, {})
        if "error" in m:
            lines.append(f"| {label} | not run: {m['error']} | | | |")
        elif m:
            lines.append(f"| {label} | {m['ms_per_pattern']:.2f} | {m['chi2']:.4f} | {m['support_iou']:.3f} | "
                         f"{m['phase_rmse']:.3f} |")
    return lines
