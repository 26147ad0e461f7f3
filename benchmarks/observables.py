"""Observables suite (issue 19): what the per-frame observables cost next to the model.

On the crystal recipe's patterns, centred on their Bragg peak as the live crop makes them, at the
engine's batch: the network alone; the trust figure (chi^2) as it was computed before the
observables (its own cosine and sine of the phase); and the engine's step now, the objects' planes
made once and shared by chi^2 and :func:`~cdinn_stream.core.observe.frame_observables`. The
observables' cost is the step's time less the old chi^2's (what they add per frame), and, for
reference, the observables call alone, compiled (the kernels compiled before timing) and eager
(where no compiler is at hand); each as a fraction of the network's time, in one run. The
network, chi^2, the step and the call take turns in each timing round (:func:`time_rounds`), and
differences and ratios are taken within a round, then the median: on a shared machine the load
changes between rounds.

And the IPython live view (:class:`~cdinn_stream.apps.liveview.LiveReconstructionView`) during a
scan at a 200 Hz detector pace, the RunEngine in its own thread and the GUI's timer played by the
main thread at 10 Hz (the figure rendered by Agg): its redraws a second, and the scan's time with
and without it.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import torch

from cdinn_stream.core.metrics import centred_planes, fourier_chi2
from cdinn_stream.core.observe import KERNELS, compile_observables, frame_observables, reference_objects
from cdinn_stream.core.physics import normalized_amplitude, peak_offsets, roll_frames
from cdinn_stream.core.simulate import diffraction_intensity, simulate
from cdinn_stream.core.timing import time_call, time_rounds
from cdinn_stream.lab.sim import OperandoCrystal, make_detector
from cdinn_stream.live.callback import ReconstructionCallback
from cdinn_stream.nn.reconstruct import load_model

__all__ = ["run", "table", "live_view"]


def run(model_name: str, *, batch: int = 256, quick: bool = False) -> dict:
    """Microseconds per frame of each part, per precision of ``model_name`` (and its int8 sibling)."""
    data = torch.as_tensor(simulate(batch, 32, seed=3, recipe="crystal", photons=1e6).intensity)
    crops = roll_frames(data, -peak_offsets(data))  # each on its Bragg peak, by the model's own rule
    x = normalized_amplitude(crops)
    origins = torch.zeros(batch, 2)
    timing = {"repeat": 3 if quick else 7, "min_seconds": 0.05 if quick else 0.3}
    rows = []
    for name in (model_name, f"{model_name}-int8"):
        try:
            m = load_model(name, device="cpu")
        except (ValueError, RuntimeError) as err:
            rows.append({"model": name, "error": str(err)})
            continue
        with torch.inference_mode():
            amp, phase = m.predict_tensor(x)
            reference = reference_objects(amp[:1], phase[:1])

            def step(amp=amp, phase=phase, reference=reference):  # the engine's, after the network
                amp, phase = amp.float(), phase.float()
                planes = centred_planes(amp, phase)
                fourier_chi2(amp, phase, x, planes=planes)
                frame_observables(amp, phase, crops, origins, reference=reference, planes=planes)

            planes = centred_planes(amp, phase)
            amp32, phase32 = amp.float(), phase.float()
            call = lambda a=amp32, p=phase32, r=reference, pl=planes: frame_observables(  # noqa: E731
                a, p, crops, origins, reference=r, planes=pl)  # (step() rewrites the planes with the same values)
            compiled = compile_observables(call)
            rounds = time_rounds({"network": lambda m=m: m.predict_tensor(x),
                                  "chi2_alone": lambda a=amp, p=phase: fourier_chi2(a, p, x),
                                  "step": step, "observables_call": call}, **timing)
            enabled = [kernel.enabled for kernel in KERNELS]
            for kernel in KERNELS:  # the same calls where no compiler is at hand (CDINN_COMPILE=0)
                kernel.enabled = False
            try:
                eager = time_call(call, **timing)
            finally:
                for kernel, on in zip(KERNELS, enabled, strict=True):
                    kernel.enabled = on
        per_frame = {k: v / batch * 1e6 for k, v in rounds.items()}  # microseconds a frame, a round each
        us = {f"{k}_us": float(np.median(v)) for k, v in per_frame.items()}
        us["observables_eager_us"] = eager / batch * 1e6
        # what they add to the step, and the ratios, within each round (the same load), then the median
        added = per_frame["step"] - per_frame["chi2_alone"]
        rows.append({"model": m.name, "precision": m.precision, "batch": batch, **us,
                     "observables_added_us": float(np.median(added)),
                     "added_ratio": float(np.median(added / per_frame["network"])),
                     "compiled": compiled,
                     "call_ratio": float(np.median(per_frame["observables_call"] / per_frame["network"])),
                     "eager_ratio": us["observables_eager_us"] / us["network_us"]})
    return {"rows": rows, "live_view": live_view(model_name, frames=300 if quick else 1200)}


def _timed_scan(model, frames: np.ndarray, delay: float, view=None) -> float:
    """Seconds a count of ``frames`` takes through the pipeline (RunEngine in its own thread; the
    view, if any, updated from this one by a 10 Hz periodic timer, as a GUI's), until all are out."""
    from bluesky import RunEngine
    from bluesky.plans import count

    source = iter(frames)
    cb = ReconstructionCallback(model=model, sinks=[] if view is None else [view])
    RE = RunEngine({}, context_managers=[])
    RE.subscribe(cb)
    scan = threading.Thread(target=RE, args=(count([make_detector(lambda: next(source))], num=len(frames),
                                                  delay=delay),))
    t0 = tick = time.monotonic()
    scan.start()
    while scan.is_alive():  # a periodic timer's ticks, every 0.1 s (one at once after a late redraw, as Qt's)
        if view is not None:
            view.update()
        tick = max(tick + 0.1, time.monotonic())
        time.sleep(max(0.0, tick - time.monotonic()))
    cb.flush(120)
    seconds = time.monotonic() - t0
    cb.close()
    return seconds


def live_view(model_name: str, *, frames: int = 1200, delay: float = 0.005) -> dict:
    """The live view's redraws a second during a scan, and the scan's seconds with and without it."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from cdinn_stream.apps.liveview import LiveReconstructionView

    crystal = OperandoCrystal(32, seed=3)
    rng = np.random.default_rng(0)
    stack = np.zeros((frames, 64, 64), np.float32)
    for i, s in enumerate(np.linspace(0, 1, frames)):
        amp, phase = crystal.state(s)
        stack[i, 16:48, 16:48] = rng.poisson(diffraction_intensity(amp[None], phase[None])[0] * 1e6 / 1024)
    model = load_model(model_name, device="cpu")
    without = _timed_scan(model, stack, delay)
    fig = Figure(figsize=(11, 6.5))
    FigureCanvasAgg(fig)
    view = LiveReconstructionView(fig=fig, rate=10)
    with_view = _timed_scan(model, stack, delay, view)
    times = np.array(view.redraw_times)
    during = times[times < times[0] + with_view - 0.5]
    return {"frames": frames, "detector_hz": 1 / delay, "redraws_per_s": (len(during) - 1) / (during[-1] - during[0]),
            "scan_s_without": without, "scan_s_with": with_view, "slowdown": with_view / without}


def table(r: dict) -> list[str]:
    """Markdown lines of :func:`run`'s results."""
    lines = ["### Observables per frame (crystal-recipe patterns, CPU, batch 256; microseconds a frame)", "",
             "| model | precision | network | chi^2 before | chi^2 + observables now | observables added | "
             "observables call alone | eager (no compiler) |",
             "|---|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        if "error" in row:
            lines.append(f"| {row['model']} | {row['error']} | | | | | | |")
            continue
        lines.append(f"| {row['model']} | {row['precision']} | {row['network_us']:.1f} | {row['chi2_alone_us']:.1f} | "
                     f"{row['step_us']:.1f} | {row['observables_added_us']:.1f} ({row['added_ratio']:.0%} of the "
                     f"network) | {row['observables_call_us']:.1f} ({row['call_ratio']:.0%}) | "
                     f"{row['observables_eager_us']:.1f} ({row['eager_ratio']:.0%}) |")
    v = r.get("live_view")
    if v:
        lines += ["", f"IPython live view (Agg, redrawn from a 10 Hz timer) during a {v['frames']}-frame scan at "
                      f"{v['detector_hz']:.0f} Hz: **{v['redraws_per_s']:.1f} redraws a second**; the scan took "
                      f"{v['scan_s_with']:.2f} s with it, {v['scan_s_without']:.2f} s without ({v['slowdown']:.2f}x)."]
    return lines
