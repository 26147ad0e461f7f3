"""Evaluation of a model on fresh simulated samples, against 620-iteration ER/HIO.

:func:`evaluate` simulates ``n`` new samples (a seed not used in training), or reads them from a
labelled data file, reconstructs them with the network and with ER/HIO (on the 2x oversampled
patterns of the same objects, as in the paper), optionally with NN-seeded ER/HIO refinement, and
writes ``report.json``, ``report.md`` and the figures ``examples.png`` (Fig. 3), ``best.png``
(Fig. 4) and ``worst.png`` (Fig. 5). Timings of both methods are measured in the same run on the
same machine. The report records the sha256 of the weights file evaluated (``weights_sha256``):
``cdinn-stream publish`` checks it against the weights it publishes.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..core.metrics import chi2, score
from ..core.phase_retrieval import CHUNK as ERHIO_CHUNK
from ..core.phase_retrieval import ITERATIONS, er_hio
from ..core.physics import far_field, strain
from ..core.simulate import SimulatedSet, diffraction_intensity, simulate
from ..core.timing import machine_info, time_call
from ..nn.reconstruct import CDIModel
from .plots import plot_chi2_extremes, plot_examples
from .train import output_folder, read_labelled

__all__ = ["evaluate", "weights_sha256", "noise_sweep", "offset_sweep", "summarize", "report_table", "eval_seed",
           "EVAL_SEED", "CRYSTAL_EVAL_SEED",
           "PHOTON_DECADES", "CRYSTAL_PHOTON_DECADES", "OFFSETS"]

#: Photons per frame of the noise sweep (one per decade).
PHOTON_DECADES = (1e4, 1e5, 1e6, 1e7)
#: Photons per frame of the crystal recipe's noise sweep (its whole range, one per decade).
CRYSTAL_PHOTON_DECADES = (1e3, 1e4, 1e5, 1e6, 1e7, 1e8)
#: Bragg-peak offsets (pixels off the window's centre) of the offset sweep.
OFFSETS = (0.0, 0.5, 1.0, 2.0)

#: Seed of the evaluation set: never used in training (seed 0) or in choosing models (20251125, 777, 4242).
EVAL_SEED = 31_415_926
#: Seed of the crystal recipe's evaluation set: never trained on or used to choose a model (training
#: seeds draw crystals with ``seed + 7919``; selection uses 20261128).
CRYSTAL_EVAL_SEED = 27_182_818


def weights_sha256(path: str | Path) -> str:
    """The sha256 (hex) of a weights file: what an evaluation report says it evaluated."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _labelled(path: str | Path, n: int | None, size: int) -> SimulatedSet:
    """The first ``n`` samples (default: up to 1,000) of a labelled data file, checked against the model's size."""
    arrays = read_labelled(path, purpose="evaluation")
    count, shape = len(arrays["intensity"]), tuple(arrays["intensity"].shape[1:])
    if shape != (size, size):
        raise ValueError(f"{path} holds {shape} frames, but the model takes {size}x{size}")
    n = min(count, 1000) if n is None else n
    if not 0 < n <= count:
        raise ValueError(f"{path} holds {count} samples; -n (n) asks for {n}")
    return SimulatedSet(*(np.array(arrays[k][:n], dtype=np.float32) for k in ("intensity", "amplitude", "phase")))


def eval_seed(recipe: str) -> int:
    """The evaluation seed of ``recipe``."""
    return CRYSTAL_EVAL_SEED if recipe == "crystal" else EVAL_SEED


def summarize(metrics: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """Median and 90th percentile of each per-frame metric."""
    return {k: {"median": float(np.median(v)), "p90": float(np.percentile(v, 90)),
                "mean": float(np.mean(v))} for k, v in metrics.items()}


def _time_nn(model: CDIModel, intensity: np.ndarray) -> tuple[object, float, float]:
    rec = model.predict(intensity)
    batched = time_call(lambda: model.predict(intensity), repeat=5, min_seconds=0.2) / len(intensity)
    singles = []
    for i in range(min(100, len(intensity))):
        t = time.perf_counter()
        model.predict(intensity[i])
        singles.append(time.perf_counter() - t)
    return rec, batched, float(np.median(singles))


def noise_sweep(model: CDIModel, photons: tuple[float, ...] = PHOTON_DECADES, *, n: int = 1000,
                seed: int | None = None, recipe: str = "paper") -> dict[str, dict]:
    """The NN on the same ``n`` crystals, noise-free and with Poisson noise at each photon count.

    Accuracy is scored against the truth: ``chi2`` against the noise-free pattern, support IoU
    and phase RMSE against the object; ``chi2_measured`` is against the noisy pattern the network
    saw (it includes the noise itself). Keys: ``"clean"`` and ``f"{photons:g}"``. For the crystal
    recipe, each noisy set also has the recipe's detector effects (gaps, hot pixels, ...).
    ``seed``: default the recipe's evaluation seed.
    """
    seed = eval_seed(recipe) if seed is None else seed
    clean = simulate(n, model.size, seed=seed, recipe=recipe)
    out: dict[str, dict] = {}
    for level in (None, *photons):
        noisy = clean if level is None else simulate(n, model.size, seed=seed, photons=level, recipe=recipe)
        rec = model.predict(noisy.intensity)
        m = score(rec.amplitude, rec.phase, clean.amplitude, clean.phase, clean.intensity)
        m["chi2_measured"] = chi2(rec.amplitude, rec.phase, noisy.intensity).numpy()
        out["clean" if level is None else f"{level:g}"] = summarize(m)
    return out


def offset_sweep(model: CDIModel, offsets: tuple[float, ...] = OFFSETS, *, n: int = 1000, seed: int | None = None,
                 recipe: str = "paper") -> dict[str, dict]:
    """The NN on the same ``n`` noise-free crystals with the Bragg peak ``offset`` pixels off the
    window's centre (in a random direction: a linear phase ramp across each object). Keys:
    ``f"{offset:g}"``; each holds the medians of :func:`summarize`. ``seed``: default the recipe's
    evaluation seed."""
    seed = eval_seed(recipe) if seed is None else seed
    out: dict[str, dict] = {}
    for offset in offsets:
        data = simulate(n, model.size, seed=seed, recipe=recipe, offset=float(offset))
        rec = model.predict(data.intensity)
        out[f"{offset:g}"] = summarize(score(rec.amplitude, rec.phase, data.amplitude, data.phase, data.intensity))
    return out


def evaluate(model: CDIModel, out_dir: str | Path, *, n: int | None = None, seed: int | None = None,
             photons: float | None = None, erhio: bool = True, erhio_iterations: int = ITERATIONS,
             refine_iterations: int = 100, noise: tuple[float, ...] | None = None, recipe: str = "paper",
             offsets: tuple[float, ...] | None = None, weights: str | Path | None = None,
             data: str | Path | None = None) -> dict:
    """Evaluate ``model`` on ``n`` fresh samples of ``recipe``; write the report and figures to ``out_dir``.

    ``n``: default 1,000. ``seed``: default the recipe's evaluation seed (:data:`EVAL_SEED`,
    :data:`CRYSTAL_EVAL_SEED`). ``noise``: photon counts per frame for a :func:`noise_sweep` of the
    NN (in the report under ``"noise"``); ``offsets``: Bragg-peak offsets for an :func:`offset_sweep`
    (under ``"offsets"``); both simulate their samples. ``weights``: the file ``model`` was loaded
    from; its sha256 goes into the report (``weights_sha256``), which ``publish`` requires.
    ``data``: score the first ``n`` samples (default: up to 1,000) of this labelled data set (an
    ``.npz`` or a folder of ``intensity``/``amplitude``/``phase`` ``.npy``, as ``train`` reads)
    instead of simulating them; ER/HIO then gets the noise-free 2x oversampled patterns of its
    labelled objects. A run that fails before writing leaves no empty ``out_dir``."""
    if data is not None and photons is not None:
        raise ValueError("photons adds simulated noise: with data the patterns are scored as the file has them")
    size = model.size
    seed = eval_seed(recipe) if seed is None else seed
    if data is not None:
        samples = _labelled(data, n, size)
        n = len(samples)
    else:
        n = 1000 if n is None else n
        samples = simulate(n, size, seed=seed, photons=photons, recipe=recipe)
    with output_folder(out_dir) as out:
        return _evaluate(model, out, samples, seed=seed, photons=photons, erhio=erhio,
                         erhio_iterations=erhio_iterations, refine_iterations=refine_iterations, noise=noise,
                         recipe=recipe, offsets=offsets, weights=weights, data_path=data)


def _evaluate(model: CDIModel, out: Path, data: SimulatedSet, *, seed: int, photons: float | None, erhio: bool,
              erhio_iterations: int, refine_iterations: int, noise: tuple[float, ...] | None, recipe: str,
              offsets: tuple[float, ...] | None, weights: str | Path | None, data_path: str | Path | None) -> dict:
    n, size = len(data), model.size
    report: dict = {"model": model.name, "precision": model.precision, "views": model.views, "n": n, "seed": seed,
                    "size": size, "recipe": recipe, "centre": getattr(model, "centre", False),
                    "photons": photons, "machine": machine_info(), "methods": {}}
    if weights is not None:
        report.update(weights=str(weights), weights_sha256=weights_sha256(weights))
    if data_path is not None:
        report["data"] = str(data_path)

    rec, nn_batched, nn_single = _time_nn(model, data.intensity)
    nn = score(rec.amplitude, rec.phase, data.amplitude, data.phase, data.intensity)
    report["methods"]["nn"] = {"metrics": summarize(nn), "ms_per_pattern_batched": nn_batched * 1e3,
                               "ms_per_pattern_single": nn_single * 1e3}
    per_frame = {"nn": {k: v.tolist() for k, v in nn.items()}}

    pr = None
    if erhio:
        if data_path is None:
            padded = simulate(n, size, seed=seed, photons=photons, pad=2, recipe=recipe).intensity
        else:  # the labelled objects' oversampled patterns (noise-free)
            padded = diffraction_intensity(data.amplitude, data.phase, pad=2)
            report["erhio_input"] = "noise-free 2x oversampled patterns of the data's labelled objects"
        chunks = -(-n // ERHIO_CHUNK)  # er_hio reports each chunk's iterations
        with tqdm(total=erhio_iterations * chunks, desc=f"ER/HIO x{n}", unit="it", leave=False) as bar:
            t = time.perf_counter()
            pr = er_hio(padded, iterations=erhio_iterations, progress=bar.update)
            pr_batched = (time.perf_counter() - t) / n
        t = time.perf_counter()
        for i in range(3):
            er_hio(padded[i], iterations=erhio_iterations)
        pr_single = (time.perf_counter() - t) / 3
        m = score(pr.abs(), pr.angle(), data.amplitude, data.phase, padded)
        report["methods"]["erhio"] = {"metrics": summarize(m), "iterations": erhio_iterations,
                                      "ms_per_pattern_batched": pr_batched * 1e3,
                                      "ms_per_pattern_single": pr_single * 1e3}
        per_frame["erhio"] = {k: v.tolist() for k, v in m.items()}
        if refine_iterations:
            t = time.perf_counter()
            seeded = er_hio(padded, iterations=refine_iterations, init=torch.from_numpy(rec.complex))
            ref_batched = (time.perf_counter() - t) / n + nn_batched
            r = score(seeded.abs(), seeded.angle(), data.amplitude, data.phase, padded)
            report["methods"]["nn+refine"] = {"metrics": summarize(r), "iterations": refine_iterations,
                                              "ms_per_pattern_batched": ref_batched * 1e3}
            per_frame["nn+refine"] = {k: v.tolist() for k, v in r.items()}
        report["speedup_nn_vs_erhio"] = {
            "batched": pr_batched / nn_batched,
            "single": pr_single / nn_single,
            "best_vs_best": min(pr_batched, pr_single) / min(nn_batched, nn_single),
        }

    if noise:
        report["noise"] = noise_sweep(model, tuple(noise), n=n, seed=seed, recipe=recipe)
    if offsets:
        report["offsets"] = offset_sweep(model, tuple(offsets), n=n, seed=seed, recipe=recipe)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    (out / "per_frame.json").write_text(json.dumps(per_frame))
    (out / "report.md").write_text(report_table(report))
    predicted_intensity = np.abs(far_field(rec.complex)) ** 2
    scale = (np.sqrt(predicted_intensity) * np.sqrt(data.intensity)).sum((1, 2)) / predicted_intensity.sum((1, 2))
    predicted_intensity *= scale[:, None, None] ** 2
    pr_amp = pr_phase = None
    if pr is not None:
        b = (pr.shape[-1] - size) // 2
        crop = pr[:, b : b + size, b : b + size]
        pr_amp, pr_phase = crop.abs().numpy(), crop.angle().numpy() * (
            crop.abs().numpy() > 0.1 * crop.abs().amax(dim=(1, 2), keepdim=True).numpy())
    true_phase, nn_phase, label = data.phase, rec.phase, "phase"
    if recipe == "crystal":  # the off-centre peaks' ramps would hide the strain: show the strain views
        true_phase, nn_phase, label = data.strain, rec.strain, "strain"
        pr_phase = None if pr_amp is None else strain(pr_amp, pr_phase)
    plot_examples(out / "examples.png", data.intensity, data.amplitude, true_phase, rec.amplitude, nn_phase,
                  pr_amp, pr_phase, phase_label=label)
    for worst, name in ((False, "best.png"), (True, "worst.png")):
        plot_chi2_extremes(out / name, nn["chi2"], data.intensity, predicted_intensity, data.amplitude,
                           rec.amplitude, true_phase, nn_phase, worst=worst, phase_label=label)
    return report


def report_table(report: dict) -> str:
    """The NN vs ER/HIO table of a report, as markdown."""
    if report.get("data"):
        source = f"{report['size']}x{report['size']} samples of {report['data']} ("
    else:
        source = (f"fresh {report['size']}x{report['size']} samples of the {report.get('recipe', 'paper')} recipe "
                  f"(seed {report['seed']}, photons {report['photons']}, ")
    lines = [f"Model `{report['model']}` on {report['n']} {source}precision {report.get('precision', 'fp32')}, "
             f"{report.get('views', 1)} symmetry view(s) per pattern); "
             f"machine: {report['machine']['cpu']}, "
             f"{report['machine']['torch_threads']} torch threads.", "",
             "| method | IoU median | IoU p90 | chi2 median | chi2 p90 | phase RMSE median (rad) | phase RMSE p90 "
             "| phase RMSE, ramp removed, median | ms/pattern (batched) | ms/pattern (single) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, m in report["methods"].items():
        s = m["metrics"]
        single = m.get("ms_per_pattern_single")
        lines.append(
            f"| {name} | {s['support_iou']['median']:.3f} | {s['support_iou']['p90']:.3f} | "
            f"{s['chi2']['median']:.4f} | {s['chi2']['p90']:.4f} | {s['phase_rmse']['median']:.3f} | "
            f"{s['phase_rmse']['p90']:.3f} | {_median(s, 'strain_rmse')} | {m['ms_per_pattern_batched']:.4f} | "
            f"{'' if single is None else f'{single:.4f}'} |")
    if "speedup_nn_vs_erhio" in report:
        sp = report["speedup_nn_vs_erhio"]
        lines += ["", f"NN speed-up over {report['methods']['erhio']['iterations']}-iteration ER/HIO: "
                  f"batched {sp['batched']:.0f}x, single pattern {sp['single']:.0f}x, "
                  f"best vs best {sp['best_vs_best']:.0f}x."]
    if "noise" in report:
        lines += ["", noise_table(report["noise"])]
    if "offsets" in report:
        lines += ["", offset_table(report["offsets"])]
    return "\n".join(lines) + "\n"


def _median(summary: dict, key: str) -> str:
    return f"{summary[key]['median']:.3f}" if key in summary else "-"


def _ratio_cells(m: dict, base: dict, keys: tuple[str, ...], *, plain: bool = False) -> list[str]:
    """Each metric's median and (unless ``plain``) its ratio to ``base``'s, as table cells."""
    cells = []
    for key in keys:
        if key not in m:
            cells.append("-")
            continue
        v, c = m[key]["median"], base[key]["median"]
        cells.append(f"{v:.4f}" if plain or not c > 0 else f"{v:.4f} ({v / c:.2f}x)")
    return cells


def offset_table(sweep: dict[str, dict]) -> str:
    """Markdown table of an :func:`offset_sweep`: medians and their ratio to the centred peak."""
    base = sweep.get("0", next(iter(sweep.values())))
    lines = ["NN accuracy against the Bragg peak's offset from the window's centre (noise-free; medians, ratio to "
             "the centred peak in brackets):", "",
             "| offset (px) | support IoU | chi2 | phase RMSE (rad) | phase RMSE, ramp removed |",
             "|---|---|---|---|---|"]
    for offset, m in sweep.items():
        cells = _ratio_cells(m, base, ("support_iou", "chi2", "phase_rmse", "strain_rmse"))
        lines.append(f"| {offset} | {' | '.join(cells)} |")
    return "\n".join(lines)


def noise_table(sweep: dict[str, dict]) -> str:
    """Markdown table of a :func:`noise_sweep`: medians and their ratio to the noise-free value."""
    clean = sweep["clean"]
    lines = ["NN accuracy against photons per frame (Poisson noise; medians, ratio to noise-free in brackets; chi2 "
             "against the noise-free pattern, chi2 measured against the noisy one):", "",
             "| photons / frame | support IoU | phase RMSE (rad) | chi2 | phase RMSE, ramp removed | chi2 measured |",
             "|---|---|---|---|---|---|"]
    for level, m in sweep.items():
        cells = _ratio_cells(m, clean, ("support_iou", "phase_rmse", "chi2", "strain_rmse"), plain=level == "clean")
        lines.append(f"| {level} | {' | '.join(cells)} | {m['chi2_measured']['median']:.4f} |")
    return "\n".join(lines)
