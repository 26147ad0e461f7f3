"""Where should the crop centre? Brightest blob against the centre of mass (docs/design.md section 16).

Runs a model on the same patterns centred by three rules before the network, the ramp of the
whole-pixel shift put back after it (as ``CDIModel.predict_tensor`` does), and scores the results:

* ``none``: the pattern as given (the peak wherever the crystal's ramp put it);
* ``brightest``: the brightest 3x3 blob on ``N // 2`` (``peak_offsets(window=0)``);
* ``com``: the rounded intensity-weighted centre of mass of the 7x7 pixels around that blob
  (``peak_offsets(window=3)``, the rule the package uses everywhere).

Usage: ``python docs/experiments/centring.py MODEL [-n 1000] [--seed 20261128]`` (the default seed
is the model-selection seed, not an evaluation seed). Prints a markdown table.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from cdinn_stream import load_model, score, simulate
from cdinn_stream.core.physics import normalized_amplitude, peak_offsets, ramp, roll_frames, wrap

RULES = {"none": None, "brightest": 0, "com": 3}


def predict(model, intensity: np.ndarray, window: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Amplitude and phase with the pattern centred by ``window`` (``None``: not centred)."""
    model.centre = False  # centre here, by the rule under test
    x = normalized_amplitude(torch.from_numpy(intensity))
    shifts = torch.zeros((len(x), 2), dtype=torch.long) if window is None else peak_offsets(x.square(), window=window)
    amp, phase = model.predict_tensor(roll_frames(x, -shifts))
    phase = wrap(phase.float() + ramp(shifts, model.size))
    return amp.float().numpy(), phase.numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("-n", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=20261128)
    args = parser.parse_args()
    model = load_model(args.model, device="cpu")
    print("| recipe | centring | moved (share of patterns) | IoU | chi2 | phase RMSE | phase RMSE, ramp removed |")
    print("|---|---|---|---|---|---|---|")
    for recipe in ("paper", "crystal"):
        data = simulate(args.n, model.size, seed=args.seed, recipe=recipe)
        for rule, window in RULES.items():
            moved = 0.0 if window is None else float(
                (peak_offsets(data.intensity, window=window) != 0).any(dim=1).float().mean())
            amp, phase = predict(model, data.intensity, window)
            m = {k: float(np.median(v)) for k, v in score(amp, phase, data.amplitude, data.phase,
                                                           data.intensity).items()}
            print(f"| {recipe} | {rule} | {moved:.2f} | {m['support_iou']:.3f} | {m['chi2']:.4f} | "
                  f"{m['phase_rmse']:.3f} | {m['strain_rmse']:.3f} |")


if __name__ == "__main__":
    main()
