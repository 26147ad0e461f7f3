"""Post-training int8 form of a float network (:func:`cdinn_stream.nn.int8.quantize`), calibrated on
the patterns it will see: both recipes, noisy, centred as ``CDIModel`` centres them.

    python docs/experiments/int8_ptq.py models/cdinn-32.pt --out cdinn-32-int8.pt [--frames 4096]

then ``cdinn-stream evaluate --model cdinn-32-int8.pt`` (both recipes) and
``cdinn_stream.lab.card.publish_int8``. Prints the calibration's recipe as JSON (the card's stage).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from cdinn_stream.core.crystal import PHOTONS
from cdinn_stream.core.physics import normalized_amplitude, peak_offsets, roll_frames
from cdinn_stream.core.simulate import simulate
from cdinn_stream.nn.int8 import quantize, save_int8_weights
from cdinn_stream.nn.weights import read_weights

#: Seed of the calibration frames (neither an evaluation nor the model-selection seed).
CALIBRATION_SEED = 97


def calibration_frames(n: int, size: int, *, centred: bool) -> torch.Tensor:
    """``(n, 1, N, N)`` normalised amplitudes: half paper recipe (1e4-1e7 photons), half crystal
    recipe (its detector, 1e3-1e8 photons), centred on the Bragg peak when the network is."""
    paper = simulate(n // 2, size, seed=CALIBRATION_SEED, photons=(1e4, 1e7), background=0.2).intensity
    crystal = simulate(n - n // 2, size, seed=CALIBRATION_SEED, photons=PHOTONS, recipe="crystal").intensity
    x = normalized_amplitude(torch.from_numpy(np.concatenate([paper, crystal])))
    if centred:
        x = roll_frames(x, -peak_offsets(x.square()))
    return x[:, None]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("weights")
    ap.add_argument("--out", required=True)
    ap.add_argument("--frames", type=int, default=4096)
    args = ap.parse_args()
    t0 = time.monotonic()
    network = read_weights(args.weights)
    x = calibration_frames(args.frames, network.config.size, centred=network.config.centred_input)
    int8 = quantize(network, x)
    save_int8_weights(int8, args.out, meta={"source": args.weights, "calibration_frames": args.frames})
    stage = {"recipe": {"method": "post-training quantization (cdinn_stream.nn.int8.quantize)", "source": args.weights,
                        "calibration_frames": args.frames, "calibration_seed": CALIBRATION_SEED,
                        "calibration_data": "half paper recipe (1e4-1e7 photons, background 0.2), half crystal "
                                            "recipe (its detector, 1e3-1e8 photons), centred"},
             "steps": 0, "batch": 0, "train_samples": args.frames, "training_seconds": time.monotonic() - t0,
             "data": {"simulator": "cdinn_stream.simulate (calibration only: paper recipe 50 %, crystal recipe 50 %)",
                      "calibration_frames": args.frames, "seed": CALIBRATION_SEED,
                      "photons": {"paper": [1e4, 1e7], "crystal": list(PHOTONS)}, "background": 0.2}}
    print(json.dumps(stage))


if __name__ == "__main__":
    main()
