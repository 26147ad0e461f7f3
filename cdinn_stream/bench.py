"""Speed benchmarks behind ``cdinn-stream bench`` (results: ``benchmarks/results``).

Everything is measured in one run on one machine, so the ratios hold even on shared machines:

* ``simulate``: seconds to generate 200,000 paper-recipe samples at 32x32.
* ``throughput``: frames/s and latency of ``CDIModel.predict`` (input checks included) and of
  the bare network per batch size.
* ``erhio``: 620-iteration ER/HIO on the same patterns, one at a time and batched.
* ``speedup``: ER/HIO time per pattern over NN time per pattern.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from tqdm.auto import tqdm

from .phase_retrieval import ITERATIONS, er_hio
from .physics import normalized_amplitude
from .reconstruct import load_model
from .simulate import simulate
from .timing import machine_info, time_call

__all__ = ["run_benchmarks"]


def run_benchmarks(out_dir: str | Path, *, model: str = "cdinn-32", n: int = 1024, quick: bool = False) -> dict:
    """Run the benchmarks, write ``bench.json`` and ``bench.md`` to ``out_dir``; return the results."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cdi = load_model(model, device="cpu")
    size = cdi.size
    results: dict = {"machine": machine_info(), "model": cdi.name, "size": size}

    n_sim = 4096 if quick else 200_000
    t = time.perf_counter()
    with tqdm(total=n_sim, desc="simulate", unit="sample", leave=False) as bar:
        simulate(n_sim, 32, seed=1, progress=bar.update)
    results["simulate"] = {"samples": n_sim, "size": 32, "seconds": time.perf_counter() - t}

    frames = simulate(1024, size, seed=7).intensity
    prepared = normalized_amplitude(frames)
    rows = []
    for bs in (1, 8, 64, 256, 1024):
        x, xt = frames[:bs], prepared[:bs]
        sec = time_call(lambda: cdi.predict(x), repeat=3 if quick else 5)
        net = time_call(lambda: cdi.predict_tensor(xt), repeat=3 if quick else 5)
        rows.append({"batch": bs, "ms_per_batch": sec * 1e3, "frames_per_s": bs / sec, "us_per_frame": sec / bs * 1e6,
                     "network_us_per_frame": net / bs * 1e6})
    results["throughput"] = rows

    n_pr = 16 if quick else n
    iters = 62 if quick else ITERATIONS
    padded = simulate(n_pr, size, seed=7, pad=2).intensity
    t = time.perf_counter()
    for i in range(3):
        er_hio(padded[i], iterations=iters)
    single = (time.perf_counter() - t) / 3
    t = time.perf_counter()
    er_hio(padded, iterations=iters)
    batched = (time.perf_counter() - t) / n_pr
    results["erhio"] = {"iterations": iters, "patterns": n_pr, "ms_single": single * 1e3,
                        "ms_per_pattern_batched": batched * 1e3}
    nn_best = min(r["us_per_frame"] for r in rows) / 1e6  # the public API, checks included
    nn_single = rows[0]["us_per_frame"] / 1e6
    results["speedup"] = {"best_vs_best": min(single, batched) / nn_best, "single_vs_single": single / nn_single,
                          "batched_vs_batched": batched / nn_best}
    (out / "bench.json").write_text(json.dumps(results, indent=1))
    (out / "bench.md").write_text(bench_table(results))
    print(bench_table(results))
    return results


def bench_table(r: dict) -> str:
    """Markdown summary of :func:`run_benchmarks` results."""
    m = r["machine"]
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch threads, torch {m['torch']}.", "",
             f"Simulator: {r['simulate']['samples']} samples at 32x32 in {r['simulate']['seconds']:.1f} s.", "",
             f"Model `{r['model']}` ({r['size']}x{r['size']}), CPU:", "",
             "| batch | ms / batch | frames/s | us / frame | network alone, us / frame |", "|---|---|---|---|---|"]
    lines += [f"| {x['batch']} | {x['ms_per_batch']:.3f} | {x['frames_per_s']:.0f} | {x['us_per_frame']:.1f} | "
              f"{x['network_us_per_frame']:.1f} |" for x in r["throughput"]]
    e, s = r["erhio"], r["speedup"]
    lines += ["", f"ER/HIO ({e['iterations']} iterations, 2x oversampled): {e['ms_single']:.1f} ms for one pattern, "
              f"{e['ms_per_pattern_batched']:.2f} ms per pattern in a batch of {e['patterns']}.", "",
              f"NN (`predict`, input checks included) speed-up over ER/HIO: best vs best {s['best_vs_best']:.0f}x, single vs single {s['single_vs_single']:.0f}x, "
              f"batched vs batched {s['batched_vs_batched']:.0f}x."]
    return "\n".join(lines) + "\n"
