"""The folded network in int8 on a CPU: oneDNN's uint8 x int8 convolutions and matrix products.

An :class:`Int8CDINN` runs the steps of a :class:`~cdinn_stream.nn.folding.FoldedCDINN` with its
activations as ``uint8`` (one scale and zero point per tensor) and its weights as ``int8`` (one
scale per output channel, symmetric), through ``torch.ops.onednn.qconv2d_pointwise`` and
``qlinear_pointwise`` on plain integer tensors (no quantized tensor types; a ReLU after a step is
fused into it). The input amplitude is quantized once, before the space-to-depth copy; each
decoder's last step returns float32 logits.

The weights and scales are not a rounding of a float network's: they come from a
quantization-aware fine-tune whose training graph rounds the same way
(``docs/experiments/int8_qat.py``), and are saved in an int8 weights file (:data:`FORMAT`, read
with ``weights_only=True`` like every weights file). The layer names are the folded network's
(``encoder.0``, ``shape_decoder.14``, ...).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .folding import FlatMaxPool, Flatten, FoldedCDINN, Unflatten, decoder_outputs, outputs_inplace, space_to_depth
from .model import CDINN, ModelConfig

__all__ = ["FORMAT", "Int8CDINN", "int8_available", "quantize", "read_int8_weights", "save_int8_weights"]

#: Version tag of the int8 weights file format.
FORMAT = "cdinn-stream/int8-folded/1"

_STAGES = ("encoder", "shape_decoder", "phase_decoder")


def _qparams(scale, zero_point, what: str) -> tuple[float, int]:
    """``(scale, zero_point)`` of a uint8 tensor, checked: a finite scale above 0, a zero point in 0..255."""
    scale, zero_point = float(scale), int(zero_point)
    if not (math.isfinite(scale) and scale > 0) or not 0 <= zero_point <= 255:
        raise ValueError(f"{what}: a uint8 quantization needs a finite scale > 0 and a zero point in 0..255, "
                         f"not {scale} and {zero_point}")
    return scale, zero_point


def int8_available() -> bool:
    """Whether this torch build has oneDNN's int8 operators (x86 CPU builds do)."""
    return hasattr(torch.ops.onednn, "qconv2d_pointwise") and torch.backends.mkldnn.is_available()


class _QuantizedStep:
    """A convolution or ``Linear`` step with int8 weights on uint8 input, ReLU fused or not;
    returns uint8 with the step's output scale and zero point, or float32 when ``to_float``."""

    def __init__(self, module: nn.Conv2d | nn.Linear, layer: dict, x_qparams: tuple[float, int], relu: bool,
                 to_float: bool):
        weight = layer["weight"]
        if weight.dtype != torch.int8 or weight.shape != module.weight.shape:
            raise ValueError(f"int8 weight of shape {tuple(module.weight.shape)} expected, "
                             f"found {weight.dtype} {tuple(weight.shape)}")
        channels = (module.weight.shape[0],)
        self.w_scale = layer["weight_scale"].to(torch.float32).contiguous()
        self.bias = layer["bias"].to(torch.float32).contiguous()
        if self.w_scale.shape != channels or not bool(torch.isfinite(self.w_scale).all() and (self.w_scale > 0).all()):
            raise ValueError(f"weight_scale must be {channels[0]} finite scales > 0, found shape "
                             f"{tuple(self.w_scale.shape)}")
        if self.bias.shape != channels or not bool(torch.isfinite(self.bias).all()):
            raise ValueError(f"bias must be {channels[0]} finite values, found shape {tuple(self.bias.shape)}")
        self.x_scale, self.x_zero_point = x_qparams
        self.w_zero_point = torch.zeros(channels, dtype=torch.int64)
        self.to_float = to_float
        self.out_qparams = (1.0, 0) if to_float else _qparams(layer["out_scale"], layer["out_zero_point"], "output")
        self.out_dtype = torch.float32 if to_float else None
        self.attr = "relu" if relu else "none"
        self.conv = isinstance(module, nn.Conv2d)
        if self.conv:
            self.geometry = ([*module.stride], [*module.padding], [*module.dilation], module.groups)
            self.packed = torch.ops.onednn.qconv_prepack(weight, self.w_scale, self.x_scale, self.x_zero_point,
                                                         *self.geometry, None)
        else:
            self.packed = torch.ops.onednn.qlinear_prepack(weight, None)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        scale, zero_point = self.out_qparams
        if self.conv:
            return torch.ops.onednn.qconv2d_pointwise(
                x, self.x_scale, self.x_zero_point, self.packed, self.w_scale, self.w_zero_point, self.bias,
                *self.geometry, scale, zero_point, self.out_dtype, self.attr, [], "")
        return torch.ops.onednn.qlinear_pointwise(
            x, self.x_scale, self.x_zero_point, self.packed, self.w_scale, self.w_zero_point, self.bias,
            scale, zero_point, self.out_dtype, self.attr, [], "")


def _max_pool_2x2(x: torch.Tensor) -> torch.Tensor:
    """2x2 max-pooling of channels-last ``(B, C, H, W)`` uint8 activations as two elementwise
    maxima of strided views: 100x faster than ``amax`` over the window's axes; torch's
    ``max_pool2d`` fails on some uint8 shapes ("Expected input_depth * input_height *
    input_width <= std::numeric_limits<integer_t>::max()")."""
    b, c, h, w = x.shape
    window = x.permute(0, 2, 3, 1).reshape(b, h // 2, 2, w // 2, 2, c)  # a view of channels-last x
    rows = torch.maximum(window[:, :, 0], window[:, :, 1])  # (B, H/2, W/2, 2, C), contiguous
    return torch.maximum(rows[:, :, :, 0], rows[:, :, :, 1]).permute(0, 3, 1, 2)


def _program(stage: str, modules: list[nn.Module], layers: dict[str, dict], x_qparams: tuple[float, int],
             last_to_float: bool) -> tuple[list[Callable[[torch.Tensor], torch.Tensor]], tuple[float, int]]:
    """The int8 steps of one folded stage list and the quantization of its output."""
    steps: list[Callable[[torch.Tensor], torch.Tensor]] = []
    weighted = [i for i, m in enumerate(modules) if isinstance(m, (nn.Conv2d, nn.Linear))]
    i = 0
    while i < len(modules):
        m = modules[i]
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            name = f"{stage}.{i}"
            if name not in layers:
                raise ValueError(f"int8 weights have no layer {name!r}")
            relu = i + 1 < len(modules) and isinstance(modules[i + 1], nn.ReLU)
            try:
                step = _QuantizedStep(m, layers[name], x_qparams, relu, last_to_float and i == weighted[-1])
            except (KeyError, ValueError) as err:
                raise ValueError(f"int8 layer {name}: {err}") from err
            steps.append(step)
            x_qparams = step.out_qparams
            i += 2 if relu else 1
            continue
        if isinstance(m, nn.ReLU):  # not after a weighted step: zero is the zero point
            steps.append(lambda x, zero=x_qparams[1]: x.clamp_min(zero))
        elif isinstance(m, nn.MaxPool2d) and m.kernel_size in (2, (2, 2)) and m.stride in (2, (2, 2)):
            steps.append(_max_pool_2x2)
        elif isinstance(m, nn.Upsample) and m.mode == "nearest":
            steps.append(lambda x, f=m.scale_factor: F.interpolate(x, scale_factor=f, mode="nearest"))
        elif isinstance(m, (Flatten, Unflatten, FlatMaxPool)):  # views and maxima: any dtype
            steps.append(m)
        else:
            raise ValueError(f"no int8 form for {type(m).__name__} at {stage}.{i}")
        i += 1
    return steps, x_qparams


class Int8CDINN(nn.Module):
    """A folded :class:`CDINN` of ``config`` in int8 (see the module docstring): same
    :meth:`forward_logits`, :meth:`forward` and :attr:`config` as the float forms; CPU only.

    ``layers`` maps each weighted step's name in the folded network to ``weight`` (int8),
    ``weight_scale`` (per output channel), ``bias`` (float), ``out_scale`` and ``out_zero_point``;
    ``input_qparams`` is the quantization of the normalised input amplitude."""

    def __init__(self, config: ModelConfig, layers: dict[str, dict], input_qparams: tuple[float, int]):
        super().__init__()
        if config.patterson:
            raise ValueError("no int8 form for networks with the autocorrelation channels")
        if not int8_available():
            raise RuntimeError("this torch build has no oneDNN int8 operators (x86 CPU builds do): "
                               "use precision 'bf16' or 'fp32' and the float model")
        self.config = config
        self.input_qparams = _qparams(*input_qparams, "input")
        #: what it was built from: what :func:`save_int8_weights` writes
        self.layers = {name: dict(layer) for name, layer in layers.items()}
        with torch.random.fork_rng(devices=[]):  # the layout only (the weights are the layers'): leave the seed be
            folded = FoldedCDINN(CDINN(config))
        self._encoder, z_qparams = _program("encoder", list(folded.encoder), layers, self.input_qparams, False)
        self._decoders = [_program(stage, list(getattr(folded, stage)), layers, z_qparams, True)[0]
                          for stage in _STAGES[1:]]

    def __deepcopy__(self, memo: dict) -> Int8CDINN:
        # oneDNN's packed weights cannot be copied: pack them again
        return Int8CDINN(self.config, copy.deepcopy(self.layers, memo), self.input_qparams)

    def _quantize_input(self, amplitude: torch.Tensor) -> torch.Tensor:
        scale, zero_point = self.input_qparams
        q = torch.round(amplitude.float() * (1.0 / scale))
        if zero_point:
            q.add_(zero_point)
        return q.clamp_(0, 255).to(torch.uint8)

    @torch.no_grad()
    def forward_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw outputs (as :meth:`CDINN.forward_logits`, float32) for normalised amplitudes ``(B, 1, N, N)``."""
        if x.device.type != "cpu":
            raise ValueError("the int8 network runs on a CPU only")
        r = self.config.space_to_depth
        z = self._quantize_input(x)
        z = space_to_depth(z, r) if r > 1 else z.contiguous(memory_format=torch.channels_last)
        for step in self._encoder:
            z = step(z)
        outputs = []
        for decoder in self._decoders:
            y = z
            for step in decoder:
                y = step(y)
            outputs.append(y)
        return decoder_outputs(outputs[0], outputs[1], self.config)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Amplitude in [0, 1] and phase in [-pi, pi], each ``(B, N, N)`` float32."""
        return outputs_inplace(*self.forward_logits(x))


def _weighted_steps(folded: FoldedCDINN) -> list[tuple[str, nn.Module, nn.Module]]:
    """``(name, weighted module, module whose output is the step's)`` for each weighted step."""
    steps = []
    for stage in _STAGES:
        modules = list(getattr(folded, stage))
        for i, m in enumerate(modules):
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                relu = i + 1 < len(modules) and isinstance(modules[i + 1], nn.ReLU)
                steps.append((f"{stage}.{i}", m, modules[i + 1] if relu else m))
    return steps


def _symmetric_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric int8 of ``weight``: ``(int8 weight, scale)``."""
    scale = weight.abs().flatten(1).amax(dim=1).clamp_min(1e-12) / 127.5
    shape = (-1,) + (1,) * (weight.dim() - 1)
    return torch.round(weight / scale.view(shape)).clamp_(-128, 127).to(torch.int8), scale


@torch.no_grad()
def quantize(network: CDINN, amplitudes: torch.Tensor) -> Int8CDINN:
    """Post-training int8 form of ``network``: weights rounded per output channel, each step's
    output range taken from the folded float network's outputs (minimum and maximum) on
    ``amplitudes``, normalised ``(B, 1, N, N)`` frames like the ones it will see. Quick, but it
    loses accuracy that a quantization-aware fine-tune keeps (``docs/design.md`` section 14)."""
    folded = FoldedCDINN(copy.deepcopy(network).cpu().float().eval())
    ranges: dict[str, list[float]] = {}
    hooks = []
    for name, _, output in _weighted_steps(folded):
        def record(module, inputs, out, name=name):
            lo, hi = ranges.setdefault(name, [0.0, 0.0])
            ranges[name] = [min(lo, float(out.amin())), max(hi, float(out.amax()))]
        hooks.append(output.register_forward_hook(record))
    try:
        folded.forward_logits(amplitudes.float().cpu())
    finally:
        for hook in hooks:
            hook.remove()
    layers = {}
    for name, module, _ in _weighted_steps(folded):
        weight, weight_scale = _symmetric_int8(module.weight.float())
        lo, hi = ranges[name]
        scale = max(hi - lo, 1e-12) / 255
        layers[name] = {"weight": weight, "weight_scale": weight_scale, "bias": module.bias.float().clone(),
                        "out_scale": scale, "out_zero_point": int(min(255, max(0, round(-lo / scale))))}
    return Int8CDINN(network.config, layers, (1 / 255, 0))


def save_int8_weights(network: Int8CDINN, path: str | Path, *, meta: dict | None = None) -> None:
    """Write ``network``'s configuration, layers and input quantization to an int8 weights file."""
    torch.save({"format": FORMAT, "config": network.config.to_dict(), "input_qparams": list(network.input_qparams),
                "layers": network.layers, "meta": meta or {}}, Path(path))


def read_int8_weights(blob: dict) -> Int8CDINN:
    """An :class:`Int8CDINN` from a loaded int8 weights file's contents (:data:`FORMAT`)."""
    return Int8CDINN(ModelConfig.from_dict(blob["config"]), blob["layers"], tuple(blob["input_qparams"]))
