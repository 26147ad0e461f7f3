"""The inference form of a :class:`~cdinn_stream.nn.model.CDINN`: the same function, fewer operations.

With space-to-depth the deepest stages of the network work on 2x2 and 1x1 grids. There a 3x3
convolution with zero padding wastes most of its multiply-adds on the padding (at 1x1 only the
centre tap sees data), and an up-sampling followed by a convolution repeats each input four
times. Each such linear step, a convolution alone or nearest up-sampling then a convolution, is
one fixed linear map of its input, so on a grid of fewer than ``3 x 3`` pixels it costs fewer
operations as one dense matrix (a ``Linear`` layer) than as a convolution. :func:`fold` measures
that matrix by sending the basis vectors through the step (in float64) and rebuilds the network
with those steps as ``Linear`` layers on flattened activations. For the default ``cdinn-32``
(32x32, space-to-depth 4) this takes the multiply-adds from 5.6 M to 3.6 M per frame; the
results equal the trained network's to float rounding (``tests/unit/test_folding.py``; in bf16,
to bf16 rounding).

The pixel (un)shuffles at the ends become one strided copy each, in the channels-last layout
the convolutions use. The folded network is for inference only: it is rebuilt from the trained
network, which stays the one that is saved, trained and loaded.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator

import torch
from torch import nn

from .model import CDINN, ModelConfig, patterson_channels

__all__ = ["FoldedCDINN", "fold"]

#: a linear step on a grid of fewer pixels than this becomes a dense matrix (a 3x3 convolution
#: costs 9 multiply-adds per output pixel and channel pair, a dense map ``h*w``: a 3x3 grid ties)
_DENSE_BELOW_PIXELS = 9


class Flatten(nn.Module):
    """``(B, C, h, w)`` to ``(B, h*w*C)``, channels last (a view of channels-last activations)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 2, 3, 1).reshape(x.shape[0], -1)


class _ShapedStep(nn.Module):
    """A step on flattened activations that needs their ``(C, h, w)`` shape."""

    def __init__(self, shape: tuple[int, int, int]):
        super().__init__()
        self.shape = shape


class Unflatten(_ShapedStep):
    """``(B, h*w*C)`` to ``(B, C, h, w)``, channels-last in memory (a view)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c, h, w = self.shape
        return x.reshape(x.shape[0], h, w, c).permute(0, 3, 1, 2)


class FlatMaxPool(_ShapedStep):
    """2x2 max-pooling of flattened ``(B, h*w*C)`` activations."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c, h, w = self.shape
        return x.view(x.shape[0], h // 2, 2, w // 2, 2, c).amax(dim=(2, 4)).reshape(x.shape[0], -1)


@torch.no_grad()
def _dense(step: nn.Sequential, shape: tuple[int, int, int]) -> tuple[nn.Linear, tuple[int, int, int]]:
    """The linear map ``step`` applies to ``(C, h, w)`` inputs, as a ``Linear`` layer on flattened
    channels-last activations (``h*w*C``, see :class:`Flatten`), and its output shape."""
    step = copy.deepcopy(step).to(torch.float64)
    c, h, w = shape
    n = c * h * w

    def flat_step(x: torch.Tensor) -> torch.Tensor:
        y = step(x.view(x.shape[0], h, w, c).permute(0, 3, 1, 2))
        return y.permute(0, 2, 3, 1).reshape(x.shape[0], -1), tuple(y.shape[1:])

    bias, out_shape = flat_step(torch.zeros(1, n, dtype=torch.float64))
    matrix = flat_step(torch.eye(n, dtype=torch.float64))[0] - bias
    layer = nn.Linear(n, bias.shape[1])
    layer.weight.copy_(matrix.T)
    layer.bias.copy_(bias[0])
    return layer, out_shape


def _linear_steps(modules: list[nn.Module]) -> Iterator[tuple[nn.Module, ...]]:
    """Group a stage list into steps: ``(Upsample, Conv2d)`` pairs, or one module each."""
    i = 0
    while i < len(modules):
        pair = modules[i : i + 2]
        if len(pair) == 2 and isinstance(pair[0], nn.Upsample) and isinstance(pair[1], nn.Conv2d):
            yield tuple(pair)
            i += 2
        else:
            yield (modules[i],)
            i += 1


@torch.no_grad()
def _fold_stages(stages: nn.Sequential, shape: tuple[int, int, int], flat: bool
                 ) -> tuple[nn.Sequential, tuple[int, int, int], bool, int]:
    """Rewrite a Sequential of convolutions, ReLUs, poolings and up-samplings; returns the new
    Sequential, the output shape ``(C, h, w)``, whether the output is flattened, and the number
    of steps made dense."""
    out: list[nn.Module] = []
    dense = 0
    for step in _linear_steps(list(stages)):
        c, h, w = shape
        if isinstance(step[-1], nn.Conv2d) and h * w < _DENSE_BELOW_PIXELS:
            if not flat:
                out.append(Flatten())
                flat = True
            layer, shape = _dense(nn.Sequential(*step), shape)
            out.append(layer)
            dense += 1
            continue
        if flat and isinstance(step[0], nn.ReLU):
            out.append(nn.ReLU(inplace=True))
            continue
        if flat and isinstance(step[0], nn.MaxPool2d) and step[0].kernel_size in (2, (2, 2)) and h % 2 == w % 2 == 0:
            out.append(FlatMaxPool(shape))
            shape = (c, h // 2, w // 2)
            continue
        if flat:
            out.append(Unflatten(shape))
            flat = False
        out.extend(copy.deepcopy(m) for m in step)
        shape = tuple(nn.Sequential(*step)(torch.zeros(1, *shape)).shape[1:])
    return nn.Sequential(*out), shape, flat, dense


#: a dtype whose element is ``k`` bytes, to move runs of ``k`` bytes as one element (bit-exact copies)
_CHUNK_DTYPES = {2: torch.int16, 4: torch.int32, 8: torch.int64, 16: torch.complex128}


def _as_chunks(x: torch.Tensor, run: int) -> torch.Tensor | None:
    """``x`` (last dimension contiguous, a multiple of ``run`` long) with each run of ``run``
    elements viewed as one element, or ``None`` when no dtype is that wide. Strided copies of
    4-element runs are about 5x slower than of single wide elements."""
    dtype = _CHUNK_DTYPES.get(run * x.element_size())
    if (dtype is None or x.stride(-1) != 1 or x.shape[-1] % run or x.storage_offset() % run
            or any(stride % run for stride in x.stride()[:-1])):
        return None
    return x.view(dtype)


def space_to_depth(x: torch.Tensor, r: int) -> torch.Tensor:
    """``pixel_unshuffle(x, r)`` as one copy, channels-last in memory: ``(B, C, N, N)`` to
    ``(B, C*r*r, N/r, N/r)``."""
    b, c, big, _ = x.shape
    n = big // r
    x = x.contiguous()
    chunks = _as_chunks(x, r)
    if chunks is None:
        y = x.reshape(b, c, n, r, n, r).permute(0, 2, 4, 1, 3, 5).contiguous()
    else:  # (b, c, n, i, n): each element is a run of r pixels along the row
        y = chunks.reshape(b, c, n, r, n).permute(0, 2, 4, 1, 3).contiguous().view(x.dtype)
    return y.reshape(b, n, n, c * r * r).permute(0, 3, 1, 2)


def depth_to_space(y: torch.Tensor, r: int) -> torch.Tensor:
    """``pixel_shuffle(y, r)[:, 0]`` in float32 for ``y`` ``(B, r*r, n, n)``, as one copy:
    ``(B, N, N)``, a new tensor."""
    b, _, n, _ = y.shape
    hwc = y.permute(0, 2, 3, 1)  # a view when y is channels-last
    chunks = _as_chunks(hwc.contiguous(), r)
    if chunks is None:
        out = hwc.reshape(b, n, n, r, r).transpose(2, 3).contiguous()
    else:  # (b, n, n, i): each element is row i of a block, r pixels
        out = chunks.reshape(b, n, n, r).transpose(2, 3).contiguous().view(y.dtype)
    out = out.reshape(b, n * r, n * r)
    return out.float() if out.dtype != torch.float32 else out


class FoldedCDINN(nn.Module):
    """A :class:`CDINN`'s function with its small-grid steps as dense matrices (see the module
    docstring). Same :meth:`forward_logits`, :meth:`forward` and :attr:`config`; inference only."""

    def __init__(self, network: CDINN):
        super().__init__()
        self.config: ModelConfig = network.config
        r = self.config.space_to_depth
        encoder = [m for m in network.encoder if not isinstance(m, nn.PixelUnshuffle)]
        n = self.config.size // r
        channels = r * r * (3 if self.config.patterson else 1)
        self.encoder, shape, flat, dense = _fold_stages(nn.Sequential(*encoder), (channels, n, n), False)
        decoders = []
        for decoder in (network.shape_decoder, network.phase_decoder):
            stages = [m for m in decoder if not isinstance(m, nn.PixelShuffle)]
            folded, out_shape, out_flat, d = _fold_stages(nn.Sequential(*stages), shape, flat)
            if out_flat:
                folded.append(Unflatten(out_shape))
            decoders.append(folded)
            dense += d
        self.shape_decoder, self.phase_decoder = decoders
        #: linear steps computed as dense matrices
        self.dense_steps = dense

    def forward_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw outputs for shape and phase, as :meth:`CDINN.forward_logits` (new float32 tensors)."""
        r = self.config.space_to_depth
        x = patterson_channels(x) if self.config.patterson else x
        z = self.encoder(space_to_depth(x, r) if r > 1 else x)
        return decoder_outputs(self.shape_decoder(z), self.phase_decoder(z), self.config)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Amplitude in [0, 1] and phase in [-pi, pi], each ``(B, N, N)`` float32, as
        :meth:`CDINN.forward` (computed in place on the new logits tensors)."""
        return outputs_inplace(*self.forward_logits(x))


def decoder_outputs(shape: torch.Tensor, phase: torch.Tensor, config: ModelConfig
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The decoders' last outputs ``(B, k r^2, n, n)`` as :meth:`CDINN.forward_logits` gives them:
    shape ``(B, N, N)``, phase ``(B, N, N)`` (angle head) or ``(B, 2, N, N)`` (vector head), new
    float32 tensors."""
    r = config.space_to_depth
    if r == 1:
        return shape[:, 0].float().clone(), (phase.float().clone() if config.phase_head == "vector"
                                             else phase[:, 0].float().clone())
    if config.phase_head == "vector":
        return depth_to_space(shape, r), torch.stack([depth_to_space(phase[:, : r * r], r),
                                                      depth_to_space(phase[:, r * r :], r)], dim=1)
    return depth_to_space(shape, r), depth_to_space(phase, r)


def outputs_inplace(shape: torch.Tensor, phase: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:meth:`CDINN.outputs` on new float32 logits, in place where it can be."""
    if phase.dim() == 4:
        return shape.sigmoid_(), torch.atan2(phase[:, 1], phase[:, 0])
    return shape.sigmoid_(), phase.sigmoid_().sub_(0.5).mul_(2 * math.pi)


def fold(network: CDINN) -> CDINN | FoldedCDINN:
    """The inference form of ``network`` (see the module docstring), in eval mode on ``network``'s
    device, made from its weights now (later changes to ``network`` do not reach it); ``network``
    itself, unchanged, when none of its steps would be cheaper dense (e.g. without space-to-depth,
    where the smallest grid is 4x4)."""
    device = next(network.parameters()).device
    folded = FoldedCDINN(copy.deepcopy(network).cpu().float().eval())
    if folded.dense_steps == 0:
        return network
    return folded.to(device).eval()
