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

from dataclasses import dataclass, field

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ..core.physics import CENTRE_WINDOW

__all__ = ["Crops", "box_sum", "clean_frames", "despeckle", "find_peaks", "coarse_peaks", "good_bins", "Scratch",
           "windows_around", "centre_of_mass_peaks", "crop_frames", "crop_around_peaks", "PeakTracker",
           "window_origins", "cut_windows"]


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
    if getattr(getattr(frames, "dtype", None), "kind", "") in ("u", "b"):
        # unsigned counts (as detectors give them) are finite and not negative: only the mask to apply
        if mask is not None:
            x *= np.asarray(mask, bool)
        return x
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
    return _despeckle_padded(padded)


def _despeckle_padded(padded: np.ndarray) -> np.ndarray:
    """:func:`despeckle` of the frames inside ``padded`` (a one-pixel border of zeros around them)."""
    frames = padded[:, 1:-1, 1:-1]
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
#: ... and at least this many times, 4x4-binned (16x fewer: whole detector frames).
WIDE_BIN_SEARCH_FACTOR = 40


#: frames searched together by :func:`find_peaks`, in bytes of float32 pixels: large stacks are
#: taken in chunks of about this size, whose temporaries stay in cache and are reused rather than
#: freshly mapped (3.6x faster on pages of 100 search windows of 136 x 136)
SEARCH_CHUNK_BYTES = 2 << 20


def find_peaks(frames: np.ndarray, *, box: int = 5, centre: bool = True) -> np.ndarray:
    """Bragg peak (row, column) of each of ``(N, H, W)`` clean frames.

    First the brightest blob: the maximum of the despeckled frame (:func:`despeckle`) summed
    over ``box x box`` (a hot pixel or noise does not win), searched on 2x2-binned frames (with a
    ``box // 2 + 1`` box) when they are large (at least ``8 * box`` on each side; 4x fewer
    pixels) and on 4x4-binned ones (a 3-bin box) when they are at least ``40 * box`` (whole
    detector frames); then the brightest pixel of the frame within ``box // 2`` (``f - 1`` more
    when binned ``f x f``) of it, or (``centre``, the default) the brightest 3x3 blob there and
    then the rounded centre of mass of the 7x7 pixels around it (:func:`centre_of_mass_peaks`):
    where the mean lattice puts the peak, the centring rule of the model
    (:func:`cdinn_stream.core.physics.peak_offsets`).
    """
    n, h, w = frames.shape
    chunk = max(1, SEARCH_CHUNK_BYTES // max(4 * h * w, 1))
    if n > chunk:
        return np.concatenate([_find_peaks(frames[i : i + chunk], box, centre) for i in range(0, n, chunk)])
    return _find_peaks(frames, box, centre)


def _find_peaks(frames: np.ndarray, box: int, centre: bool) -> np.ndarray:
    n, h, w = frames.shape
    f = 4 if min(h, w) >= WIDE_BIN_SEARCH_FACTOR * box else 2 if min(h, w) >= BIN_SEARCH_FACTOR * box else 1
    search = frames
    if f > 1:  # f x f binning by strided adds (much faster than a reshape-and-sum)
        rows = frames[:, 0 : h - f + 1 : f].copy()
        for k in range(1, f):
            rows += frames[:, k : h - f + 1 + k : f]
        search = rows[:, :, 0 : w - f + 1 : f].copy()
        for k in range(1, f):
            search += rows[:, :, k : w - f + 1 + k : f]
    b = box if f == 1 else box // 2 + 1 if f == 2 else 3  # about the blob's size in binned pixels, odd (centred)
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


#: frames :func:`coarse_peaks` bins at once, in bytes of 32-bit pixels (its work arrays hold about
#: a quarter of that): a page of 4M frames is taken 3 at a time, not 100
COARSE_CHUNK_BYTES = 64 << 20


class Scratch:
    """Work arrays kept from one call of :func:`coarse_peaks` to the next (one per caller: not
    shared between threads). A whole detector frame's temporaries, allocated afresh each call,
    go back to the kernel when freed and are page-faulted in again on the next: 3x the cost of the
    adds themselves on a 1M frame."""

    def __init__(self) -> None:
        self._arrays: dict[str, np.ndarray] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """The first ``shape[0]`` frames of the array kept under ``name`` (zeros when first made:
        borders written once stay zero; made anew for a frame shape or dtype it does not have)."""
        a = self._arrays.get(name)
        if a is None or a.shape[1:] != tuple(shape[1:]) or a.shape[0] < shape[0] or a.dtype != dtype:
            a = self._arrays[name] = np.zeros(shape, dtype)
        return a[: shape[0]]


def coarse_peaks(frames: np.ndarray, good_bins: np.ndarray | None = None, *, f: int = 4,
                 scratch: Scratch | None = None) -> np.ndarray:
    """Where the Bragg peak of each raw ``(N, H, W)`` frame roughly is, ``(N, 2)`` (row, column),
    in about one pass over the frame: summed ``f x f`` straight from the raw counts (any dtype;
    nothing cleaned first), bins with a bad pixel dropped (``good_bins``: :func:`good_bins` of the
    mask), NaN, infinite and negative bins set to 0, then the brightest despeckled ``3 x 3``-bin blob.
    Within ``f`` or so pixels of where :func:`find_peaks` puts the peak: search a window around it
    with that to get the peak itself (:class:`PeakTracker` does). ``scratch`` keeps the work
    arrays for the next call (:class:`Scratch`)."""
    n, h, w = frames.shape
    chunk = max(1, COARSE_CHUNK_BYTES // max(4 * h * w, 1))
    if n > chunk:  # a page of whole detector frames: a few at a time (the work arrays stay small)
        return np.concatenate([coarse_peaks(frames[i : i + chunk], good_bins, f=f, scratch=scratch)
                               for i in range(0, n, chunk)])
    hb, wb = h // f, w // f
    scratch = scratch or Scratch()
    kind, size = frames.dtype.kind, frames.dtype.itemsize
    # integer counts are summed as integers (as fast as one frame.sum(); a bin of garbage that
    # wraps around is a bad bin, dropped or despeckled), narrow ones widened to 32 bits first
    work = (frames.dtype if kind in "ui" and size >= 4 else np.dtype(np.uint32) if kind in "ub"
            else np.dtype(np.int32) if kind == "i" else np.dtype(np.float32))
    # rows summed by one reduction over a reshaped axis (contiguous adds: strided row copies cost
    # 2x more), then the columns by f strided adds on a quarter of the pixels
    rows = np.add.reduce(frames[:, : hb * f].reshape(n, hb, f, w), axis=2, dtype=work,
                         out=scratch.get("rows", (n, hb, w), work))
    binned = scratch.get("binned", (n, hb, wb), work)
    np.copyto(binned, rows[:, :, 0 : wb * f : f])
    for k in range(1, f):
        binned += rows[:, :, k : wb * f : f]
    padded = scratch.get("padded", (n, hb + 2, wb + 2), np.dtype(np.float32))  # a border of zeros
    search = padded[:, 1:-1, 1:-1]
    if good_bins is not None:
        np.multiply(binned, good_bins, out=search)
    else:
        np.copyto(search, binned)
    if kind == "f":
        np.nan_to_num(search, copy=False, nan=0.0, posinf=0.0, neginf=0.0)
    if kind in "fi":
        np.maximum(search, 0, out=search)
    x = box_sum(_despeckle_padded(padded), 3)  # an odd box, centred on its bin (whose centre is f // 2 in)
    r, c = np.unravel_index(x.reshape(n, -1).argmax(axis=1), x.shape[1:])
    return np.stack([r, c], axis=1).astype(np.int64) * f + f // 2


def good_bins(mask: np.ndarray, f: int = 4) -> np.ndarray:
    """``(H // f, W // f)`` float32: 1 where an ``f x f`` bin of ``mask`` (True: good pixel) is all good."""
    h, w = mask.shape
    return mask[: h // f * f, : w // f * f].reshape(h // f, f, w // f, f).all(axis=(1, 3)).astype(np.float32)


def windows_around(frames: np.ndarray, origins: np.ndarray, size: int, mask: np.ndarray | None = None) -> np.ndarray:
    """``(N, size, size)`` float32 clean windows (as :func:`clean_frames`) of raw ``(N, H, W)``
    frames at ``origins`` (row, column of the top-left corner; zero beyond the frame's edges)."""
    n, h, w = frames.shape
    out = np.zeros((n, size, size), np.float32)
    for i, (r, c) in enumerate(np.asarray(origins, np.int64)):
        r0, c0, r1, c1 = max(r, 0), max(c, 0), min(r + size, h), min(c + size, w)
        if r1 > r0 and c1 > c0:
            out[i, r0 - r : r1 - r, c0 - c : c1 - c] = frames[i, r0:r1, c0:c1]
            if mask is not None:
                out[i, r0 - r : r1 - r, c0 - c : c1 - c] *= mask[r0:r1, c0:c1]
    if getattr(frames, "dtype", np.dtype(np.float32)).kind not in ("u", "b"):
        np.nan_to_num(out, copy=False, nan=0.0, posinf=0.0, neginf=0.0)
        np.maximum(out, 0, out=out)
    return out


def window_origins(peaks: np.ndarray, side: tuple[int, int], shape: tuple[int, int]) -> np.ndarray:
    """``(N, 2)`` top-left corners of ``side`` (rows, columns) windows centred on ``peaks``,
    moved where needed to lie inside frames of ``shape`` (a window never reaches past an edge:
    a peak near the edge is off the window's centre instead)."""
    limit = np.maximum(np.asarray(shape[-2:], np.int64) - side, 0)
    origins = np.asarray(peaks, np.int64).reshape(-1, 2) - np.asarray(side, np.int64) // 2
    return np.clip(origins, 0, limit)


def cut_windows(frames: np.ndarray, origins: np.ndarray, side: tuple[int, int]) -> np.ndarray:
    """The ``side`` windows of ``(N, H, W)`` frames at ``origins`` (inside the frames:
    :func:`window_origins`), in the frames' own dtype (raw counts stay raw)."""
    views = sliding_window_view(frames, tuple(side), axis=(1, 2))
    origins = np.asarray(origins, np.int64).reshape(-1, 2)
    return np.ascontiguousarray(views[np.arange(len(origins)), origins[:, 0], origins[:, 1]])


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


@dataclass
class PeakTracker:
    """Finds the Bragg peak of one run's frames near where the last frame had it, and searches
    the whole frame only when it must (frames far larger than the crop: a 1M or 4M detector).

    Policy, page by page (an event page's frames share one search window):

    * the first page, and every ``check_every`` frames after a full search: its first frame is
      searched whole (:func:`clean_frames` + :func:`find_peaks`), the page then tracked from there
      (one full search a page, not one a frame: pages of a fly scan hold hundreds of frames);
    * otherwise only a ``window x window`` region around the last peak is cleaned and searched
      (its origin even, so that :func:`find_peaks`' 2x2 binning pairs the same pixels as on the
      whole frame; a window at an odd-sized frame's last row or column reaches it): the same peak
      and the same crop as a full search while the peak stays inside;
    * a frame whose peak lands within ``margin`` of the window's edge (inside the frame), or whose
      peak signal (the counts of the ``size x size`` box around it less the window's mean level
      over that box) is below ``lost_fraction`` of the last frame's, is searched again on the whole
      frame (a fallback), and so is every later frame of its page;
    * a full search that finds the peak more than ``window // 4`` away from where the tracker had
      it counts as a jump.

    ``size`` is how far the crops reach (their side, with some room for binning): the margin keeps
    every crop of a tracked frame inside its window. :attr:`counts` holds ``tracked``, ``full``
    (frames searched whole on schedule), ``fallback`` and ``jump``, per run (in the run's end
    summary as ``peak_search``).
    """

    size: int  #: side of the crops in detector pixels, with room for binning
    window: int  #: side of the search window
    check_every: int = 100
    lost_fraction: float = 0.5
    centre: bool = True
    box: int = 5
    last: np.ndarray | None = None
    last_signal: float = 0.0
    since_full: int = 0
    counts: dict = field(default_factory=lambda: {"tracked": 0, "full": 0, "fallback": 0, "jump": 0})
    _bins: tuple | None = field(default=None, repr=False)
    _scratch: Scratch = field(default_factory=Scratch, repr=False)

    def __post_init__(self) -> None:
        self.window += self.window % 2
        if self.window < max(BIN_SEARCH_FACTOR * self.box, 4 * self.margin):
            raise ValueError(f"a search window of {self.window} pixels is too small for crops of {self.size} "
                             f"(at least {max(BIN_SEARCH_FACTOR * self.box, 4 * self.margin)})")

    @property
    def margin(self) -> int:
        """A peak this close to the window's edge may be a peak outside it: search again."""
        return self.size // 2 + self.box + 2

    def _window(self, h: int, w: int) -> tuple[slice, slice]:
        """The search window around :attr:`last`: even origin, inside the frame."""
        def span(centre: int, extent: int) -> slice:
            start = int(np.clip(centre - self.window // 2, 0, max(extent - self.window, 0))) // 2 * 2
            stop = start + self.window
            return slice(start, extent if stop >= extent - 1 else stop)
        return span(int(self.last[0]), h), span(int(self.last[1]), w)

    def _signal(self, clean: np.ndarray, local: np.ndarray) -> np.ndarray:
        """Each frame's peak signal: the ``size x size`` box at ``local`` less the mean level of
        the pixels searched over the same area."""
        boxes = crop_frames(clean, local, self.size).frames
        level = clean.reshape(len(clean), -1).mean(axis=1, dtype=np.float64)
        return boxes.reshape(len(clean), -1).sum(axis=1, dtype=np.float64) - level * self.size**2

    def find(self, frames: np.ndarray, mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Peaks ``(n, 2)`` of raw ``(n, H, W)`` frames, the clean pixels they were found in
        (``(n, h, w)``: the windows, or the whole frames) and those pixels' origins ``(n, 2)`` in
        the frame (crop with ``peaks - origins``)."""
        n, h, w = frames.shape
        if min(h, w) < 2 * self.window:
            return self._full(frames, mask, scheduled=True)
        checked = 0
        if self.last is None or self.last_signal <= 0 or self.since_full >= self.check_every:
            # the check: the page's first frame searched whole, the page then tracked from its peak
            first = self._full(frames[:1], mask, scheduled=True)
            if n == 1:
                return first
            if self.last_signal <= 0:  # nothing to track from (a dark frame): the page searched whole
                self.counts["full"] -= 1  # the first frame is counted again with the page
                return self._full(frames, mask, scheduled=True)
            checked = 1
        rows, cols = self._window(h, w)
        clean = clean_frames(frames[:, rows, cols], None if mask is None else mask[rows, cols])
        local = find_peaks(clean, box=self.box, centre=self.centre)
        signal = self._signal(clean, local)
        wh, ww = clean.shape[1:]
        near_edge = (((local[:, 0] < self.margin) & (rows.start > 0))
                     | ((local[:, 0] >= wh - self.margin) & (rows.stop < h))
                     | ((local[:, 1] < self.margin) & (cols.start > 0))
                     | ((local[:, 1] >= ww - self.margin) & (cols.stop < w)))
        lost = near_edge | (signal < self.lost_fraction * self.last_signal)
        origins = np.tile(np.array([rows.start, cols.start], np.int64), (n, 1))
        peaks = local + origins
        self.since_full += n
        if not lost.any():
            self.counts["tracked"] += n - checked
            self.last, self.last_signal = peaks[-1], float(signal[-1])
            return peaks, clean, origins
        # from the first frame that lost its peak on, the frames are searched whole
        first_lost = int(np.argmax(lost))
        lost[first_lost:] = True
        self.counts["tracked"] += int((~lost).sum()) - checked * int(not lost[0])
        self.counts["fallback"] += int(lost.sum())
        found, found_clean, found_origins = self._full(frames[first_lost:], mask, scheduled=False)
        self.counts["full"] -= len(found)  # counted as fallbacks; a jump is counted there
        if found_clean.shape[1:] == clean.shape[1:]:  # windows both: the page cropped from its windows
            peaks[first_lost:] = found
            return (peaks, np.concatenate([clean[:first_lost], found_clean]),
                    np.concatenate([origins[:first_lost], found_origins]))
        peaks[lost] = found
        if found_clean.shape[1:] == (h, w):  # searched whole: only the tracked frames before still to clean
            whole = np.concatenate([clean_frames(frames[:first_lost], mask), found_clean])
        else:
            whole = clean_frames(frames, mask)
            self._remember(whole, peaks)
        return peaks, whole, np.zeros((n, 2), np.int64)

    def _full(self, frames: np.ndarray, mask: np.ndarray | None, *, scheduled: bool):
        """Frames searched whole: on frames at least twice the window on each side, a
        :func:`coarse_peaks` pass and then the window around each frame's rough peak (the same
        peak as a whole-frame :func:`find_peaks` while the peak stands out of the frame); on smaller
        frames, or when the window search of any of the frames ends at its window's edge (the
        rough peak was not the peak), :func:`find_peaks` on all of them whole."""
        n, h, w = frames.shape
        if min(h, w) >= 2 * self.window:
            raw = np.asarray(frames)  # frames in a file: read whole here
            rough = coarse_peaks(raw, self._good_bins(mask, (h, w)), scratch=self._scratch)
            origins = (rough - self.window // 2) // 2 * 2  # even, as the tracked windows
            clean = windows_around(raw, origins, self.window, mask)
            local = find_peaks(clean, box=self.box, centre=self.centre)
            inside = ((local >= self.margin) & (local < self.window - self.margin)).all(axis=1)
            if inside.all():
                peaks = local + origins
                if self.last is not None and np.abs(peaks[-1] - self.last).max() > self.window // 4:
                    self.counts["jump"] += 1
                self.counts["full"] += n
                self.last = peaks[-1]
                self.last_signal = float(self._signal(clean[-1:], local[-1:])[0])
                if scheduled:
                    self.since_full = 0
                return peaks, clean, origins
        clean = clean_frames(frames, mask)
        peaks = find_peaks(clean, box=self.box, centre=self.centre)
        if self.last is not None and np.abs(peaks[-1] - self.last).max() > self.window // 4:
            self.counts["jump"] += 1
        self.counts["full"] += len(frames)
        self._remember(clean, peaks)
        if scheduled:
            self.since_full = 0
        return peaks, clean, np.zeros((len(frames), 2), np.int64)

    def _good_bins(self, mask: np.ndarray | None, shape: tuple[int, int]) -> np.ndarray | None:
        """:func:`good_bins` of ``mask`` (kept: a run's frames share their detector's mask)."""
        if mask is None:
            return None
        if self._bins is None or self._bins[0] is not mask:
            self._bins = (mask, good_bins(np.asarray(mask, bool)))
        return self._bins[1]

    def _remember(self, whole: np.ndarray, peaks: np.ndarray) -> None:
        """The last frame's peak and its signal in the window the next page will search."""
        self.last = peaks[-1]
        rows, cols = self._window(*whole.shape[1:])
        window = whole[-1:, rows, cols]
        self.last_signal = float(self._signal(window, peaks[-1:] - [rows.start, cols.start])[0])
