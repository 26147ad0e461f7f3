"""Experiment, not part of the package: int8 for the folded ``cdinn-32`` on a CPU.

Post-training quantization, then a quantization-aware fine-tune (QAT), of the folded network
(``cdinn_stream.folding``) with ``torch.ao.quantization``'s FX mode, oneDNN backend, per-channel
weights. It prints the accuracy of each on the model-selection seed (1,000 clean samples; median
chi^2, support IoU, phase RMSE) and the int8 network's time per frame. Results and what they mean:
``docs/design.md`` section 14.

    python docs/experiments/int8_qat.py --minutes 20 --lr 2e-5 [--float enc.0 ds.14 dp.14]

``--float`` keeps those modules of the folded network (its first convolution, the decoders' last
ones) in floating point.
"""

from __future__ import annotations

import argparse
import copy
import math
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.ao.quantization import get_default_qat_qconfig_mapping, get_default_qconfig_mapping
from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx, prepare_qat_fx

from cdinn_stream import load_model
from cdinn_stream.folding import _FlatMaxPool
from cdinn_stream.losses import twin_aware_loss
from cdinn_stream.metrics import score
from cdinn_stream.physics import normalized_amplitude
from cdinn_stream.simulate import add_noise_torch, simulate

SELECTION_SEED = 20251125
R = 4  # space-to-depth of cdinn-32


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
            if isinstance(m, _FlatMaxPool):
                self.enc[i] = _Pool(m.shape)

    def forward(self, x):
        z = self.enc(x)
        return self.ds(z), self.dp(z)


def _logits(body, intensity):
    x = F.pixel_unshuffle(normalized_amplitude(intensity)[:, None].float(), R)
    s, p = body(x.contiguous(memory_format=torch.channels_last))
    return F.pixel_shuffle(s, R)[:, 0], F.pixel_shuffle(p, R)[:, 0]


def _evaluate(body, sel, label: str) -> None:
    with torch.inference_mode():
        s, p = _logits(body, torch.as_tensor(sel.intensity))
    amp, phase = torch.sigmoid(s), (torch.sigmoid(p) - 0.5) * 2 * math.pi
    m = score(amp.numpy(), phase.numpy(), sel.amplitude, sel.phase, sel.intensity)
    print(label, {k: round(float(np.median(np.asarray(v))), 4) for k, v in m.items()}, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=20.0)
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--float", nargs="*", default=[], dest="keep_float")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    torch.manual_seed(0)
    torch.backends.quantized.engine = "onednn"

    body = _Body(copy.deepcopy(load_model("cdinn-32", device="cpu", precision="fp32").folded)).eval()
    sel = simulate(1000, 32, seed=SELECTION_SEED)
    cal = simulate(2048, 32, seed=7, photons=(1e4, 1e7), background=0.2)
    xcal = F.pixel_unshuffle(normalized_amplitude(torch.as_tensor(cal.intensity))[:, None].float(), R)
    xcal = xcal.contiguous(memory_format=torch.channels_last)
    _evaluate(body, sel, "float")

    ptq = prepare_fx(copy.deepcopy(body), get_default_qconfig_mapping("onednn"), (xcal[:8],))
    with torch.inference_mode():
        for i in range(0, len(xcal), 256):
            ptq(xcal[i : i + 256])
    _evaluate(convert_fx(ptq), sel, "post-training int8")

    qmap = get_default_qat_qconfig_mapping("onednn")
    for name in args.keep_float:
        qmap = qmap.set_module_name(name, None)
    qat = prepare_qat_fx(copy.deepcopy(body).train().requires_grad_(True), qmap, (xcal[:8],))
    with torch.no_grad():
        for i in range(0, len(xcal), 256):
            qat(xcal[i : i + 256])
    data = simulate(100_000, 32, seed=123)
    intensity, amplitude, phase = (torch.from_numpy(v) for v in (data.intensity, data.amplitude, data.phase))
    opt = torch.optim.Adam(qat.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(5)
    t0, step, total = time.time(), 0, args.minutes * 60
    while time.time() - t0 < total:
        idx = torch.randint(0, len(intensity), (256,), generator=gen)
        noisy = add_noise_torch(intensity[idx], photons=(1e4, 1e7), background=0.2, generator=gen)
        s, p = _logits(qat, noisy)
        loss = twin_aware_loss(s, p, amplitude[idx], phase[idx], phase_weight=1.0, offset_invariant=True,
                               support_weight=3.0, support_pos_weight=1.0)
        for g in opt.param_groups:
            g["lr"] = args.lr * 0.5 * (1 + math.cos(math.pi * min((time.time() - t0) / total, 1.0)))
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        if step == 2000:  # the quantization ranges stay from here on
            qat.apply(torch.ao.quantization.disable_observer)
    qat.eval()
    _evaluate(qat, sel, f"QAT fake-quant ({step} steps)")
    int8 = convert_fx(copy.deepcopy(qat))
    _evaluate(int8, sel, "QAT int8")
    x = xcal[:1024]
    times = []
    with torch.inference_mode():
        int8(x)  # warm-up
        for _ in range(7):
            t = time.perf_counter()
            int8(x)
            times.append(time.perf_counter() - t)
    print(f"int8 network alone: {min(times) / len(x) * 1e6:.2f} us per frame (batch {len(x)})")


if __name__ == "__main__":
    main()
