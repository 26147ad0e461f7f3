"""Training losses (pure torch).

:func:`twin_aware_loss` scores each prediction against the ground truth and against the
truth's twin image (inverted and conjugated, same ``|F|``) and keeps the better of the two per
sample, so the network is never punished for the one ambiguity a centred ``|F|`` leaves.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..core.physics import SUPPORT_THRESHOLD, far_field_torch, twin_phase_torch, twin_torch, wrap
from ..nn.model import CDINN, phase_of

__all__ = ["sample_losses", "twin_aware_loss", "fourier_loss"]


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
    :func:`~cdinn_stream.nn.model.phase_of` the phase head's output (``(sigmoid - 1/2) 2 pi`` or
    ``atan2(s, c)``) and is scored only inside the true support. For the vector head the phase term
    is ``|(c + i s) - e^{i phase}|^2`` instead of the wrapped squared error (the same for small
    errors on the unit circle; no ``atan2``, whose gradient is undefined at ``(0, 0)``).
    Phase errors are taken modulo 2 pi (wrapped to [-pi, pi)). With ``offset_invariant``, the
    circular mean of the phase difference over the support (a global phase offset, which ``|F|``
    cannot see) is removed before the MSE and, for the angle head, only weakly penalised
    (:data:`OFFSET_ANCHOR`: it keeps the phase centred in the sigmoid's range, which the vector
    head does not have).
    ``support_weight`` adds a cross-entropy of the predicted support (amplitude above the 0.1
    threshold) against the true one: the phase is reported only on the predicted support, so its
    edge matters. ``support_pos_weight > 1`` makes a missed support pixel (whose phase is then
    reported as 0) cost more than a spurious one.
    """
    bce = F.binary_cross_entropy_with_logits(shape_logits, amplitude, reduction="none").mean(dim=(-2, -1))
    support = (amplitude > SUPPORT_THRESHOLD).to(torch.float32)
    count = support.sum(dim=(-2, -1)).clamp_min(1.0)
    if phase_logits.dim() == 4:
        mse = _vector_phase_error(phase_logits.float(), phase, support, offset_invariant) / count
    else:
        mse = _angle_phase_error(phase_logits, phase, support, count, offset_invariant)
    loss = bce + phase_weight * mse
    if support_weight:
        pos = torch.tensor(support_pos_weight, dtype=shape_logits.dtype, device=shape_logits.device)
        edge = F.binary_cross_entropy_with_logits(shape_logits - SUPPORT_LOGIT, support, reduction="none",
                                                  pos_weight=pos)
        loss = loss + support_weight * edge.mean(dim=(-2, -1))
    return loss


def _vector_phase_error(vector: torch.Tensor, phase: torch.Tensor, support: torch.Tensor,
                        offset_invariant: bool) -> torch.Tensor:
    """``sum |(c + i s) e^{-i t} - e^{i phase}|^2`` over the support, per sample: ``2 - 2 cos`` of the
    phase error where ``|(c, s)| = 1`` (the squared error for small errors), smooth everywhere, and
    it holds the vector on the unit circle. ``t``: the best global phase offset with
    ``offset_invariant`` (the minimiser, so its own gradient is not needed), else 0."""
    c, s = vector[:, 0], vector[:, 1]
    tc, ts = torch.cos(phase), torch.sin(phase)
    if offset_invariant:
        with torch.no_grad():  # angle of sum (c + i s) conj(e^{i phase}) over the support
            t = torch.atan2(((s * tc - c * ts) * support).sum(dim=(-2, -1)),
                            ((c * tc + s * ts) * support).sum(dim=(-2, -1)))[:, None, None]
        c, s = c * torch.cos(t) + s * torch.sin(t), s * torch.cos(t) - c * torch.sin(t)
    return (((c - tc) ** 2 + (s - ts) ** 2) * support).sum(dim=(-2, -1))


def _angle_phase_error(phase_logits: torch.Tensor, phase: torch.Tensor, support: torch.Tensor, count: torch.Tensor,
                       offset_invariant: bool) -> torch.Tensor:
    """The angle head's wrapped phase MSE over the support, per sample (see :func:`sample_losses`)."""
    pred_phase = phase_of(phase_logits)
    diff = wrap(pred_phase - phase) * support  # phases are angles: the error of each is taken mod 2 pi
    if offset_invariant:
        offset = torch.atan2((torch.sin(diff) * support).sum(dim=(-2, -1)),
                             (torch.cos(diff) * support).sum(dim=(-2, -1)))  # the circular mean
        centred = wrap(diff - offset[:, None, None]) * support
        mse = (centred**2).sum(dim=(-2, -1)) / count + OFFSET_ANCHOR * offset**2
    else:
        mse = (diff**2).sum(dim=(-2, -1)) / count
    return mse


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


def fourier_loss(shape_logits: torch.Tensor, phase_logits: torch.Tensor, measured_amplitude: torch.Tensor, *,
                 kind: str = "nse", photons: torch.Tensor | None = None) -> torch.Tensor:
    """Physics-aware loss: the predicted object's ``|FT(a e^{i phi})|`` against the measured amplitudes.

    Needs no ground truth, so a model can be fine-tuned on unlabelled measured frames; it is
    blind to what ``|F|`` cannot see (shift, twin, global phase). ``measured_amplitude`` is
    ``(B, N, N)`` or ``(B, 1, N, N)`` ``sqrt(I)`` on any scale (the best overall scale is fitted
    per frame). ``kind``:

    * ``"nse"``: normalised squared error ``sum (s|F| - M)^2 / sum M^2`` (the paper's chi^2);
    * ``"pearson"``: ``1 -`` the Pearson correlation of ``|F|`` and ``M``;
    * ``"poisson"``: Poisson deviance (the negative log-likelihood up to a constant; 0 for a
      perfect prediction) of the counts ``M^2 * photons / sum M^2`` given the predicted intensity
      scaled to the same total (for low counts); ``photons`` is the total count per frame,
      ``(B,)`` (default: ``sum M^2``, i.e. ``M`` are counts already).
    """
    m = measured_amplitude.reshape(shape_logits.shape).float()
    f = far_field_torch(CDINN.field(shape_logits, phase_logits)).abs()
    dims = (-2, -1)
    if kind == "nse":
        scale = (f * m).sum(dims) / (f * f).sum(dims).clamp_min(1e-12)
        return (((scale[:, None, None] * f - m) ** 2).sum(dims) / (m * m).sum(dims).clamp_min(1e-12)).mean()
    if kind == "pearson":
        fc, mc = f - f.mean(dims, keepdim=True), m - m.mean(dims, keepdim=True)
        corr = (fc * mc).sum(dims) / ((fc * fc).sum(dims) * (mc * mc).sum(dims)).sqrt().clamp_min(1e-12)
        return (1 - corr).mean()
    if kind == "poisson":
        total = (m * m).sum(dims) if photons is None else photons.float()
        counts = m * m / (m * m).sum(dims, keepdim=True).clamp_min(1e-12) * total[:, None, None]
        rate = f * f / (f * f).sum(dims, keepdim=True).clamp_min(1e-12) * total[:, None, None] + 1e-6
        deviance = rate - counts + counts * torch.log((counts + 1e-6) / rate)  # 0 where rate == counts
        return (deviance.sum(dims) / total.clamp_min(1)).mean()
    raise ValueError(f"kind must be 'nse', 'pearson' or 'poisson', not {kind!r}")
