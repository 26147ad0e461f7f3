"""Model suite: frames/s and latency per batch size, size and precision; achieved FLOP/s
against a matmul peak measured on the same machine (CPU, or a CUDA GPU with ``device="cuda"``)."""

from __future__ import annotations

import time

import torch

from cdinn_stream.core.physics import normalized_amplitude, peak_offsets, roll_frames
from cdinn_stream.core.simulate import simulate
from cdinn_stream.core.timing import time_call
from cdinn_stream.nn.folding import fold
from cdinn_stream.nn.int8 import Int8CDINN, int8_available
from cdinn_stream.nn.model import CDINN, count_flops
from cdinn_stream.nn.reconstruct import load_model, model_path, native_bf16

BATCHES = (1, 4, 16, 64, 256, 1024)
GPU_BATCHES = (1, 64, 1024, 4096, 16384)


def _synced(fn, device: torch.device):
    """``fn`` followed by a wait for the device (CUDA kernels run asynchronously)."""
    if device.type != "cuda":
        return fn
    return lambda: (fn(), torch.cuda.synchronize(device))


def matmul_peak(dtype: torch.dtype, n: int = 2048, device: str | torch.device = "cpu") -> float:
    """GFLOP/s of an ``n x n`` matmul in ``dtype`` on ``device`` (the practical peak of this machine);
    for ``torch.int8``, GOP/s of oneDNN's uint8 x int8 matrix product (a CPU's int8 peak)."""
    dev = torch.device(device)
    if dtype == torch.int8:
        x = torch.randint(0, 256, (n, n), dtype=torch.uint8)
        w = torch.ops.onednn.qlinear_prepack(torch.randint(-128, 128, (n, n), dtype=torch.int8), None)
        scales, zeros = torch.full((n,), 1e-3), torch.zeros(n, dtype=torch.int64)
        sec = time_call(lambda: torch.ops.onednn.qlinear_pointwise(x, 0.01, 0, w, scales, zeros, None, 1.0, 0, None,
                                                                   "none", [], ""), repeat=5)
        return 2 * n**3 / sec / 1e9
    a, b = torch.randn(n, n, device=dev).to(dtype), torch.randn(n, n, device=dev).to(dtype)
    sec = time_call(_synced(lambda: a @ b, dev), repeat=5)
    return 2 * n**3 / sec / 1e9


def precisions(device: torch.device | None = None) -> list[str]:
    """fp32, and bf16 where the device has it natively (and fp16 on a GPU), and int8 on a CPU with
    oneDNN's int8 operators; default: the CPU."""
    device = device or torch.device("cpu")
    if device.type == "cuda":
        return ["fp32", "bf16", "fp16"]
    return (["fp32", "bf16"] if native_bf16(device) else ["fp32"]) + (["int8"] if int8_available() else [])


def _model_precisions(name: str, device: torch.device) -> list[str]:
    """The precisions to time ``name`` in: an int8 model in int8 (on a CPU) only; a float model in
    each of :func:`precisions`, int8 included where it has a shipped int8 sibling (``<name>-int8``)."""
    if load_model(name, device="cpu").precision == "int8":
        return ["int8"] if device.type == "cpu" else []
    try:
        model_path(f"{name}-int8")
        sibling = True
    except ValueError:
        sibling = False
    return [p for p in precisions(device) if p != "int8" or sibling]


def _flops(network: CDINN | Int8CDINN, folded: torch.nn.Module | None) -> tuple[int, int]:
    """FLOPs per frame of the trained network (direct convolutions) and of what runs."""
    if isinstance(network, Int8CDINN):  # the layout of its float form: the same operations
        float_form = CDINN(network.config)
        return count_flops(float_form), count_flops(fold(float_form))
    flops = count_flops(network)
    return flops, flops if folded is None else count_flops(folded)


def run(models: list[str], *, quick: bool = False, device: str = "cpu", cuda_graphs: bool = False) -> dict:
    """Throughput rows for each model and precision, and the matmul peaks.

    On a GPU the batches go up to 16,384 and, with ``cuda_graphs``, each row is measured a second
    time with the network replayed as a captured CUDA graph."""
    dev = torch.device(device)
    gpu = dev.type == "cuda"
    n_peak = 8192 if gpu else (1024 if quick else 2048)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "int8": torch.int8}
    peaks = {p: matmul_peak(dtypes[p], n_peak, dev) for p in precisions(dev)}
    batches = GPU_BATCHES if gpu else (BATCHES[:4] if quick else BATCHES)
    rows = []
    for name in models:
        frames = None
        for precision in _model_precisions(name, dev):
            for graphs in ((False, True) if gpu and cuda_graphs else (False,)):
                cdi = load_model(name, device=dev, precision=precision, cuda_graphs=graphs)
                flops, computed = _flops(cdi.network, cdi.folded)  # trained network's; what predict runs
                if frames is None:
                    frames = simulate(max(batches), cdi.size, seed=7).intensity
                prepared = normalized_amplitude(frames).to(dev)
                timing = {"repeat": 3, "min_seconds": 0.1} if gpu or quick else {"repeat": 5}
                for bs in batches:
                    x, xt = frames[:bs], prepared[:bs]
                    api = time_call(lambda x=x, cdi=cdi, bs=bs: cdi.predict(x, batch_size=max(bs, 1024)), **timing)
                    net = time_call(_synced(lambda xt=xt, cdi=cdi: cdi.predict_tensor(xt), dev), **timing)
                    rows.append({"model": cdi.name, "size": cdi.size, "precision": precision, "batch": bs,
                                 "device": dev.type, "cuda_graphs": graphs,
                                 "ms_per_batch": api * 1e3, "frames_per_s": bs / api, "us_per_frame": api / bs * 1e6,
                                 "network_us_per_frame": net / bs * 1e6, "network_frames_per_s": bs / net,
                                 "mflop_per_frame": flops / 1e6, "folded": flops != computed,
                                 "computed_mflop_per_frame": computed / 1e6,
                                 "network_gflop_per_s": computed * bs / net / 1e9,
                                 "fraction_of_matmul_peak": computed * bs / net / 1e9 / peaks[precision]})
    return {"device": torch.cuda.get_device_name(dev) if gpu else "cpu", "matmul_peak_gflop_per_s": peaks,
            "matmul_n": n_peak, "rows": rows, "centring": centring(models, device=dev, quick=quick)}


def centring(models: list[str], *, device: torch.device, quick: bool = False, batch: int = 1024) -> list[dict]:
    """What centring each pattern on its Bragg peak costs ``predict``, for each model (in each
    precision) whose network is trained centred: microseconds per frame with centring off, on
    patterns as simulated (the peak whole pixels off the centre in about 60 %: rolled, the ramp
    added back) and on patterns already centred (the live path: the crop has centred them).
    The three are timed in turns, many times, and each keeps its best: this machine's speed
    drifts by tens of per cent over a minute, which would swamp a ratio of separate runs."""
    out = []
    rounds = 3 if quick else 15
    for name in models:
        for precision in _model_precisions(name, device):
            cdi = load_model(name, device=device, precision=precision)
            if not cdi.centre:
                continue
            frames = simulate(batch, cdi.size, seed=7).intensity
            shifts = peak_offsets(torch.from_numpy(frames))
            centred = roll_frames(torch.from_numpy(frames), -shifts).numpy()
            cases = {"off": (frames, False), "uncentred": (frames, True), "centred": (centred, True)}
            best = dict.fromkeys(cases, float("inf"))
            for _ in range(rounds):
                for case, (x, on) in cases.items():
                    cdi.centre = on
                    t = time.perf_counter()
                    cdi.predict(x, batch_size=batch)
                    best[case] = min(best[case], (time.perf_counter() - t) / batch * 1e6)
            out.append({"model": cdi.name, "precision": precision, "batch": batch,
                        "moved": float(shifts.any(dim=1).float().mean()),
                        **{f"us_per_frame_{k}": v for k, v in best.items()}})
    return out


def table(r: dict) -> list[str]:
    """Markdown lines for :func:`run` results."""
    p = r["matmul_peak_gflop_per_s"]
    gpu = r.get("device", "cpu") != "cpu"
    lines = [f"## Model throughput ({r['device'] if gpu else 'CPU'})", "",
             f"Matmul peak measured in the same run ({r.get('matmul_n', 2048)}^3): "
             + ", ".join(f"{k} {v:.0f} G{'OP' if k == 'int8' else 'FLOP'}/s" for k, v in p.items()) + ".",
             "`predict` includes the input checks, scaling and host<->device copies; the network columns time the "
             "bare call on data already on the device. MFLOP: the trained network's, as direct convolutions; on a "
             "CPU `predict` runs its folded form (`cdinn_stream.nn.folding`: the steps on 1x1 and 2x2 grids as dense "
             "matrices, same results), whose operations are in brackets and are the ones GFLOP/s count. Above 100% "
             "of the matmul peak means the library computes with fewer (e.g. Winograd 3x3 convolutions). int8: "
             "the int8 sibling (`cdinn_stream.nn.int8`, its own model card), against the "
             "int8 matmul peak.", "",
             "| model | precision | batch | ms / batch | frames/s | us / frame | network us / frame | "
             "network frames/s | network GFLOP/s | of matmul peak |", "|---|---|---|---|---|---|---|---|---|---|"]

    def flops(x: dict) -> str:
        folded = f" [{x['computed_mflop_per_frame']:.1f} folded]" if x.get("folded") else ""
        return f"{x['mflop_per_frame']:.1f} MFLOP{folded}"

    lines += [f"| {x['model']} ({x['size']}x{x['size']}, {flops(x)}) | {x['precision']}"
              f"{' + CUDA graph' if x.get('cuda_graphs') else ''} | "
              f"{x['batch']} | {x['ms_per_batch']:.3f} | {x['frames_per_s']:.0f} | {x['us_per_frame']:.2f} | "
              f"{x['network_us_per_frame']:.2f} | "
              f"{x.get('network_frames_per_s', 1e6 / x['network_us_per_frame']):.0f} | "
              f"{x['network_gflop_per_s']:.0f} | {x['fraction_of_matmul_peak']:.1%} |"
              for x in r["rows"]]
    if r.get("centring"):
        lines += ["", "Centring on the Bragg peak (`CDIModel.centre`, for networks trained centred): `predict`'s "
                  "us / frame with it off, on the simulated patterns (the share of them whose peak is whole pixels "
                  "off the centre is rolled, and the ramp added back), and on patterns already centred (the live "
                  "path); the three timed in turns, best of each:", "",
                  "| model | precision | batch | moved | off | uncentred | centred (live) | uncentred / off | "
                  "centred / off |", "|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {c['model']} | {c['precision']} | {c['batch']} | {c['moved']:.0%} | "
                  f"{c['us_per_frame_off']:.2f} | {c['us_per_frame_uncentred']:.2f} | "
                  f"{c['us_per_frame_centred']:.2f} | "
                  f"{c['us_per_frame_uncentred'] / c['us_per_frame_off']:.2f}x | "
                  f"{c['us_per_frame_centred'] / c['us_per_frame_off']:.2f}x |" for c in r["centring"]]
    return lines
