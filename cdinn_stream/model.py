"""The CDI NN after Cherukara et al., Fig. 1 (pure torch, no I/O).

A convolutional encoder (3x3 convolution + ReLU pairs, each stage closed by 2x2 max-pooling)
feeds two up-sampling decoders (nearest 2x up-sampling, 3x3 convolution + ReLU pairs), one
for the shape (amplitude) and one for the phase; each ends in a 3x3 convolution with a sigmoid.
The encoder is shared between the two decoders (see ``docs/design.md``). The phase sigmoid maps
onto ``[-pi, pi]``.

``space_to_depth=r > 1`` folds each ``r x r`` block of input pixels into ``r**2`` channels
(``pixel_unshuffle``) before the encoder and unfolds the decoders' ``r**2`` output channels back
(``pixel_shuffle``): the same network on an ``r``-times smaller grid, for a fraction of the FLOPs.

Input ``(B, 1, N, N)``: diffraction amplitudes ``sqrt(I)`` scaled to a maximum of 1.
Output: amplitude ``(B, N, N)`` in [0, 1] and phase ``(B, N, N)`` in radians.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

__all__ = ["ModelConfig", "CDINN", "count_flops"]


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a :class:`CDINN`.

    Attributes:
        size: frame size ``N`` (input and output are ``N x N``; a multiple of ``2**len(widths)``).
        widths: channels of each encoder stage (the paper: 32, 64, 128); decoders mirror them.
        convs_per_stage: 3x3 convolutions per stage (the paper: 2).
        space_to_depth: fold ``r x r`` pixel blocks into channels at the input and unfold them at
            the output (the paper: 1, no folding).
    """

    size: int = 32
    widths: tuple[int, ...] = (32, 64, 128)
    convs_per_stage: int = 2
    space_to_depth: int = 1

    def to_dict(self) -> dict:
        return {**asdict(self), "widths": list(self.widths)}

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        return cls(size=int(d["size"]), widths=tuple(int(w) for w in d["widths"]),
                   convs_per_stage=int(d["convs_per_stage"]), space_to_depth=int(d.get("space_to_depth", 1)))


def _convs(c_in: int, c_out: int, n: int) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for i in range(n):
        layers += [nn.Conv2d(c_in if i == 0 else c_out, c_out, 3, padding=1), nn.ReLU(inplace=True)]
    return layers


def _decoder(widths: tuple[int, ...], n: int, out_channels: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    rev = widths[::-1]
    for i, w in enumerate(rev):
        layers += _convs(rev[i - 1] if i else w, w, n)
        layers.append(nn.Upsample(scale_factor=2, mode="nearest"))
    layers.append(nn.Conv2d(widths[0], out_channels, 3, padding=1))
    return nn.Sequential(*layers)


class CDINN(nn.Module):
    """Shared convolutional encoder with shape and phase up-sampling decoders."""

    def __init__(self, config: ModelConfig = ModelConfig()):
        super().__init__()
        r = config.space_to_depth
        if config.size % (r * 2 ** len(config.widths)):
            raise ValueError(f"size {config.size} is not a multiple of {r * 2 ** len(config.widths)}")
        self.config = config
        layers: list[nn.Module] = [nn.PixelUnshuffle(r)] if r > 1 else []
        c = r * r
        for w in config.widths:
            layers += _convs(c, w, config.convs_per_stage)
            layers.append(nn.MaxPool2d(2))
            c = w
        self.encoder = nn.Sequential(*layers)
        self.shape_decoder = _decoder(config.widths, config.convs_per_stage, r * r)
        self.phase_decoder = _decoder(config.widths, config.convs_per_stage, r * r)
        if r > 1:
            self.shape_decoder.append(nn.PixelShuffle(r))
            self.phase_decoder.append(nn.PixelShuffle(r))

    def forward_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pre-sigmoid outputs ``(B, N, N)`` for shape and phase (used by the training loss)."""
        z = self.encoder(x)
        return self.shape_decoder(z)[:, 0], self.phase_decoder(z)[:, 0]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Amplitude in [0, 1] and phase in [-pi, pi], each ``(B, N, N)``."""
        return self.outputs(*self.forward_logits(x))

    @staticmethod
    def outputs(shape_logits: torch.Tensor, phase_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Amplitude and phase from the logits (in float32 when the network ran in lower precision)."""
        s, p = shape_logits.float(), phase_logits.float()
        return torch.sigmoid(s), (torch.sigmoid(p) - 0.5) * (2 * math.pi)


def count_flops(model: CDINN) -> int:
    """Multiply-accumulates x 2 per frame for one forward pass (convolutions only)."""
    flops = 0
    size = model.config.size
    hooks = []

    def hook(mod, inp, out):
        nonlocal flops
        k = mod.kernel_size[0] * mod.kernel_size[1]
        flops += 2 * out.shape[-1] * out.shape[-2] * mod.in_channels * mod.out_channels * k

    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(hook))
    with torch.no_grad():
        model(torch.zeros(1, 1, size, size))
    for h in hooks:
        h.remove()
    return flops


def deepen(model: CDINN) -> CDINN:
    """The same function with twice the convolutions per stage (net2net).

    Each stage's convolution is followed by a new 3x3 convolution initialised to the identity
    (centre tap 1 on the diagonal); after a ReLU its input is non-negative, so the deeper
    network starts out computing exactly what ``model`` computes, and fine-tuning can use the
    extra capacity. Used to grow the shipped 32x32 model (see its model card's lineage).
    """
    cfg = model.config
    new = CDINN(ModelConfig(cfg.size, cfg.widths, 2 * cfg.convs_per_stage, cfg.space_to_depth))

    def convs(seq: nn.Module) -> list[nn.Conv2d]:
        return [m for m in seq if isinstance(m, nn.Conv2d)]

    with torch.no_grad():
        for part in ("encoder", "shape_decoder", "phase_decoder"):
            old_convs, new_convs = convs(getattr(model, part)), convs(getattr(new, part))
            if part != "encoder":  # the decoders' last convolution maps onto the output as before
                new_convs[-1].load_state_dict(old_convs[-1].state_dict())
                old_convs, new_convs = old_convs[:-1], new_convs[:-1]
            for i, conv in enumerate(old_convs):
                first, second = new_convs[2 * i], new_convs[2 * i + 1]
                first.load_state_dict(conv.state_dict())
                second.weight.zero_()
                second.bias.zero_()
                c = second.out_channels
                second.weight[torch.arange(c), torch.arange(c), 1, 1] = 1.0
    return new
