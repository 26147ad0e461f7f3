"""Model suite: frames/s and latency per batch size, size and precision; achieved FLOP/s
against a matmul peak measured on the same machine."""

from __future__ import annotations

import torch

from cdinn_stream.model import count_flops
from cdinn_stream.physics import normalized_amplitude
from cdinn_stream.reconstruct import load_model, native_bf16
from cdinn_stream.simulate import simulate
from cdinn_stream.timing import time_call

BATCHES = (1, 4, 16, 64, 256, 1024)


def matmul_peak(dtype: torch.dtype, n: int = 2048) -> float:
    """GFLOP/s of an ``n x n`` matmul in ``dtype`` on the CPU (the practical peak of this machine)."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    sec = time_call(lambda: a @ b, repeat=5)
    return 2 * n**3 / sec / 1e9


def precisions() -> list[str]:
    """fp32, and bf16 where this CPU has it natively."""
    return ["fp32", "bf16"] if native_bf16(torch.device("cpu")) else ["fp32"]


def run(models: list[str], *, quick: bool = False) -> dict:
    """Throughput rows for each model and precision, and the matmul peaks."""
    peaks = {"fp32": matmul_peak(torch.float32, 1024 if quick else 2048)}
    if "bf16" in precisions():
        peaks["bf16"] = matmul_peak(torch.bfloat16, 1024 if quick else 2048)
    rows = []
    for name in models:
        for precision in precisions():
            cdi = load_model(name, device="cpu", precision=precision)
            flops = count_flops(cdi.network)
            frames = simulate(max(BATCHES), cdi.size, seed=7).intensity
            prepared = normalized_amplitude(frames)
            for bs in BATCHES[:4] if quick else BATCHES:
                x, xt = frames[:bs], prepared[:bs]
                api = time_call(lambda x=x: cdi.predict(x), repeat=3 if quick else 5)
                net = time_call(lambda xt=xt: cdi.predict_tensor(xt), repeat=3 if quick else 5)
                rows.append({"model": cdi.name, "size": cdi.size, "precision": precision, "batch": bs,
                             "ms_per_batch": api * 1e3, "frames_per_s": bs / api, "us_per_frame": api / bs * 1e6,
                             "network_us_per_frame": net / bs * 1e6, "mflop_per_frame": flops / 1e6,
                             "network_gflop_per_s": flops * bs / net / 1e9,
                             "fraction_of_matmul_peak": flops * bs / net / 1e9 / peaks[precision]})
    return {"matmul_peak_gflop_per_s": peaks, "rows": rows}


def table(r: dict) -> list[str]:
    """Markdown lines for :func:`run` results."""
    p = r["matmul_peak_gflop_per_s"]
    lines = ["## Model throughput (CPU)", "",
             "Matmul peak measured in the same run: " + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in p.items()) + ".",
             "`predict` includes the input checks and scaling; the network columns time the bare call. "
             "GFLOP/s count a direct convolution's operations: above 100% of the matmul peak means the library "
             "computes with fewer (e.g. Winograd 3x3 convolutions).", "",
             "| model | precision | batch | ms / batch | frames/s | us / frame | network us / frame | "
             "network GFLOP/s | of matmul peak |", "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {x['model']} ({x['size']}x{x['size']}, {x['mflop_per_frame']:.1f} MFLOP) | {x['precision']} | "
              f"{x['batch']} | {x['ms_per_batch']:.3f} | {x['frames_per_s']:.0f} | {x['us_per_frame']:.1f} | "
              f"{x['network_us_per_frame']:.1f} | {x['network_gflop_per_s']:.0f} | {x['fraction_of_matmul_peak']:.0%} |"
              for x in r["rows"]]
    return lines
