"""Training losses (pure torch).

:func:`twin_aware_loss` scores each prediction against the ground truth and against the
truth's twin image (inverted and conjugated, same ``|F|``) and keeps the better of the two per
sample, so the network is never punished for the one ambiguity a centred ``|F|`` leaves.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .physics import SUPPORT_THRESHOLD, twin_phase_torch, twin_torch

__all__ = ["sample_losses", "twin_aware_loss"]


#: Weight of the mean phase offset in the offset-invariant phase loss: it only keeps the
#: network's phase centred in its sigmoid range.
OFFSET_ANCHOR = 0.1


#: Logit of the support threshold: the shape logits cross it on the predicted support's edge.
SUPPORT_LOGIT = math.log(SUPPORT_THRESHOLD / (1 - SUPPORT_THRESHOLD))


def sample_losses(
    shape_logits: torch.Tensor, phase_logits: torch.Tensor, amplitude: torch.Tensor, phase: torch.Tensor,
    *, phase_weight: float = 1.0, offset_invariant: bool = False, support_weight: float = 0.0,
    support_pos_weight: float = 1.0,
) -> torch.Tensor:
    """Per-sample loss ``(B,)``: shape cross-entropy + ``phase_weight`` x phase MSE in the support.

    ``amplitude`` and ``phase`` are the targets ``(B, N, N)``; the phase prediction is
    ``(sigmoid(phase_logits) - 0.5) * 2 pi`` and is scored only inside the true support.
    With ``offset_invariant``, the mean phase difference over the support (a global phase
    offset, which ``|F|`` cannot see) is removed before the MSE and only weakly penalised
    (:data:`OFFSET_ANCHOR`). ``support_weight`` adds a cross-entropy of the predicted support
    (amplitude above the 0.1 threshold) against the true one: the phase is reported only on the
    predicted support, so its edge matters. ``support_pos_weight > 1`` makes a missed support
    pixel (whose phase is then reported as 0) cost more than a spurious one.
    """
    bce = F.binary_cross_entropy_with_logits(shape_logits, amplitude, reduction="none").mean(dim=(-2, -1))
    pred_phase = (torch.sigmoid(phase_logits) - 0.5) * (2 * math.pi)
    support = (amplitude > SUPPORT_THRESHOLD).to(pred_phase.dtype)
    count = support.sum(dim=(-2, -1)).clamp_min(1.0)
    diff = (pred_phase - phase) * support
    if offset_invariant:
        offset = diff.sum(dim=(-2, -1)) / count
        centred = (diff - offset[:, None, None]) * support
        mse = (centred**2).sum(dim=(-2, -1)) / count + OFFSET_ANCHOR * offset**2
    else:
        mse = (diff**2).sum(dim=(-2, -1)) / count
    loss = bce + phase_weight * mse
    if support_weight:
        pos = torch.tensor(support_pos_weight, dtype=shape_logits.dtype, device=shape_logits.device)
        edge = F.binary_cross_entropy_with_logits(shape_logits - SUPPORT_LOGIT, support, reduction="none",
                                                  pos_weight=pos)
        loss = loss + support_weight * edge.mean(dim=(-2, -1))
    return loss


def twin_aware_loss(
    shape_logits: torch.Tensor, phase_logits: torch.Tensor, amplitude: torch.Tensor, phase: torch.Tensor,
    *, phase_weight: float = 1.0, offset_invariant: bool = False, support_weight: float = 0.0,
    support_pos_weight: float = 1.0,
) -> torch.Tensor:
    """Mean over the batch of the better of (truth, twin of truth) for each sample."""
    kw = {"phase_weight": phase_weight, "offset_invariant": offset_invariant, "support_weight": support_weight,
          "support_pos_weight": support_pos_weight}
    direct = sample_losses(shape_logits, phase_logits, amplitude, phase, **kw)
    mirrored = sample_losses(shape_logits, phase_logits, twin_torch(amplitude), twin_phase_torch(phase), **kw)
    return torch.minimum(direct, mirrored).mean()
