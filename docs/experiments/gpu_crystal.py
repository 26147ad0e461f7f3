"""Train candidate 32x32 networks for real crystals side by side on one GPU, in a fixed wall-clock budget.

Issue 15 (real crystals) left the default ``cdinn-32`` at a median strain RMSE of 0.157 rad on the
crystal recipe, the frames with dislocations (phase vortices) and multi-rad strain the worst. This
script trains, at once on one GPU and from one shared data set, three fine-tunes of the shipped
``cdinn-32``:

* ``c32-vector``: the same network with the vector phase head (``phase_head="vector"``: the phase
  is ``atan2(s, c)`` of two output channels, continuous around a vortex and across wraps);
* ``c32-angle``: the same network and head as shipped, trained on in the same way (the control:
  what more training alone buys);
* ``c32x2-vector``: the network deepened (net2net, twice the convolutions per stage, twice the
  FLOPs) with the vector head.

The data: ``--n-train`` + ``--n-val`` samples of the mixed recipe (half paper, half crystal with its
detector effects), seed 37, simulated once with ``--workers`` processes and shared; fresh Poisson
noise of 1e3-1e8 photons and 0.2 background counts per batch; every pattern centred on its Bragg peak.
Then each candidate is scored by the NN alone on the model-selection sets (seed 20261128, 1,000 clean
samples of each recipe), the shipped ``cdinn-32`` beside them. The evaluation sets are left to
``cdinn-stream evaluate``.

Usage (the whole thing ends within ``--deadline`` seconds of its start)::

    python docs/experiments/gpu_crystal.py --out DIR [--deadline 540] [--n-train 400000] [--workers 16]
    python docs/experiments/gpu_crystal.py --out DIR --smoke   # a tiny run on any device, to check the script

``DIR`` gets ``NAME.pt`` (best validation loss) and ``NAME.history.json`` for each candidate,
``summary.json`` and ``log.txt``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

SELECTION_SEED = 20261128
SHIPPED = ROOT / "models" / "cdinn-32.pt"
VARIANTS = {
    "c32-vector": {"phase_head": "vector", "convs_per_stage": 2, "init": "shipped"},
    "c32-angle": {"phase_head": "angle", "convs_per_stage": 2, "init": "shipped"},
    "c32x2-vector": {"phase_head": "vector", "convs_per_stage": 4, "init": "deepened"},
}
COMMON = {"size": 32, "widths": (32, 64, 128), "space_to_depth": 4, "centre": True, "fresh_noise": True,
          "photons": (1e3, 1e8), "background": 0.2, "support_weight": 3.0, "support_pos_weight": 1.0,
          "schedule": "cosine", "seed": 37, "epochs": 100_000}


def log(msg: str, out: Path) -> None:
    line = f"[{time.strftime('%H:%M:%S')}] {msg}"
    print(line, flush=True)
    with open(out / "log.txt", "a") as f:
        f.write(line + "\n")


def config(name: str, args: argparse.Namespace, work: Path, minutes: float, device: str):
    from cdinn_stream.lab.train import TrainConfig

    v = VARIANTS[name]
    init = str(SHIPPED) if v["init"] == "shipped" else str(work / "deepened-init.pt")
    return TrainConfig(out_dir=work / name, data=str(work / "data"), n_train=args.n_train, n_val=args.n_val,
                       batch_size=args.batch_size, lr=args.lr, max_minutes=minutes, init_weights=init, device=device,
                       threads=2, phase_head=v["phase_head"], convs_per_stage=v["convs_per_stage"], **COMMON)


def child(name: str, args: argparse.Namespace) -> None:
    from cdinn_stream.lab.train import train

    work = Path(args.work)
    train(config(name, args, work, args.minutes, args.device))


def medians(model, recipe: str, seed: int, n: int) -> dict[str, float]:
    from cdinn_stream.core.metrics import score
    from cdinn_stream.core.simulate import simulate

    data = simulate(n, 32, seed=seed, recipe=recipe)
    rec = model.predict(data.intensity)
    m = score(rec.amplitude, rec.phase, data.amplitude, data.phase, data.intensity)
    return {k: float(np.median(v)) for k, v in m.items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--work", default="/tmp/gpu-crystal")
    p.add_argument("--deadline", type=float, default=540.0, help="seconds from start to the end of everything")
    p.add_argument("--n-train", type=int, default=400_000)
    p.add_argument("--n-val", type=int, default=8_000)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--eval-n", type=int, default=1000)
    p.add_argument("--smoke", action="store_true", help="tiny sizes, to check the script")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--minutes", type=float, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child, args)
        return 0
    t0 = time.monotonic()
    if args.smoke:
        args.n_train, args.n_val, args.eval_n, args.batch_size = 1024, 256, 64, 128
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    from cdinn_stream.core.timing import machine_info
    from cdinn_stream.lab.train import TrainConfig, _data
    from cdinn_stream.nn.model import deepen
    from cdinn_stream.nn.reconstruct import load_model
    from cdinn_stream.nn.weights import read_weights, save_weights

    log(f"device {args.device}: {machine_info()}", out)
    # 1. the data, once: paper train, crystal train, paper validation, crystal validation (as train lays it out)
    data = _data(TrainConfig(data_recipe="mixed", n_train=args.n_train, n_val=args.n_val, seed=COMMON["seed"],
                             fresh_noise=True, workers=args.workers))
    (work / "data").mkdir()
    for key, array in zip(("intensity", "amplitude", "phase"), data, strict=True):
        np.save(work / "data" / f"{key}.npy", array.numpy())
    del data
    save_weights(deepen(read_weights(SHIPPED)), work / "deepened-init.pt")
    log(f"data: {args.n_train} + {args.n_val} samples in {time.monotonic() - t0:.0f} s", out)
    # 2. the candidates side by side, in what is left of the budget (less the scoring at the end)
    minutes = max(0.2, (args.deadline - (time.monotonic() - t0) - (20 if args.smoke else 75)) / 60)
    log(f"training {list(VARIANTS)} for {minutes:.2f} min each, batch {args.batch_size}, lr {args.lr}", out)
    procs = {}
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"}
    for name in VARIANTS:
        cmd = [sys.executable, __file__, "--child", name, "--out", str(out), "--work", str(work), "--minutes",
               str(minutes), "--n-train", str(args.n_train), "--n-val", str(args.n_val), "--batch-size",
               str(args.batch_size), "--lr", str(args.lr), "--device", args.device]
        procs[name] = subprocess.Popen(cmd, stdout=open(work / f"{name}.log", "w"), stderr=subprocess.STDOUT,
                                       env=env)

    def collect() -> None:
        for name in VARIANTS:
            for src, dst in (("best.pt", f"{name}.pt"), ("history.json", f"{name}.history.json")):
                if (work / name / src).is_file():
                    shutil.copyfile(work / name / src, out / dst)

    while any(proc.poll() is None for proc in procs.values()):
        time.sleep(2 if args.smoke else 30)
        collect()
        for name in VARIANTS:
            h = work / name / "history.json"
            if h.is_file():
                last = json.loads(h.read_text())["history"][-1]
                log(f"{name}: epoch {last['epoch']} val {last['val_loss']:.4f} train {last['train_loss']:.4f} "
                    f"lr {last['lr']:.2e} at {last['seconds']:.0f} s", out)
    collect()
    failed = {name: proc.returncode for name, proc in procs.items() if proc.returncode}
    for name in failed:
        log(f"{name} failed ({failed[name]}):\n" + (work / f"{name}.log").read_text()[-3000:], out)
    # 3. the NN alone on the model-selection sets (not the evaluation sets), the shipped network beside them
    summary: dict = {"machine": machine_info(), "n_train": args.n_train, "n_val": args.n_val,
                     "batch_size": args.batch_size, "lr": args.lr, "minutes": minutes, "common": COMMON,
                     "variants": VARIANTS, "failed": failed, "selection": {}}
    for name, path in [("shipped cdinn-32", SHIPPED)] + [(n, out / f"{n}.pt") for n in VARIANTS]:
        if not Path(path).is_file():
            continue
        try:
            model = load_model(path, device=args.device)
            row = {recipe: medians(model, recipe, SELECTION_SEED, args.eval_n) for recipe in ("crystal", "paper")}
        except Exception as err:  # the weights are in OUT already: score them elsewhere
            log(f"{name}: scoring failed: {err!r}", out)
            continue
        history = out / f"{name}.history.json"
        if history.is_file():
            h = json.loads(history.read_text())["history"]
            row["epochs"], row["samples"] = len(h), sum(e["samples"] for e in h)
            row["best_val_loss"] = min(e["val_loss"] for e in h)
        summary["selection"][name] = row
        c, q = row["crystal"], row["paper"]
        log(f"{name:18s} crystal IoU {c['support_iou']:.3f} chi2 {c['chi2']:.4f} strain {c['strain_rmse']:.3f} | "
            f"paper IoU {q['support_iou']:.3f} chi2 {q['chi2']:.4f} phase {q['phase_rmse']:.3f}", out)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    log(f"done in {time.monotonic() - t0:.0f} s", out)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
