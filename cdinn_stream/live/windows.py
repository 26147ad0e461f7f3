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
pixels as the pipeline does; the window's pixels are sent as measured, and a callback with the
same mask applies the mask's window to them. Frames by reference (``stream_datum``, ``datum``), frames
that are not numeric 2-D images, and streams without one image key pass unchanged.
"""

from __future__ import annotations

import logging

import numpy as np

from .crop import PeakTracker, cut_windows, window_origins

__all__ = ["PeakWindows", "WINDOW_SUFFIX"]

logger = logging.getLogger(__name__)

#: the data key holding each event's window origin: ``<image key>`` + this
WINDOW_SUFFIX = "_window_origin"


class PeakWindows:
    """Cuts inline detector frames to windows around their Bragg peaks (see the module docstring).

    Args:
        side: the window's side in detector pixels.
        image_key: the detector's data key; default: the one 2-D image field of each descriptor.
        mask: ``(H, W)`` bool, True for good detector pixels (for the peak search).
        centre: find the peak as a network trained centred does (centre of mass), else the
            brightest smoothed pixel.
    """

    def __init__(self, side: int, *, image_key: str | None = None, mask: np.ndarray | None = None,
                 centre: bool = True):
        if side < 16:
            raise ValueError(f"a window of {side} pixels is too small to hold a crop (use at least twice the model's "
                             "window on the detector)")
        self.side = int(side)
        self.image_key = image_key
        self.mask = None if mask is None else np.asarray(mask, bool)
        self.centre = centre
        self._streams: dict[str, tuple[str, str, tuple[int, int]]] = {}  # descriptor -> (run, image key, side)
        self._trackers: dict[str, PeakTracker] = {}  # descriptor uid -> its run's stream's tracker

    def _image_key(self, keys: dict) -> str | None:
        if self.image_key is not None:
            return self.image_key if self.image_key in keys else None
        images = [k for k, dk in keys.items() if len(dk.get("shape") or []) >= 2 and not dk.get("external")]
        return images[0] if len(images) == 1 else None

    def descriptor(self, doc: dict) -> dict:
        """The descriptor as it travels: a copy saying that its image is cut to windows, or
        ``doc`` itself for a stream without one inline image."""
        keys = doc.get("data_keys") or {}
        key = self._image_key(keys)
        shape = [int(s) for s in (keys.get(key, {}).get("shape") or [])] if key else []
        if key is None or len(shape) < 2 or keys[key].get("external"):
            return doc
        detector = tuple(shape[-2:])
        side = (min(self.side, detector[0]), min(self.side, detector[1]))
        if side == detector:  # frames no larger than a window: sent whole
            return doc
        origin_key = key + WINDOW_SUFFIX
        out = {**doc, "data_keys": {**keys,
                                    key: {**keys[key], "shape": list(side),
                                          "cdinn_window": {"origin_key": origin_key, "detector_shape": list(detector),
                                                           "side": self.side}},
                                    origin_key: {"source": "cdinn-stream", "dtype": "array", "shape": [2],
                                                 "dtype_numpy": "<i8"}}}
        self._streams[doc["uid"]] = (doc.get("run_start", ""), key, side)
        return out

    def event_page(self, doc: dict) -> dict:
        """The page as it travels: its frames cut to windows, with their origins (or ``doc`` itself)."""
        found = self._streams.get(doc.get("descriptor"))
        if found is None:
            return doc
        run_uid, key, side = found
        try:
            frames = np.asarray(doc["data"][key])
            while frames.ndim > 3 and frames.shape[1] == 1:  # (n, 1, H, W) from ophyd-async
                frames = frames[:, 0]
            if frames.ndim != 3 or frames.dtype.kind not in "biuf" or min(frames.shape[1:]) < min(side):
                raise ValueError(f"frames of shape {frames.shape} and dtype {frames.dtype} are not images to cut")
            side = (min(side[0], frames.shape[1]), min(side[1], frames.shape[2]))
            mask = self.mask if self.mask is not None and self.mask.shape == frames.shape[1:] else None
            tracker = self._trackers.get(doc["descriptor"])
            if tracker is None:  # tracked near the last peak on frames at least 4 windows wide
                reach = max(min(side) // 2, 8)
                tracker = self._trackers[doc["descriptor"]] = PeakTracker(
                    reach, max(4 * reach, 2 * reach + 28, 40), centre=self.centre)
            peaks, _, _ = tracker.find(frames, mask)
            origins = window_origins(peaks, side, frames.shape[1:])
            windows = cut_windows(frames, origins, side)
        except Exception as err:  # the worker rejects what cannot be cut, with the run and seq_nums
            logger.warning("run %s seq_nums %s: frames sent whole, not cut to windows: %s", run_uid,
                           list(doc.get("seq_num", []))[:4], err)
            return doc
        now = doc.get("timestamps", {}).get(key)
        return {**doc, "data": {**doc["data"], key: windows, key + WINDOW_SUFFIX: origins},
                "timestamps": {**doc.get("timestamps", {}), **({key + WINDOW_SUFFIX: now} if now is not None else {})}}

    def event(self, doc: dict) -> dict:
        """An event as it travels (as :meth:`event_page`, for one frame)."""
        found = self._streams.get(doc.get("descriptor"))
        if found is None:
            return doc
        key = found[1]
        page = self.event_page({**doc, "data": {**doc["data"], key: np.asarray(doc["data"][key])[None]}})
        if page["data"][key].ndim != 3 or key + WINDOW_SUFFIX not in page["data"]:
            return doc
        data = {**page["data"], key: page["data"][key][0], key + WINDOW_SUFFIX: page["data"][key + WINDOW_SUFFIX][0]}
        return {**page, "data": data}

    def stop(self, doc: dict) -> None:
        """Forget the run's streams and trackers."""
        run_uid = doc.get("run_start")
        for uid in [u for u, (run, _, _) in self._streams.items() if run == run_uid]:
            self._streams.pop(uid, None)
            self._trackers.pop(uid, None)
