"""Speed benchmarks behind ``cdinn-stream bench`` (results: ``benchmarks/results``).

Every figure of a run is measured in that one run on one machine, so its ratios hold even on
shared machines. Suites (``--suite``):

* ``simulate``: seconds to generate 200,000 paper-recipe samples at 32x32.
* ``model`` (:mod:`benchmarks.model`): frames/s and latency per batch size (1 ... 1024) at 32x32
  and 64x64, in fp32 and bf16, with the achieved FLOP/s against a measured matmul peak.
* ``erhio`` (:mod:`benchmarks.erhio`): 620-iteration ER/HIO single and batched, the NN speed-up,
  and cohere-core's ER/HIO side by side on the same patterns (time and accuracy).
* ``pipeline`` (:mod:`benchmarks.pipeline`): documents in -> ZeroMQ and Tiled out: frames/s
  against the bare model, latency at 100 frames/s offered, memory over 100,000 frames.
* ``trust`` (:mod:`benchmarks.trust`): the per-frame chi^2's cost against the network's,
  refinement on the model's window and on a window twice as wide against 620-iteration ER/HIO,
  automatic refinement of doubtful frames in a live run, live adaptation to an unseen crystal type.
* ``observables`` (:mod:`benchmarks.observables`): what the per-frame observables add to the
  engine's step, against the network's time.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from tqdm.auto import tqdm

from cdinn_stream.core.simulate import simulate
from cdinn_stream.core.timing import machine_info

from . import detector, erhio, model, observables, pipeline, scale, trust

SUITES = ("simulate", "model", "erhio", "pipeline", "trust", "detector", "observables", "scale")
#: what runs when no suite is named (trust takes about 5 minutes more on 2 cores)
DEFAULT_SUITES = ("simulate", "model", "erhio", "pipeline")

__all__ = ["SUITES", "run_benchmarks", "bench_table"]


def run_benchmarks(out_dir: str | Path, *, model_name: str = "cdinn-32",
                   models: tuple[str, ...] = ("cdinn-32", "cdinn-64"),
                   suites: tuple[str, ...] = DEFAULT_SUITES, n: int = 1024, quick: bool = False,
                   device: str = "cpu") -> dict:
    """Run ``suites``; write ``bench.json`` and ``bench.md`` to ``out_dir``; return the results.

    ``device="cuda"`` runs the model suite (with CUDA graphs too) and the pipeline suite on the GPU."""
    unknown = set(suites) - set(SUITES)
    if unknown:
        raise ValueError(f"unknown suites {sorted(unknown)}; choose from {SUITES}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {"machine": machine_info(), "default_model": model_name, "quick": quick, "device": device,
                     "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if "simulate" in suites:
        n_sim = 4096 if quick else 200_000
        t = time.perf_counter()
        with tqdm(total=n_sim, desc="simulate", unit="sample", leave=False) as bar:
            simulate(n_sim, 32, seed=1, progress=bar.update)
        results["simulate"] = {"samples": n_sim, "size": 32, "seconds": time.perf_counter() - t}
    if "model" in suites:
        results["model"] = model.run(list(models), quick=quick, device=device, cuda_graphs=device != "cpu")
    if "erhio" in suites:
        results["erhio"] = erhio.run(model_name, n=n, quick=quick)
    if "pipeline" in suites:
        results["pipeline"] = pipeline.run(model_name, quick=quick, device=device)
    if "trust" in suites:
        results["trust"] = trust.run(model_name, quick=quick)
    if "detector" in suites:
        results["detector"] = detector.run(model_name, quick=quick)
    if "scale" in suites:
        results["scale"] = scale.run(model_name, quick=quick)
    if "observables" in suites:
        results["observables"] = observables.run(model_name, quick=quick)
    (out / "bench.json").write_text(json.dumps(results, indent=1))
    (out / "bench.md").write_text(bench_table(results))
    return results


def _best_nn_us(results: dict) -> dict[str, float]:
    """The default model's best microseconds per frame (through ``predict``) by precision (int8:
    its int8 sibling, ``<name>-int8``)."""
    name = Path(results["default_model"]).stem
    rows = [r for r in results.get("model", {}).get("rows", []) if r["model"] in (name, f"{name}-int8")]
    best: dict[str, float] = {}
    for r in rows:
        key = r["precision"] if r["model"] == name else f"{r['precision']} ({r['model']})"
        best[key] = min(best.get(key, float("inf")), r["us_per_frame"])
    return best


def bench_table(r: dict) -> str:
    """Markdown summary of :func:`run_benchmarks` results."""
    m = r["machine"]
    lines = ["# cdinn-stream benchmarks", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch threads, torch {m['torch']}, "
             f"GPU: {m['cuda'] or 'none'}. Run {r['date']}{' (quick)' if r['quick'] else ''}.", ""]
    if "simulate" in r:
        s = r["simulate"]
        lines += [f"Simulator: {s['samples']} samples at {s['size']}x{s['size']} in {s['seconds']:.1f} s.", ""]
    if "model" in r:
        lines += model.table(r["model"]) + [""]
    if "erhio" in r:
        lines += erhio.table(r["erhio"], _best_nn_us(r)) + [""]
    if "pipeline" in r:
        lines += pipeline.table(r["pipeline"]) + [""]
    if "trust" in r:
        lines += trust.table(r["trust"]) + [""]
    if "detector" in r:
        lines += detector.table(r["detector"]) + [""]
    if "scale" in r:
        lines += scale.table(r["scale"]) + [""]
    if "observables" in r:
        lines += observables.table(r["observables"]) + [""]
    return "\n".join(lines)
