"""Bragg-peak windows made where the frames are taken: detector frames cut down before they travel.

A worker pool on other hosts (:mod:`cdinn_stream.apps.worker`) needs each frame's Bragg peak and
its surroundings, not the whole detector. :class:`PeakWindows` cuts every inline frame of an
``event`` or ``event_page`` down to a ``side x side`` window around its peak (found as the
pipeline finds it, tracked from frame to frame: :class:`~cdinn_stream.live.crop.PeakTracker`),
in the detector's own dtype, and says where each window lies on the detector, so that a 4M
frame (8 MB) travels as a 256 x 256 window (128 kB) and the worker still reports the peak in
detector pixels. :class:`~cdinn_stream.live.nats_publisher.JetStreamPublisher` applies it with
``window=``.

The documents change as follows (what a worker's
:class:`~cdinn_stream.live.callback.RunReconstructor` reads):

* the descriptor's image data key gets ``shape`` ``[side, side]`` (smaller on a smaller frame)
  and ``cdinn_window``: ``{"origin_key": "<key>_window_origin", "detector_shape": [H, W],
  "side": side}``; the data key ``<key>_window_origin`` (``shape`` ``[2]``) is added;
* each event's image is its window, and ``<key>_window_origin`` the (row, column) of the
  window's top-left corner on the detector (a window never reaches past the detector's edge: near
  an edge the peak is off the window's centre).

The window must hold the worker's crop with room to spare: at least the model's window on the
detector (its size times ``bin``, times ``refine_window`` when refining) plus about 16 pixels;
twice that is a safe choice. With a ``mask`` (True for good pixels) the peak search ignores bad
pixels as the pipeline does, and the window's bad pixels travel as 0 (detectors often mark gaps
with the dtype's largest value): a worker without the mask makes the same crops. Frames by
reference (``stream_datum``, ``datum``) and streams without one inline image key pass unchanged;
frames of a cut stream that cannot be cut (not numeric 2-D images) travel as empty placeholders
at origin ``(-1, -1)``, which the workers reject with their seq_nums. Cost on the RunEngine's
thread: the pipeline's peak search, tracked in a 128-pixel region around the last peak on frames
at least 256 pixels wide, and the cut (``publisher_window_us`` of ``cdinn-stream bench --suite
detector``); an empty frame sends the rest of its page to whole-frame searches.
"""

from __future__ import annotations

import logging

import numpy as np

from .crop import PeakTracker, cut_windows, window_origins
from .frames import image_keys

__all__ = ["PeakWindows", "WINDOW_SUFFIX", "MIN_SIDE"]

logger = logging.getLogger(__name__)

#: the data key holding each event's window origin: ``<image key>`` + this
WINDOW_SUFFIX = "_window_origin"
#: the smallest window side (pixels)
MIN_SIDE = 16


class PeakWindows:
    """Cuts inline detector frames to windows around their Bragg peaks (see the module docstring).

    Args:
        side: the window's side in detector pixels.
        image_key: the detector's data key; default: the one 2-D image field of each descriptor.
        mask: ``(H, W)`` bool, True for good detector pixels (the peak search skips the others,
            and they travel as 0).
        centre: find the peak as a network trained centred does (centre of mass), else the
            brightest smoothed pixel.
    """

    def __init__(self, side: int, *, image_key: str | None = None, mask: np.ndarray | None = None,
                 centre: bool = True):
        if side < MIN_SIDE:
            raise ValueError(f"a window of {side} pixels is too small to hold a crop: use at least the model's window "
                             "on the detector plus 16 pixels (twice it is safe)")
        self.side = int(side)
        self.image_key = image_key
        self.mask = None if mask is None else np.asarray(mask, bool)
        self.centre = centre
        self._streams: dict[str, tuple[str, str]] = {}  # descriptor uid -> (run uid, image key)
        self._trackers: dict[str, PeakTracker] = {}  # descriptor uid -> its run's stream's tracker
        #: frames sent as windows, and frames that could not be cut (sent as placeholders the workers reject)
        self.counts = {"frames_cut": 0, "frames_not_cut": 0}

    def _image_key(self, keys: dict) -> str | None:
        images = [k for k in image_keys(keys, self.image_key) if not keys[k].get("external")]
        return images[0] if len(images) == 1 else None

    def descriptor(self, doc: dict) -> dict:
        """The descriptor as it travels: a copy saying that its image is cut to windows, or
        ``doc`` itself for a stream without one inline image larger than a window."""
        keys = doc.get("data_keys") or {}
        key = self._image_key(keys)
        shape = [int(s) for s in (keys.get(key, {}).get("shape") or [])] if key else []
        if key is None or len(shape) < 2 or keys[key].get("external") or min(shape[-2:]) < MIN_SIDE:
            return doc
        detector = tuple(shape[-2:])
        side = (min(self.side, detector[0]), min(self.side, detector[1]))
        if side == detector:  # frames no larger than a window: sent whole
            return doc
        if self.mask is not None and self.mask.shape != detector:
            logger.warning("run %s: the mask's shape %s is not the detector's %s: the peak searched without it",
                           doc.get("run_start"), self.mask.shape, detector)
        origin_key = key + WINDOW_SUFFIX
        out = {**doc, "data_keys": {**keys,
                                    key: {**keys[key], "shape": list(side),
                                          "cdinn_window": {"origin_key": origin_key, "detector_shape": list(detector),
                                                           "side": self.side}},
                                    origin_key: {"source": "cdinn-stream", "dtype": "array", "shape": [2],
                                                 "dtype_numpy": "<i8"}}}
        self._streams[doc["uid"]] = (doc.get("run_start", ""), key)
        return out

    def event_page(self, doc: dict) -> dict:
        """The page as it travels: its frames cut to windows, with their origins (or ``doc``
        itself, for a stream not cut). Frames that cannot be cut travel as empty placeholders at
        origin ``(-1, -1)``, which the workers reject with their seq_nums (never whole: a
        detector frame may not fit a message)."""
        found = self._streams.get(doc.get("descriptor"))
        if found is None:
            return doc
        run_uid, key = found
        n = len(doc.get("seq_num", ()))
        try:
            windows, origins = self._cut(doc["descriptor"], np.asarray(doc["data"][key]))
            if len(windows) != n:
                raise ValueError(f"{len(windows)} frames for {n} events")
            self.counts["frames_cut"] += n
        except Exception as err:
            logger.warning("run %s seq_nums %s: frames not cut to windows (%s): sent as placeholders, rejected by the "
                           "workers", run_uid, list(doc.get("seq_num", []))[:4], err)
            windows, origins = np.zeros((n, 0, 0), np.uint8), np.full((n, 2), -1, np.int64)
            self.counts["frames_not_cut"] += n
        now = doc.get("timestamps", {}).get(key)
        return {**doc, "data": {**doc["data"], key: windows, key + WINDOW_SUFFIX: origins},
                "timestamps": {**doc.get("timestamps", {}), **({key + WINDOW_SUFFIX: now} if now is not None else {})}}

    def _cut(self, descriptor: str, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Windows (the frames' dtype, masked pixels 0) and their origins ``(n, 2)`` of ``(n, H, W)`` frames."""
        while frames.ndim > 3 and frames.shape[1] == 1:  # (n, 1, H, W) from ophyd-async
            frames = frames[:, 0]
        if frames.ndim != 3 or frames.dtype.kind not in "biuf" or min(frames.shape[1:]) < MIN_SIDE:
            raise ValueError(f"frames of shape {frames.shape} and dtype {frames.dtype} are not images to cut")
        side = (min(self.side, frames.shape[1]), min(self.side, frames.shape[2]))
        mask = self.mask if self.mask is not None and self.mask.shape == frames.shape[1:] else None
        tracker = self._trackers.get(descriptor)
        if tracker is None:  # searched in a 128-pixel region around the last peak (a 512 one cost 5x)
            reach = max(min(min(side) // 2, 32), 8)
            tracker = self._trackers[descriptor] = PeakTracker(reach, max(4 * reach, 2 * reach + 28, 40),
                                                               centre=self.centre)
        peaks, _, _ = tracker.find(frames, mask)
        origins = window_origins(peaks, side, frames.shape[1:])
        windows = cut_windows(frames, origins, side)
        if mask is not None:  # gaps and bad pixels (often the dtype's largest value) travel as 0
            windows[~cut_windows(np.broadcast_to(mask, frames.shape), origins, side)] = 0
        return windows, origins

    def event(self, doc: dict) -> dict:
        """An event as it travels (as :meth:`event_page`, for one frame)."""
        found = self._streams.get(doc.get("descriptor"))
        if found is None:
            return doc
        key, origin = found[1], found[1] + WINDOW_SUFFIX
        page = self.event_page({"descriptor": doc["descriptor"], "seq_num": [doc.get("seq_num")],
                                "data": {key: [doc.get("data", {}).get(key)]}, "timestamps": {}})
        times = doc.get("timestamps") or {}
        return {**doc, "data": {**doc["data"], key: page["data"][key][0], origin: page["data"][origin][0]},
                "timestamps": {**times, **({origin: times[key]} if key in times else {})}}

    def stop(self, doc: dict) -> None:
        """Forget the run's streams and trackers."""
        run_uid = doc.get("run_start")
        for uid in [u for u, (run, _) in self._streams.items() if run == run_uid]:
            self._streams.pop(uid, None)
            self._trackers.pop(uid, None)
