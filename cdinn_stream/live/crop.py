"""Bragg-peak finding and cropping of detector frames (pure numpy).

A detector frame is larger than the model's window: :func:`find_peaks` locates the Bragg peak
robustly and :func:`crop_frames` cuts the model's window around it (optionally binning a
``bin``-times larger window down), so that the peak lands at index ``size // 2`` as the model
expects (:mod:`cdinn_stream.core.physics`).

Robust to: hot pixels (each pixel clipped to the largest of its 8 neighbours before the search,
so an isolated hot pixel can't win), a constant or smooth background
(the search looks for the brightest smoothed blob, not the brightest pixel), masked, dead or
NaN pixels and detector gaps (treated as 0), and a peak near the edge (the window is padded
with zeros, never shifted off the peak).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ..core.physics import CENTRE_WINDOW

__all__ = ["Crops", "box_sum", "clean_frames", "despeckle", "find_peaks", "centre_of_mass_peaks", "crop_frames",
           "crop_around_peaks"]


@dataclass
class Crops:
    """Cropped windows and where they came from.

    Attributes:
        frames: ``(N, size, size)`` float32 crops (binned when ``bin > 1``), peak at ``size // 2``.
        origins: ``(N, 2)`` int (row, column) of the window's top-left corner in the frame (it can
            be negative or past the edge: that part of the window is zero padding).
        peaks: ``(N, 2)`` int (row, column) of the Bragg peak in the frame.
    """

    frames: np.ndarray
    origins: np.ndarray
    peaks: np.ndarray


def clean_frames(frames: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """``(N, H, W)`` float32 copies with NaN/inf, negative and masked-out pixels set to 0.

    ``mask`` is ``(H, W)`` bool, True where a pixel is good (gaps and dead pixels False).
    """
    x = np.array(frames, dtype=np.float32, copy=True)
    if x.ndim == 2:
        x = x[None]
    bad = ~np.isfinite(x) | (x < 0)
    if mask is not None:
        bad |= ~np.asarray(mask, bool)[None]
    x[bad] = 0
    return x


def despeckle(frames: np.ndarray) -> np.ndarray:
    """Each pixel of ``(N, H, W)`` frames clipped to the largest of its 8 neighbours: an isolated
    hot pixel drops to its surroundings, a Bragg peak (bright neighbours) is untouched. About 20x
    cheaper than a 3x3 median filter, which matters at thousands of frames per second."""
    n, h, w = frames.shape
    padded = np.zeros((n, h + 2, w + 2), frames.dtype)
    padded[:, 1:-1, 1:-1] = frames
    row3 = np.maximum(padded[:, :, :-2], padded[:, :, 1:-1])  # max of 3 along each padded row
    np.maximum(row3, padded[:, :, 2:], out=row3)
    around = np.maximum(row3[:, :-2], row3[:, 2:])  # the rows above and below
    np.maximum(around, padded[:, 1:-1, :-2], out=around)  # left and right
    np.maximum(around, padded[:, 1:-1, 2:], out=around)
    return np.minimum(frames, around, out=around)


def box_sum(frames: np.ndarray, box: int) -> np.ndarray:
    """Sum over the ``box x box`` window around each pixel of ``(N, H, W)`` frames, zero outside
    (``box * box`` times ``scipy.ndimage.uniform_filter(..., mode="constant")``, same centring):
    ``2 * (box - 1)`` shifted adds, about 3x cheaper than the filter on small frames."""
    n, h, w = frames.shape
    before = box // 2
    padded = np.zeros((n, h + box - 1, w + box - 1), np.result_type(frames.dtype, np.float32))  # no int wrap
    padded[:, before : before + h, before : before + w] = frames
    rows = padded[:, :h].copy()
    for k in range(1, box):
        rows += padded[:, k : k + h]
    out = rows[:, :, :w].copy()
    for k in range(1, box):
        out += rows[:, :, k : k + w]
    return out


#: Frames at least this many times ``box`` on each side are searched 2x2-binned (4x fewer pixels).
BIN_SEARCH_FACTOR = 8


def find_peaks(frames: np.ndarray, *, box: int = 5, centre: bool = True) -> np.ndarray:
    """Bragg peak (row, column) of each of ``(N, H, W)`` clean frames.

    First the brightest blob: the maximum of the despeckled frame (:func:`despeckle`) summed
    over ``box x box`` (a hot pixel or noise does not win), searched on 2x2-binned frames (with a
    ``box // 2 + 1`` box) when they are large (at least ``8 * box`` on each side; 4x fewer
    pixels); then the brightest pixel of the frame within ``box // 2`` (one more when binned)
    of it, or (``centre``, the default) the brightest 3x3 blob there and then the rounded centre of
    mass of the 7x7 pixels around it (:func:`centre_of_mass_peaks`): where the mean lattice puts
    the peak, the centring rule of the model (:func:`cdinn_stream.core.physics.peak_offsets`).
    """
    n, h, w = frames.shape
    f = 2 if min(h, w) >= BIN_SEARCH_FACTOR * box else 1
    search = frames
    if f == 2:  # 2x2 binning by strided adds (much faster than a reshape-and-sum)
        rows = frames[:, 0 : h - 1 : 2] + frames[:, 1:h:2]
        search = rows[:, :, 0 : w - 1 : 2] + rows[:, :, 1:w:2]
    b = box if f == 1 else box // 2 + 1  # about the same blob size in binned pixels
    x = box_sum(despeckle(search), b)
    coarse = np.stack(np.unravel_index(x.reshape(n, -1).argmax(axis=1), x.shape[1:]), axis=1) * f + f // 2
    half = box // 2 + (f - 1)
    offsets = np.arange(-half, half + 1)
    rows = (coarse[:, 0, None] + offsets).clip(0, h - 1)
    cols = (coarse[:, 1, None] + offsets).clip(0, w - 1)
    local = frames[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]
    if centre:  # the brightest 3x3 blob near the coarse peak, as the model's rule has it
        wide = np.arange(-half - 1, half + 2)
        r_all, c_all = coarse[:, 0, None] + wide, coarse[:, 1, None] + wide
        valid = ((r_all >= 0) & (r_all < h))[:, :, None] & ((c_all >= 0) & (c_all < w))[:, None, :]
        around = frames[np.arange(n)[:, None, None], r_all.clip(0, h - 1)[:, :, None], c_all.clip(0, w - 1)[:, None, :]]
        local = box_sum(around * valid, 3)[:, 1:-1, 1:-1]  # each candidate's full 3x3 blob, off-frame pixels 0
        local = np.where(((r_all[:, 1:-1] >= 0) & (r_all[:, 1:-1] < h))[:, :, None]
                         & ((c_all[:, 1:-1] >= 0) & (c_all[:, 1:-1] < w))[:, None, :], local, -np.inf)
    r, c = np.unravel_index(local.reshape(n, -1).argmax(axis=1), local.shape[1:])
    brightest = np.stack([rows[np.arange(n), r], cols[np.arange(n), c]], axis=1).astype(np.int64)
    return centre_of_mass_peaks(frames, brightest) if centre else brightest


def centre_of_mass_peaks(frames: np.ndarray, peaks: np.ndarray, *, window: int = CENTRE_WINDOW) -> np.ndarray:
    """``peaks`` moved to the rounded intensity-weighted centre of mass of the
    ``(2 window + 1)**2`` pixels around each (inside the frame): the centring rule of
    :func:`cdinn_stream.core.physics.peak_offsets`, so that the model finds its crops centred."""
    n, h, w = frames.shape
    offsets = np.arange(-window, window + 1)
    rows = peaks[:, 0, None] + offsets
    cols = peaks[:, 1, None] + offsets
    ok_r, ok_c = (rows >= 0) & (rows < h), (cols >= 0) & (cols < w)
    local = frames[np.arange(n)[:, None, None], rows.clip(0, h - 1)[:, :, None], cols.clip(0, w - 1)[:, None, :]]
    local = local * (ok_r[:, :, None] & ok_c[:, None, :])
    mass = local.sum(axis=(1, 2), dtype=np.float64)
    dy = (local.sum(axis=2, dtype=np.float64) * offsets).sum(axis=1) / np.maximum(mass, 1e-30)
    dx = (local.sum(axis=1, dtype=np.float64) * offsets).sum(axis=1) / np.maximum(mass, 1e-30)
    moved = peaks + np.rint(np.stack([dy, dx], axis=1)).astype(np.int64)
    return np.where(mass[:, None] > 0, moved, peaks)


def crop_frames(frames: np.ndarray, peaks: np.ndarray, size: int, *, bin: int = 1) -> Crops:
    """Cut ``size * bin`` windows centred on ``peaks`` out of ``(N, H, W)`` clean frames and bin
    them ``bin x bin`` down to ``size x size``; the peak pixel lands in bin ``size // 2``.

    One strided gather of the windows (the frames are zero-padded first only when a window
    reaches past an edge): about 10x cheaper than indexing every pixel."""
    n, h, w = frames.shape
    window = size * bin
    origins = (np.asarray(peaks) - (size // 2) * bin - bin // 2).astype(np.int64).reshape(n, 2)
    if n == 0:
        return Crops(np.zeros((0, size, size), np.float32), origins, origins.copy())  # no peaks either
    before = np.maximum(-origins.min(axis=0), 0)  # padding rows/columns needed before and after
    after = np.maximum((origins + window).max(axis=0) - (h, w), 0)
    if before.any() or after.any():
        padded = np.zeros((n, h + before[0] + after[0], w + before[1] + after[1]), frames.dtype)
        padded[:, before[0] : before[0] + h, before[1] : before[1] + w] = frames
        frames = padded
    windows = sliding_window_view(frames, (window, window), axis=(1, 2))
    out = windows[np.arange(n), origins[:, 0] + before[0], origins[:, 1] + before[1]].astype(np.float32)
    if bin > 1:
        out = out.reshape(n, size, bin, size, bin).sum(axis=(2, 4))
    return Crops(out, origins, np.asarray(peaks).astype(np.int64))


def crop_around_peaks(frames: np.ndarray, size: int, *, bin: int = 1, mask: np.ndarray | None = None) -> Crops:
    """Clean, find the Bragg peak and crop, for ``(H, W)`` or ``(N, H, W)`` frames."""
    clean = clean_frames(frames, mask)
    if clean.shape[-1] < 3 or clean.shape[-2] < 3:
        raise ValueError(f"frames of shape {clean.shape[-2:]} are too small to search for a peak")
    return crop_frames(clean, find_peaks(clean), size, bin=bin)
