"""The CDI NN after Cherukara et al., Fig. 1 (pure torch, no I/O).

A convolutional encoder (3x3 convolution + ReLU pairs, each stage closed by 2x2 max-pooling)
feeds two up-sampling decoders (nearest 2x up-sampling, 3x3 convolution + ReLU pairs), one
for the shape (amplitude) and one for the phase; each ends in a 3x3 convolution with a sigmoid.
The encoder is shared between the two decoders (see ``docs/design.md``). The phase sigmoid maps
onto ``[-pi, pi]``; ``phase_head="vector"`` ends the phase decoder in two channels instead, a
vector ``(c, s)`` whose angle ``atan2(s, c)`` is the phase: continuous across phase wraps and
around the phase vortex of a dislocation, where the angle itself jumps by ``2 pi``.

``patterson=True`` adds two input channels computed inside the network: the real and imaginary
parts of the measured pattern's inverse Fourier transform, the object's autocorrelation (the
Patterson map), scaled by its zero-lag value. Its support is the object's support dilated by its
own inversion, so it puts a real-space picture of the object's extent next to ``|F|`` for the
convolutions, at the cost of one FFT per frame.

``space_to_depth=r > 1`` folds each ``r x r`` block of input pixels into ``r**2`` channels
(``pixel_unshuffle``) before the encoder and unfolds the decoders' ``r**2`` output channels back
(``pixel_shuffle``): the same network on an ``r``-times smaller grid, for a fraction of the FLOPs.

Input ``(B, 1, N, N)``: diffraction amplitudes ``sqrt(I)`` scaled to a maximum of 1.
Output: amplitude ``(B, N, N)`` in [0, 1] and phase ``(B, N, N)`` in radians.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch
from torch import nn

__all__ = ["PHASE_HEADS", "ModelConfig", "CDINN", "count_flops", "deepen", "patterson_channels", "phase_of",
           "with_patterson", "with_vector_phase"]


#: Phase outputs: ``"angle"`` (one channel through a sigmoid onto ``[-pi, pi]``, the paper's) or
#: ``"vector"`` (two channels ``(c, s)``, phase ``atan2(s, c)``).
PHASE_HEADS = ("angle", "vector")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a :class:`CDINN`.

    Attributes:
        size: frame size ``N`` (input and output are ``N x N``; a multiple of ``2**len(widths)``).
        widths: channels of each encoder stage (the paper: 32, 64, 128); decoders mirror them.
        convs_per_stage: 3x3 convolutions per stage (the paper: 2).
        space_to_depth: fold ``r x r`` pixel blocks into channels at the input and unfold them at
            the output (the paper: 1, no folding).
        patterson: add the autocorrelation (inverse FFT of the intensity) as two input channels.
        centred_input: trained on patterns centred on their Bragg peak
            (:func:`~cdinn_stream.core.physics.peak_offsets`), with the matching ramp out of the target
            phase: :class:`~cdinn_stream.nn.reconstruct.CDIModel` then centres every pattern before the
            network and puts the ramp back after it. No effect on the layers.
        phase_head: ``"angle"`` or ``"vector"`` (:data:`PHASE_HEADS`): the phase decoder's output.
    """

    size: int = 32
    widths: tuple[int, ...] = (32, 64, 128)
    convs_per_stage: int = 2
    space_to_depth: int = 1
    patterson: bool = False
    centred_input: bool = False
    phase_head: str = "angle"

    def __post_init__(self) -> None:
        if self.phase_head not in PHASE_HEADS:
            raise ValueError(f"phase_head must be one of {PHASE_HEADS}, not {self.phase_head!r}")

    @property
    def phase_channels(self) -> int:
        """Channels of the phase output: 1 (angle) or 2 (vector)."""
        return 2 if self.phase_head == "vector" else 1

    def to_dict(self) -> dict:
        return {**asdict(self), "widths": list(self.widths)}

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        return cls(size=int(d["size"]), widths=tuple(int(w) for w in d["widths"]),
                   convs_per_stage=int(d["convs_per_stage"]), space_to_depth=int(d.get("space_to_depth", 1)),
                   patterson=bool(d.get("patterson", False)), centred_input=bool(d.get("centred_input", False)),
                   phase_head=str(d.get("phase_head", "angle")))


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
        c = r * r * (3 if config.patterson else 1)
        for w in config.widths:
            layers += _convs(c, w, config.convs_per_stage)
            layers.append(nn.MaxPool2d(2))
            c = w
        self.encoder = nn.Sequential(*layers)
        self.shape_decoder = _decoder(config.widths, config.convs_per_stage, r * r)
        self.phase_decoder = _decoder(config.widths, config.convs_per_stage, r * r * config.phase_channels)
        if r > 1:
            self.shape_decoder.append(nn.PixelShuffle(r))
            self.phase_decoder.append(nn.PixelShuffle(r))

    def forward_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw outputs for shape ``(B, N, N)`` (pre-sigmoid) and phase: ``(B, N, N)`` pre-sigmoid for
        the angle head, ``(B, 2, N, N)`` ``(c, s)`` for the vector head (used by the training loss)."""
        z = self.encoder(patterson_channels(x) if self.config.patterson else x)
        phase = self.phase_decoder(z)
        return self.shape_decoder(z)[:, 0], phase if self.config.phase_head == "vector" else phase[:, 0]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Amplitude in [0, 1] and phase in [-pi, pi], each ``(B, N, N)``."""
        return self.outputs(*self.forward_logits(x))

    @staticmethod
    def outputs(shape_logits: torch.Tensor, phase_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Amplitude and phase from the logits (in float32 when the network ran in lower precision)."""
        return torch.sigmoid(shape_logits.float()), phase_of(phase_logits)

    @staticmethod
    def field(shape_logits: torch.Tensor, phase_logits: torch.Tensor) -> torch.Tensor:
        """The complex object ``amplitude e^{i phase}`` ``(B, N, N)`` from the logits, differentiable
        everywhere (the vector head's ``(c, s)`` normalised with a floor, not through ``atan2``,
        whose gradient is undefined at ``(0, 0)``): for losses on the object's far field."""
        amplitude = torch.sigmoid(shape_logits.float())
        p = phase_logits.float()
        if p.dim() == 4:
            norm = (p.square().sum(dim=1) + 1e-12).sqrt()
            return torch.complex(amplitude * p[:, 0] / norm, amplitude * p[:, 1] / norm)
        return torch.polar(amplitude, phase_of(p))


def phase_of(phase_logits: torch.Tensor) -> torch.Tensor:
    """The phase ``(B, N, N)`` in ``[-pi, pi]`` (float32) from a phase head's raw output: the angle
    head's ``(B, N, N)`` logits (``2 pi (sigmoid - 1/2)``) or the vector head's ``(B, 2, N, N)``
    ``(c, s)`` (``atan2(s, c)``)."""
    p = phase_logits.float()
    if p.dim() == 4:
        return torch.atan2(p[:, 1], p[:, 0])
    return (torch.sigmoid(p) - 0.5) * (2 * math.pi)


_CHECKERBOARDS: dict[tuple[int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}


def _checkerboard(n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(-1)**(k1 + k2)`` ``(n, n)`` and the index ``-k mod n`` (cached per size and device)."""
    key = (n, device)
    if key not in _CHECKERBOARDS:
        k = torch.arange(n, device=device)
        _CHECKERBOARDS[key] = ((1 - 2 * ((k[:, None] + k) % 2)).float(), (-k) % n)
    return _CHECKERBOARDS[key]


def patterson_channels(x: torch.Tensor) -> torch.Tensor:
    """``(B, 3, N, N)``: amplitudes ``x`` ``(B, 1, N, N)`` (centred ``|F|``) with the real and
    imaginary parts of their autocorrelation ``IFT(|F|^2)``, centred and divided by its zero-lag
    value (computed in float32, outside autocast).

    For even ``N`` the centring shifts are a ``(-1)**(k1 + k2)`` checkerboard on either side of
    the transform, and the intensity is real, so a real FFT gives half the plane and Hermitian
    symmetry the other half: about 3x cheaper than ``fftshift(ifft2(ifftshift(I)))``.
    """
    n = x.shape[-1]
    if n % 2:
        raise ValueError(f"the autocorrelation channels need an even frame size, not {n}")
    h = n // 2
    with torch.autocast(device_type=x.device.type, enabled=False):
        xf = x.float()
        sign, minus_k = _checkerboard(n, x.device)
        intensity = xf * xf
        # IFT(I)[m] = conj(FT(I)[m]) / n^2 for real I; the zero-lag value is sum(I) / n^2
        half = torch.fft.rfft2(intensity * sign)  # (B, 1, n, h + 1): k2 = 0 .. h
        inv = 1.0 / intensity.sum(dim=(-2, -1), keepdim=True).clamp_min(1e-12)
        out = torch.empty(x.shape[0], 3, n, n, device=x.device)
        out[:, :1] = xf
        left, right = sign[:, : h + 1] * inv, sign[:, h + 1 :] * inv
        ri = torch.view_as_real(half)
        torch.mul(ri[..., 0], left, out=out[:, 1:2, :, : h + 1])
        torch.mul(ri[..., 1], -left, out=out[:, 2:3, :, : h + 1])
        # k2 = h + 1 .. n - 1: FT(I)[k1, k2] = conj(FT(I)[-k1, n - k2])
        mirror = torch.view_as_real(half.index_select(-2, minus_k)[..., 1:h].flip(-1))
        torch.mul(mirror[..., 0], right, out=out[:, 1:2, :, h + 1 :])
        torch.mul(mirror[..., 1], right, out=out[:, 2:3, :, h + 1 :])
        return out.to(x.dtype)


def count_flops(model: nn.Module) -> int:
    """Multiply-accumulates x 2 per frame for one forward pass of a :class:`CDINN` or its folded
    inference form (convolutions, counted as direct convolutions, and dense layers)."""
    flops = 0
    size = model.config.size
    hooks = []

    def conv_hook(mod, inp, out):
        nonlocal flops
        k = mod.kernel_size[0] * mod.kernel_size[1]
        flops += 2 * out.shape[-1] * out.shape[-2] * mod.in_channels * mod.out_channels * k

    def linear_hook(mod, inp, out):
        nonlocal flops
        flops += 2 * mod.in_features * mod.out_features

    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            hooks.append(m.register_forward_hook(linear_hook))
    param = next(model.parameters())
    with torch.no_grad():
        model(torch.zeros(1, 1, size, size, device=param.device))
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
    new = CDINN(replace(cfg, convs_per_stage=2 * cfg.convs_per_stage))

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


def with_vector_phase(model: CDINN) -> CDINN:
    """The same network with the vector phase head, started close to ``model``'s function.

    The angle head's phase is ``2 pi (sigmoid(z) - 1/2)``, about ``(pi / 2) z`` for small ``z``:
    the new last convolution puts ``(pi / 2) z`` on the ``s`` channel and a constant 1 on ``c``, so
    ``atan2(s, c)`` starts out equal to the old phase where it is small (most strain), and
    fine-tuning takes it from there. Returns ``model`` itself when it has the vector head.
    """
    cfg = model.config
    if cfg.phase_head == "vector":
        return model
    new = CDINN(replace(cfg, phase_head="vector"))
    state = model.state_dict()
    last = [m for m in new.phase_decoder if isinstance(m, nn.Conv2d)][-1]
    key = max((k for k in state if k.startswith("phase_decoder.") and k.endswith(".weight")),
              key=lambda k: int(k.split(".")[1]))
    old_w, old_b = state[key], state[key[: -len("weight")] + "bias"]
    k = old_w.shape[0]  # r * r: the channels of one output map, before pixel_shuffle
    w, b = torch.zeros_like(last.weight), torch.zeros_like(last.bias)
    b[:k] = 1.0  # c
    w[k:], b[k:] = (math.pi / 2) * old_w, (math.pi / 2) * old_b  # s
    state[key], state[key[: -len("weight")] + "bias"] = w, b
    new.load_state_dict(state)
    return new


def with_patterson(model: CDINN) -> CDINN:
    """The same function with the autocorrelation input channels added (weights on them zero).

    The first convolution gets the :func:`patterson_channels` inputs with zero weights, so the
    new network computes exactly what ``model`` computes until fine-tuning puts the extra input
    to use. Returns ``model`` itself when it already has them.
    """
    cfg = model.config
    if cfg.patterson:
        return model
    new = CDINN(replace(cfg, patterson=True))
    state = model.state_dict()
    first = next(m for m in new.encoder if isinstance(m, nn.Conv2d))
    key = next(k for k in state if k.startswith("encoder.") and k.endswith(".weight"))
    w = torch.zeros_like(first.weight)
    w[:, : state[key].shape[1]] = state[key]  # pixel_unshuffle puts the amplitude's r*r channels first
    state[key] = w
    new.load_state_dict(state)
    return new
