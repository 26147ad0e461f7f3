"""Recipe of ``models/cdinn-32-int8.pt``: a quantization-aware fine-tune (QAT) of the folded
``cdinn-32`` for int8 on a CPU, exported as an int8 weights file (:mod:`cdinn_stream.nn.int8`).

It uses ``torch.ao.quantization``'s FX mode (oneDNN settings: uint8 activations per tensor, int8
weights per output channel, symmetric), which torch has deprecated; the package itself does not
use it: :class:`cdinn_stream.nn.int8.Int8CDINN` runs the exported integers through oneDNN's operators.

The weights' fake quantization is torch's plain ``FakeQuantize``: its rounding grid is the one
conversion uses. The default fused fake-quantize of the QAT configuration keeps a scale that
differs from the one conversion computes (by 255/254 on most channels, and with a zero point of
128 on all-zero channels), so a network trained with it loses accuracy when converted; see
``docs/design.md`` section 14.

The shipped ``cdinn-32-int8`` took three runs (its card's ``lineage``; stage 1 ran this script
as of commit b8d547d, whose weights fake-quantize was torch's fused default):

    python docs/experiments/int8_qat.py --minutes 20 --lr 2e-5 --save-state s1.pt        # stage 1
    python docs/experiments/int8_qat.py --init s1.pt --minutes 0.3 --lr 3e-5 --save-state s2.pt
    python docs/experiments/int8_qat.py --resume s2.pt --minutes 32 --lr 1e-4 --distill 1 \
        --save-state s3.pt --history s3.json --export cdinn-32-int8.pt

then ``cdinn-stream evaluate --model cdinn-32-int8.pt`` and ``cdinn_stream.lab.card.publish_int8``.
Stages 1 and 2 also fake-quantized the decoders' outputs; leaving them in float (as
:class:`~cdinn_stream.nn.int8.Int8CDINN` computes them) came with stage 3.

It prints the accuracy on the model-selection seed (1,000 clean samples; median chi^2, support
IoU, phase RMSE) of the float network, the fake-quantized one, torch's int8 conversion and the
exported :class:`~cdinn_stream.nn.int8.Int8CDINN` (whose last steps return float logits).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.ao.quantization import (
    FakeQuantize,
    MovingAveragePerChannelMinMaxObserver,
    QConfig,
    get_default_qat_qconfig,
    get_default_qat_qconfig_mapping,
)
from torch.ao.quantization.quantize_fx import convert_fx, prepare_qat_fx

from cdinn_stream import load_model
from cdinn_stream.core.metrics import score
from cdinn_stream.core.physics import normalized_amplitude
from cdinn_stream.core.simulate import add_noise_torch, simulate
from cdinn_stream.core.timing import machine_info
from cdinn_stream.lab.losses import twin_aware_loss
from cdinn_stream.nn.folding import FlatMaxPool
from cdinn_stream.nn.int8 import Int8CDINN, save_int8_weights

SELECTION_SEED = 20251125
R = 4  # space-to-depth of cdinn-32
STAGES = {"enc": "encoder", "ds": "shape_decoder", "dp": "phase_decoder"}


class _Pool(nn.Module):
    """2x2 max-pooling of flattened channels-last activations with quantized-capable ops."""

    def __init__(self, shape):
        super().__init__()
        self.shape = shape

    def forward(self, x):
        c, h, w = self.shape
        y = F.max_pool2d(x.reshape(x.shape[0], h, w, c).permute(0, 3, 1, 2), 2)
        return y.permute(0, 2, 3, 1).reshape(x.shape[0], -1)


class _Body(nn.Module):
    """The folded network between its pixel shuffles (what FX quantizes)."""

    def __init__(self, folded):
        super().__init__()
        self.enc, self.ds, self.dp = folded.encoder, folded.shape_decoder, folded.phase_decoder
        for i, m in enumerate(self.enc):
            if isinstance(m, FlatMaxPool):
                self.enc[i] = _Pool(m.shape)

    def forward(self, x):
        z = self.enc(x)
        return self.ds(z), self.dp(z)


def _logits(body, intensity):
    x = F.pixel_unshuffle(normalized_amplitude(intensity)[:, None].float(), R)
    s, p = body(x.contiguous(memory_format=torch.channels_last))
    return F.pixel_shuffle(s, R)[:, 0], F.pixel_shuffle(p, R)[:, 0]


def _report(logits, sel, label: str) -> dict:
    s, p = logits
    amp, phase = torch.sigmoid(s), (torch.sigmoid(p) - 0.5) * 2 * math.pi
    m = score(amp.numpy(), phase.numpy(), sel.amplitude, sel.phase, sel.intensity)
    medians = {k: round(float(np.median(np.asarray(v))), 4) for k, v in m.items()}
    print(label, medians, flush=True)
    return medians


def _evaluate(body, sel, label: str) -> dict:
    with torch.inference_mode():
        return _report(_logits(body, torch.as_tensor(sel.intensity)), sel, label)


def qat_qconfig_mapping():
    """oneDNN's QAT settings with plain ``FakeQuantize`` for the weights (see the docstring)."""
    weight = FakeQuantize.with_args(observer=MovingAveragePerChannelMinMaxObserver, quant_min=-128, quant_max=127,
                                    dtype=torch.qint8, qscheme=torch.per_channel_symmetric)
    qconfig = QConfig(activation=get_default_qat_qconfig("onednn").activation, weight=weight)
    return get_default_qat_qconfig_mapping("onednn").set_global(qconfig)


def float_outputs(qat) -> None:
    """No fake quantization of the decoders' outputs: :class:`Int8CDINN`'s last steps return
    float logits, so the training graph computes what it computes."""
    last = {}
    for name, m in qat.named_modules():
        if name.count(".") == 1 and name.split(".")[0] in ("ds", "dp") and hasattr(m, "weight_fake_quant"):
            last[name.split(".")[0]] = name
    for node in qat.graph.nodes:
        if node.op == "call_module" and node.target in last.values():
            for user in node.users:
                if user.op == "call_module" and "activation_post_process" in str(user.target):
                    qat.get_submodule(str(user.target)).disable_fake_quant()


def export(converted, config) -> Int8CDINN:
    """The :class:`Int8CDINN` of torch's converted int8 network (same integers and scales)."""
    layers = {}
    for name, m in converted.named_modules():
        if name.count(".") == 1 and callable(getattr(m, "weight", None)):
            w = m.weight()
            stage, i = name.split(".")
            layers[f"{STAGES[stage]}.{i}"] = {
                "weight": w.int_repr().clone(), "weight_scale": w.q_per_channel_scales().float(),
                "bias": m.bias().detach().float().clone(), "out_scale": float(m.scale),
                "out_zero_point": int(m.zero_point)}
    return Int8CDINN(config, layers, (float(converted.enc_0_input_scale_0), int(converted.enc_0_input_zero_point_0)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=50.0, help="fine-tune time (0: export only)")
    ap.add_argument("--lr", type=float, default=3e-5, help="peak learning rate (cosine to 0)")
    ap.add_argument("--observe-steps", type=int, default=2000, help="steps before the scales freeze")
    ap.add_argument("--init", help="start from the float weights of this QAT state")
    ap.add_argument("--resume", help="start from this QAT state, scales included")
    ap.add_argument("--save-state", default="qat_state.pt", help="QAT state, saved every 3,000 steps and at the end")
    ap.add_argument("--export", help="write the int8 weights file here")
    ap.add_argument("--distill", type=float, default=0.0,
                    help="weight of a loss towards the float cdinn-32's outputs on the same frames (0: none)")
    ap.add_argument("--history", help="write the fine-tune's recipe and loss curve here (JSON, for the model card)")
    args = ap.parse_args()
    warnings.filterwarnings("ignore", category=DeprecationWarning)  # torch.ao.quantization
    warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*")
    torch.set_num_threads(2)
    torch.manual_seed(0)
    torch.backends.quantized.engine = "onednn"

    base = load_model("cdinn-32", device="cpu", precision="fp32")
    body = _Body(copy.deepcopy(base.folded)).eval()
    sel = simulate(1000, 32, seed=SELECTION_SEED)
    cal = simulate(2048, 32, seed=7, photons=(1e4, 1e7), background=0.2)
    xcal = F.pixel_unshuffle(normalized_amplitude(torch.as_tensor(cal.intensity))[:, None].float(), R)
    xcal = xcal.contiguous(memory_format=torch.channels_last)
    _evaluate(body, sel, "float cdinn-32")
    if args.init:
        floats = {k: v for k, v in torch.load(args.init).items()
                  if k.endswith((".weight", ".bias")) and "fake_quant" not in k}
        body.load_state_dict(floats)
        _evaluate(body, sel, f"float, from {args.init}")

    teacher = _Body(copy.deepcopy(base.folded)).eval().requires_grad_(False)
    qat = prepare_qat_fx(copy.deepcopy(body).train().requires_grad_(True), qat_qconfig_mapping(), (xcal[:8],))
    if args.resume:
        qat.load_state_dict(torch.load(args.resume))
        qat.apply(torch.ao.quantization.disable_observer)
    else:
        with torch.no_grad():  # the observers see the data first
            for i in range(0, len(xcal), 256):
                qat(xcal[i : i + 256])
    float_outputs(qat)  # after loading a state: the switch is a buffer
    if args.minutes > 0:
        data = simulate(100_000, 32, seed=123)
        intensity, amplitude, phase = (torch.from_numpy(v) for v in (data.intensity, data.amplitude, data.phase))
        opt = torch.optim.Adam(qat.parameters(), lr=args.lr)
        gen = torch.Generator().manual_seed(5)
        t0, step, total, curve = time.time(), 0, args.minutes * 60, []
        while time.time() - t0 < total:
            idx = torch.randint(0, len(intensity), (256,), generator=gen)
            noisy = add_noise_torch(intensity[idx], photons=(1e4, 1e7), background=0.2, generator=gen)
            s, p = _logits(qat, noisy)
            loss = twin_aware_loss(s, p, amplitude[idx], phase[idx], phase_weight=1.0, offset_invariant=True,
                                   support_weight=3.0, support_pos_weight=1.0)
            if args.distill:
                with torch.no_grad():
                    ts, tp = _logits(teacher, noisy)
                loss = loss + args.distill * (F.binary_cross_entropy_with_logits(s, torch.sigmoid(ts))
                                              + F.mse_loss(torch.sigmoid(p), torch.sigmoid(tp)))
            for g in opt.param_groups:
                g["lr"] = args.lr * 0.5 * (1 + math.cos(math.pi * min((time.time() - t0) / total, 1.0)))
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if step % 500 == 0:
                curve.append({"step": step, "seconds": round(time.time() - t0, 1), "loss": round(loss.item(), 5)})
                print(f"step {step} {time.time() - t0:.0f}s loss {loss.item():.4f}", flush=True)
            if step % 3000 == 0:
                torch.save(qat.state_dict(), args.save_state)
            if step == args.observe_steps:  # the quantization scales stay from here on
                qat.apply(torch.ao.quantization.disable_observer)
        torch.save(qat.state_dict(), args.save_state)
        print(f"{step} steps of 256 in {args.minutes} minutes", flush=True)
        if args.history:
            recipe = {"script": "docs/experiments/int8_qat.py", "lr": args.lr, "schedule": "cosine",
                      "distill": args.distill, "float_outputs": True,
                      "observe_steps": args.observe_steps, "init": args.init, "resume": args.resume,
                      "loss": "twin_aware_loss: phase_weight 1, offset_invariant, support_weight 3, "
                              "support_pos_weight 1",
                      "data_seed": 123, "photons": [1e4, 1e7], "background": 0.2, "fresh_noise_each_step": True,
                      "quantization": "oneDNN: uint8 activations per tensor, int8 weights per channel (symmetric, "
                                      "plain FakeQuantize)"}
            Path(args.history).write_text(json.dumps(
                {"recipe": recipe, "steps": step, "batch": 256, "train_samples": len(intensity),
                 "training_seconds": round(time.time() - t0, 1), "machine": machine_info(), "loss_curve": curve},
                indent=1))
    qat.eval()
    _evaluate(qat, sel, "fake-quantized")
    converted = convert_fx(copy.deepcopy(qat))
    _evaluate(converted, sel, "torch int8 conversion")
    int8 = export(converted, base.network.config)
    amplitude = normalized_amplitude(torch.as_tensor(sel.intensity))[:, None]
    _report(int8.forward_logits(amplitude.contiguous(memory_format=torch.channels_last)), sel, "Int8CDINN")
    if args.export:
        save_int8_weights(int8, args.export, meta={"recipe": "docs/experiments/int8_qat.py", "minutes": args.minutes,
                                                   "lr": args.lr, "init": args.init, "resume": args.resume})
        print("wrote", args.export)


if __name__ == "__main__":
    main()
