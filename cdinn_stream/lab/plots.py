"""Figures like the paper's Figs. 3-5 (matplotlib, written to PNG; no display needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..core.physics import masked_phase

__all__ = ["plot_examples", "plot_chi2_extremes"]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _row(ax, images, cmap, vmin=None, vmax=None, label=""):
    for j, img in enumerate(images):
        ax[j].imshow(img, cmap=cmap, vmin=vmin, vmax=vmax)
        ax[j].set_xticks([])
        ax[j].set_yticks([])
    ax[0].set_ylabel(label, fontsize=8)


def plot_examples(path: Path, intensity, truth_amp, truth_phase, nn_amp, nn_phase,
                  pr_amp=None, pr_phase=None, n: int = 6, phase_label: str = "phase") -> None:
    """Fig. 3: input, true and predicted shape and phase (and ER/HIO), one column per sample;
    ``phase_label`` names what the phase rows show (``"strain"`` for strain views)."""
    plt = _plt()
    rows = 7 if pr_amp is not None else 5
    fig, ax = plt.subplots(rows, n, figsize=(1.6 * n, 1.6 * rows), dpi=110, squeeze=False)
    pi = np.pi
    _row(ax[0], np.sqrt(intensity[:n]), "viridis", label="input |F|")
    _row(ax[1], truth_amp[:n], "gray", 0, 1, "true shape")
    _row(ax[2], nn_amp[:n], "gray", 0, 1, "NN shape")
    _row(ax[3], truth_phase[:n], "twilight_shifted", -pi, pi, f"true {phase_label}")
    _row(ax[4], masked_phase(nn_amp[:n], nn_phase[:n]), "twilight_shifted", -pi, pi, f"NN {phase_label}")
    if pr_amp is not None:
        _row(ax[5], pr_amp[:n], "gray", None, None, "ER/HIO shape")
        _row(ax[6], pr_phase[:n], "twilight_shifted", -pi, pi, f"ER/HIO {phase_label}")
    fig.suptitle("Examples (phase in radians; twins and shifts are equivalent solutions)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_chi2_extremes(path: Path, chi2, intensity, predicted_intensity, truth_amp, nn_amp,
                       truth_phase, nn_phase, *, worst: bool, k: int = 5, phase_label: str = "phase") -> None:
    """Figs. 4 / 5: chi^2 histogram and the ``k`` best (or worst) predictions."""
    plt = _plt()
    order = np.argsort(chi2)
    pick = order[-k:][::-1] if worst else order[:k]
    fig = plt.figure(figsize=(2 + 1.5 * k, 9), dpi=110)
    gs = fig.add_gridspec(7, k + 2)
    hist = fig.add_subplot(gs[:, :2])
    hist.hist(chi2, bins=50, color="tab:blue")
    hist.set_xlabel("chi^2")
    hist.set_ylabel("frames")
    hist.set_title("worst" if worst else "best", fontsize=9)
    rows = [("input |F|", np.sqrt(intensity), "viridis", None, None),
            ("predicted |F|", np.sqrt(predicted_intensity), "viridis", None, None),
            ("true shape", truth_amp, "gray", 0, 1), ("NN shape", nn_amp, "gray", 0, 1),
            (f"true {phase_label}", truth_phase, "twilight_shifted", -np.pi, np.pi),
            (f"NN {phase_label}", masked_phase(nn_amp, nn_phase), "twilight_shifted", -np.pi, np.pi)]
    for r, (label, arr, cmap, vmin, vmax) in enumerate(rows):
        for j, i in enumerate(pick):
            a = fig.add_subplot(gs[r, j + 2])
            a.imshow(arr[i], cmap=cmap, vmin=vmin, vmax=vmax)
            a.set_xticks([])
            a.set_yticks([])
            if j == 0:
                a.set_ylabel(label, fontsize=7)
            if r == 0:
                a.set_title(f"chi2={chi2[i]:.3g}", fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
