"""Where a model is right and wrong on the crystal recipe: an evaluation's per-frame metrics
split by what the crystals are (docs/design.md section 16).

    python docs/experiments/crystal_breakdown.py EVALUATION_DIR [EVALUATION_DIR ...]

Each folder is a ``cdinn-stream evaluate --recipe crystal`` output (its ``per_frame.json``); the
crystals are simulated again from the report's seed. Prints one markdown table per folder:
medians of IoU, chi^2 and phase RMSE with the ramp removed for each method, by the crystal's
strain (RMS of its strain view), by whether it holds a dislocation, and by how much of the field
it spans.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from cdinn_stream.core.physics import SUPPORT_THRESHOLD, wrap
from cdinn_stream.core.simulate import simulate


def _vortices(phase: np.ndarray, amplitude: np.ndarray) -> np.ndarray:
    """Whether each object's phase winds around some 2x2 plaquette well inside it."""
    inside = amplitude > 0.3
    loop = (wrap(phase[:, :-1, 1:] - phase[:, :-1, :-1]) + wrap(phase[:, 1:, 1:] - phase[:, :-1, 1:])
            + wrap(phase[:, 1:, :-1] - phase[:, 1:, 1:]) + wrap(phase[:, :-1, :-1] - phase[:, 1:, :-1]))
    ok = inside[:, :-1, :-1] & inside[:, 1:, 1:] & inside[:, :-1, 1:] & inside[:, 1:, :-1]
    return ((np.abs(np.rint(loop / (2 * np.pi))) > 0) & ok).any(axis=(1, 2))


def groups(report: dict) -> dict[str, np.ndarray]:
    """Boolean masks over the evaluation's crystals, by name."""
    data = simulate(report["n"], report["size"], seed=report["seed"], recipe="crystal")
    support = data.amplitude > SUPPORT_THRESHOLD
    strain = data.strain
    rms = np.array([s[m].std() for s, m in zip(strain, support, strict=True)])
    extent = np.array([max(np.ptp(np.nonzero(m)[0]), np.ptp(np.nonzero(m)[1])) + 1 for m in support]) / report["size"]
    vortex = _vortices(data.phase, data.amplitude)
    return {"all": np.ones(len(rms), bool),
            "strain RMS < 0.1 rad": rms < 0.1, "strain RMS 0.1-0.3 rad": (rms >= 0.1) & (rms < 0.3),
            "strain RMS >= 0.3 rad": rms >= 0.3,
            "no dislocation": ~vortex, "a dislocation": vortex,
            "spans < 60 % of the field": extent < 0.6, "spans >= 60 %": extent >= 0.6}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("evaluations", nargs="+")
    args = ap.parse_args()
    for folder in args.evaluations:
        report = json.loads((Path(folder) / "report.json").read_text())
        per_frame = json.loads((Path(folder) / "per_frame.json").read_text())
        masks = groups(report)
        print(f"\n`{report['model']}` ({folder}), medians: IoU / chi2 / phase RMSE with the ramp removed (rad)\n")
        methods = list(per_frame)
        print("| crystals | n | " + " | ".join(methods) + " |")
        print("|---|---|" + "---|" * len(methods))
        for name, mask in masks.items():
            cells = []
            for method in methods:
                m = {k: np.asarray(v)[mask] for k, v in per_frame[method].items()}
                cells.append(f"{np.median(m['support_iou']):.3f} / {np.median(m['chi2']):.4f} / "
                             f"{np.median(m['strain_rmse']):.3f}")
            print(f"| {name} | {int(mask.sum())} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
