"""Trust suite (issue 17): what the per-frame chi^2 costs, NN-seeded refinement on the model's
window and on a window twice as wide against 620-iteration ER/HIO, automatic refinement of
doubtful frames in a live run, and live adaptation on a crystal type the model was not trained on.

Everything runs through the package's own pieces (``fourier_chi2``, ``FrameCropper``,
``refine``, ``ReconstructionCallback`` with a real ZeroMQ sink), one machine, one run.
"""

from __future__ import annotations

import tempfile
import time

import numpy as np
import torch
from event_model import compose_run

from cdinn_stream.core.metrics import fourier_chi2, score
from cdinn_stream.core.phase_retrieval import ITERATIONS, er_hio
from cdinn_stream.core.physics import normalized_amplitude, peak_offsets, roll_frames
from cdinn_stream.core.simulate import diffraction_intensity, simulate
from cdinn_stream.core.timing import time_call
from cdinn_stream.lab.sim import OperandoCrystal
from cdinn_stream.live.callback import FrameCropper, ReconstructionCallback
from cdinn_stream.live.refine import refine
from cdinn_stream.nn.reconstruct import load_model
from cdinn_stream.sinks import ZmqPublisherSink

__all__ = ["run", "table"]


def _medians(s: dict) -> dict:
    return {k: float(np.median(v)) for k, v in s.items()}


def chi2_cost(model_name: str, *, batch: int = 256, quick: bool = False) -> list[dict]:
    """Microseconds per frame of the bare network call and of the chi^2 beside it, at ``batch``, on
    patterns centred on their Bragg peak (as the live crop makes them: no re-centring in the call)."""
    rows = []
    data = torch.as_tensor(simulate(batch, 32, seed=3).intensity)
    data = roll_frames(data, -peak_offsets(data))  # each on its Bragg peak, by the model's own rule
    for name, precision in ((model_name, "auto"), (f"{model_name}-int8", "auto"), (model_name, "fp32")):
        try:
            m = load_model(name, device="cpu", precision=precision)
        except (ValueError, RuntimeError) as err:
            rows.append({"model": name, "error": str(err)})
            continue
        x = normalized_amplitude(data)
        amp, phase = m.predict_tensor(x)
        timing = {"repeat": 3 if quick else 7, "min_seconds": 0.05 if quick else 0.3}
        net = time_call(lambda m=m, x=x: m.predict_tensor(x), **timing) / batch * 1e6
        trust = time_call(lambda a=amp, p=phase, x=x: fourier_chi2(a, p, x), **timing) / batch * 1e6
        rows.append({"model": m.name, "precision": m.precision, "batch": batch, "network_us": net, "chi2_us": trust,
                     "ratio": trust / net})
    return rows


def _frames_on_detector(intensity: np.ndarray, side: int) -> np.ndarray:
    n, m = intensity.shape[0], intensity.shape[-1]
    frames = np.zeros((n, side, side), np.float32)
    a = (side - m) // 2
    frames[:, a : a + m, a : a + m] = intensity
    return frames


def windows(model_name: str, *, n: int = 256, iterations: int = 80, quick: bool = False) -> dict:
    """On patterns the detector samples twice as finely as the model needs (objects padded 2x):
    the NN on the 2x2-binned crop, NN + ``iterations`` of ER/HIO on that crop and on the unbinned
    window twice as wide, and 620-iteration ER/HIO (random start) on the wide window."""
    n, erhio_iters = (16, 62) if quick else (n, ITERATIONS)
    model = load_model(model_name, device="cpu")
    cropper = FrameCropper(model.size, bin=2, refine_window=2, centre=model.centre)
    out: dict = {"patterns": n, "refine_iterations": iterations, "erhio_iterations": erhio_iters}
    for recipe in ("paper", "crystal"):
        data = simulate(n, model.size, seed=21, pad=2, recipe=recipe)
        block = cropper.block("bench", "primary", _frames_on_detector(data.intensity, 4 * model.size),
                              np.arange(n), np.zeros(n))
        res: dict = {}
        t = time.perf_counter()
        rec = model.predict(block.frames, chi2=False)
        nn_s = (time.perf_counter() - t) / n
        res["nn"] = {"ms_per_pattern": nn_s * 1e3,
                     **_medians(score(rec.amplitude, rec.phase, data.amplitude, data.phase, block.frames))}
        for key, intensity in (("nn+refine (model window)", block.frames), ("nn+refine (2x window)", block.wide)):
            t = time.perf_counter()
            amp, phase = refine(intensity, rec.amplitude, rec.phase, iterations=iterations, zoom=cropper.zoom)
            res[key] = {"ms_per_pattern": (nn_s + (time.perf_counter() - t) / n) * 1e3,
                        **_medians(score(amp, phase, data.amplitude, data.phase, intensity))}
        t = time.perf_counter()
        obj = er_hio(torch.as_tensor(block.wide), iterations=erhio_iters).numpy()
        res["erhio (2x window)"] = {"ms_per_pattern": (time.perf_counter() - t) / n * 1e3,
                                    **_medians(score(np.abs(obj), np.angle(obj), data.amplitude, data.phase,
                                                     block.wide))}
        out[recipe] = res
    return out


class _Keep:
    """A sink that keeps results and refined results (for the figures)."""

    def __init__(self):
        self.results, self.refined = [], []

    def open_run(self, uid, start): pass
    def write(self, result): self.results.append(result)
    def write_refined(self, block): self.refined.append(block)
    def close_run(self, uid, summary): pass


def _feed(cb: ReconstructionCallback, frames: np.ndarray, rate: float, page: int = 10) -> float:
    """Frames as event pages of ``page`` at ``rate`` frames/s through ``cb``; returns seconds."""
    run = compose_run()
    cb("start", run.start_doc)
    desc = run.compose_descriptor(name="primary", data_keys={"img": {"source": "sim", "dtype": "array",
                                                                     "shape": list(frames.shape[1:])}})
    cb("descriptor", desc.descriptor_doc)
    t0 = time.monotonic()
    for i in range(0, len(frames), page):
        due = t0 + i / rate
        time.sleep(max(0.0, due - time.monotonic()))
        chunk, now = frames[i : i + page], time.time()
        cb("event_page", desc.compose_event_page(data={"img": chunk}, timestamps={"img": [now] * len(chunk)},
                                                 seq_num=list(range(i + 1, i + 1 + len(chunk))),
                                                 time=[now] * len(chunk)))
    cb("stop", run.compose_stop())
    cb.flush(300)
    return time.monotonic() - t0


def auto_refine(model_name: str, *, n: int = 2000, rate: float = 200.0, above: float = 0.03, budget: float = 0.2,
                quick: bool = False) -> dict:
    """Crystal-recipe frames (their detector: noise, gaps, hot pixels) through the live callback
    with a ZeroMQ sink at ``rate`` frames/s: without refinement; with ``refine_above=above`` and at
    most ``budget`` of the frames; and with every doubtful frame allowed but at most ``budget`` of
    one core's time (``refine_share``)."""
    n = 200 if quick else n
    frames = _frames_on_detector(simulate(n, 32, seed=5, recipe="crystal", photons=(1e5, 1e8)).intensity, 64)
    out: dict = {"frames": n, "rate": rate, "above": above}
    for label, kw in (("off", {}),
                      (f"{budget:.0%} of the frames", {"refine_above": above, "refine_budget": budget}),
                      (f"{budget:.0%} of a core",
                       {"refine_above": above, "refine_budget": 1.0, "refine_share": budget})):
        keep, zmq_sink = _Keep(), ZmqPublisherSink("tcp://127.0.0.1:0")
        cb = ReconstructionCallback(model=load_model(model_name, device="cpu"), sinks=[zmq_sink, keep], **kw)
        seconds = _feed(cb, frames, rate)
        stats = cb.stats()
        cb.close()
        zmq_sink.close()
        nn = np.concatenate([r.chi2 for r in keep.results])
        seq = np.concatenate([r.frames.seq_nums for r in keep.results])
        best = dict(zip(seq.tolist(), nn.tolist(), strict=True))
        for b in keep.refined:
            best.update(zip(b.frames.seq_nums.tolist(), np.minimum(b.chi2_refined, b.chi2_nn).tolist(), strict=True))
        doubtful = nn > above
        best_arr = np.array([best[s] for s in seq.tolist()])
        z = stats["sinks"]["ZmqPublisherSink"]
        out[label] = {"seconds": seconds, "chi2_median_nn": float(np.median(nn)),
                      "chi2_median_best": float(np.median(best_arr)),
                      "doubtful_fraction": float(doubtful.mean()),
                      "doubtful_chi2_median_nn": float(np.median(nn[doubtful])) if doubtful.any() else None,
                      "doubtful_chi2_median_best": float(np.median(best_arr[doubtful])) if doubtful.any() else None,
                      "refined": stats["refined"], "zmq_latency_p50_ms": z["latency_p50_ms"],
                      "refiner_cpu_share": (stats["refined"]["busy_s"] / seconds) if stats["refined"] else 0.0,
                      "zmq_latency_p99_ms": z["latency_p99_ms"], "zmq_frames": z["frames_written"]}
    return out


def adaptation(model_name: str, *, n: int = 2000, rate: float = 100.0, quick: bool = False) -> dict:
    """One hollow (ring) crystal, a type the model was not trained on, its strain growing over
    ``n`` frames at ``rate`` frames/s, through the callback with live adaptation on."""
    n = 400 if quick else n
    crystal = OperandoCrystal(32, seed=1, recipe="ring")
    states = [crystal.state(s) for s in np.linspace(0, 0.2, n)]
    clean = diffraction_intensity(np.stack([a for a, _ in states]), np.stack([p for _, p in states]))
    rng = np.random.default_rng(0)
    frames = _frames_on_detector(rng.poisson(clean / clean.sum(axis=(1, 2), keepdims=True) * 1e6).astype(np.float32),
                                 64)
    model = load_model(model_name, device="cpu")
    base = model.predict(frames[:, 16:48, 16:48]).chi2
    keep, zmq_sink = _Keep(), ZmqPublisherSink("tcp://127.0.0.1:0")
    with tempfile.TemporaryDirectory(prefix="cdinn-adapt-") as tmp:
        cb = ReconstructionCallback(model=model, sinks=[zmq_sink, keep],
                                    adapt={"out_dir": tmp, "min_frames": 256, "every": 256, "steps": 40})
        seconds = _feed(cb, frames, rate)
        stats = cb.stats()
        cb.close()
    zmq_sink.close()
    chi2 = np.concatenate([r.chi2 for r in keep.results])
    versions = np.concatenate([[r.model_version] * len(r.frames) for r in keep.results])
    last = versions == versions.max()
    return {"frames": n, "rate": rate, "seconds": seconds, "swaps": stats["adapted"]["swaps"],
            "first_swap_frame": int(np.argmax(versions > 0)) + 1 if versions.max() else None,
            "rounds": [{k: h[k] for k in ("seconds", "held_out_chi2_median_before", "held_out_chi2_median_after",
                                          "swapped")} for h in stats["adapted"]["history"]],
            "chi2_median_run_without": float(np.median(base)), "chi2_median_run_with": float(np.median(chi2)),
            "last_version_frames": int(last.sum()),
            "chi2_median_last_version_without": float(np.median(base[last])),
            "chi2_median_last_version_with": float(np.median(chi2[last])),
            "zmq_latency_p99_ms": stats["sinks"]["ZmqPublisherSink"]["latency_p99_ms"],
            "frames_out": stats["frames_out"]}


def run(model_name: str, *, quick: bool = False) -> dict:
    """All four parts."""
    return {"chi2_cost": chi2_cost(model_name, quick=quick), "windows": windows(model_name, quick=quick),
            "auto_refine": auto_refine(model_name, quick=quick), "adaptation": adaptation(model_name, quick=quick)}


def table(r: dict) -> list[str]:
    """Markdown lines."""
    lines = ["## Trust: chi^2 per frame, self-repair, adaptation (issue 17)", "",
             "chi^2 of every frame next to the model (batch 256, data in memory, this machine's threads):", "",
             "| model | precision | network us / frame | chi^2 us / frame | chi^2 / network |", "|---|---|---|---|---|"]
    for row in r["chi2_cost"]:
        if "error" in row:
            lines.append(f"| {row['model']} | not run: {row['error']} | | | |")
        else:
            lines.append(f"| {row['model']} | {row['precision']} | {row['network_us']:.2f} | {row['chi2_us']:.2f} | "
                         f"{row['ratio']:.2f} |")
    w = r["windows"]
    lines += ["", f"Refinement windows: {w['patterns']} patterns per recipe, sampled twice as finely as the model "
                  f"needs (the model sees them 2x2-binned); NN + {w['refine_iterations']} ER/HIO iterations, against "
                  f"{w['erhio_iterations']}-iteration ER/HIO from a random start (medians; chi^2 against each "
                  "method's own pattern):", "",
              "| recipe | method | ms / pattern | chi^2 | support IoU | phase RMSE (rad) | strain RMSE (rad) |",
              "|---|---|---|---|---|---|---|"]
    for recipe in ("paper", "crystal"):
        for method, m in w[recipe].items():
            lines.append(f"| {recipe} | {method} | {m['ms_per_pattern']:.2f} | {m['chi2']:.4f} | "
                         f"{m['support_iou']:.3f} "
                         f"| {m['phase_rmse']:.3f} | {m['strain_rmse']:.3f} |")
    a = r["auto_refine"]
    lines += ["", f"Automatic refinement, live: {a['frames']} crystal-recipe frames at {a['rate']:g} frames/s through "
                  f"the callback (ZeroMQ sink), refine_above={a['above']:g} (medians; 'best': the refined chi^2 "
                  "where a "
                  "frame was refined):", "",
              "| budget | frames refined | over budget | refiner's CPU share | chi^2 NN, all | chi^2 best, all | "
              "doubtful frames | chi^2 NN, doubtful | chi^2 best, doubtful | ZeroMQ latency p50 / p99 (ms) |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for label, m in a.items():
        if not isinstance(m, dict):
            continue
        refined = m["refined"] or {"frames": 0, "over_budget": 0}
        dn, db = m["doubtful_chi2_median_nn"], m["doubtful_chi2_median_best"]
        lines.append(f"| {label} | {refined['frames']} | {refined['over_budget']} | {m['refiner_cpu_share']:.0%} | "
                     f"{m['chi2_median_nn']:.4f} | "
                     f"{m['chi2_median_best']:.4f} | {m['doubtful_fraction']:.0%} | "
                     f"{'' if dn is None else f'{dn:.4f}'} | {'' if db is None else f'{db:.4f}'} | "
                     f"{m['zmq_latency_p50_ms']:.1f} / {m['zmq_latency_p99_ms']:.1f} |")
    d = r["adaptation"]
    lines += ["", f"Live adaptation: {d['frames']} frames of one hollow crystal (a type the model was not trained on) "
                  f"at {d['rate']:g} frames/s: {d['swaps']} swaps, the first at frame {d['first_swap_frame']}; rounds "
                  f"(s, swapped): {[(h['seconds'], h['swapped']) for h in d['rounds']]}.", "",
              "| frames | chi^2 median, model alone | chi^2 median, adapting live | ratio |", "|---|---|---|---|",
              f"| the whole run | {d['chi2_median_run_without']:.4f} | {d['chi2_median_run_with']:.4f} | "
              f"{d['chi2_median_run_without'] / d['chi2_median_run_with']:.1f}x |",
              f"| made by the last version ({d['last_version_frames']}) | "
              f"{d['chi2_median_last_version_without']:.4f} | "
              f"{d['chi2_median_last_version_with']:.4f} | "
              f"{d['chi2_median_last_version_without'] / d['chi2_median_last_version_with']:.1f}x |"]
    return lines
