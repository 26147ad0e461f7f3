"""The bluesky callback: RunEngine documents in, cropped frames queued for the model.

:class:`ReconstructionCallback` is a small front object around an ``event_model.RunRouter``
that makes one :class:`RunReconstructor` (a ``DocumentRouter``) per run. Use it as
``RE.subscribe(cb)`` or ``RemoteDispatcher(...).subscribe(cb)``.

Frames arrive three ways, all handled:

* inline arrays in ``event`` / ``event_page`` documents (e.g. ``ophyd.sim.DirectImage``);
* external files through ``resource`` / ``datum`` (e.g. ``ophyd.sim.SynSignalWithRegistry``):
  the RunRouter fills them with the handlers of ``handler_registry`` (events and pages with
  nothing to fill pass through untouched, :class:`PassThroughFiller`);
* files named by ``stream_resource`` / ``stream_datum`` (HDF5 of ophyd-async's detectors,
  or one ``.npy`` per frame): read by the readers of :mod:`cdinn_stream.live.frames` (which
  ``replay`` uses too).

Frames in files (HDF5 through ``stream_datum`` or AreaDetector's ``AD_HDF5`` resource/datum) are
read and cropped on the :class:`~cdinn_stream.live.intake.FrameIntake`'s thread, off the
RunEngine's, and only the Bragg peak's window of each is read while the peak is tracked. Inline
frames are cropped here (vectorised over an event page). Everything of a run reaches the
:class:`~cdinn_stream.live.engine.InferenceEngine`, whose worker batches, infers and publishes,
in document order through the intake. Nothing
here raises into the RunEngine: a malformed document or a bad frame is logged with the run uid
and seq_num and counted in :attr:`ReconstructionCallback.rejected`.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from event_model import DocumentRouter, Filler, RunRouter
from event_model.documents import (
    EventDescriptor,
    EventPage,
    RunStart,
    RunStop,
    StreamDatum,
    StreamResource,
)

from ..nn.reconstruct import CDIModel, load_model, user_models_dir
from .blocks import MAX_RANGES, Closes, FrameBlock, Sink, seq_ranges
from .crop import PeakTracker, clean_frames, crop_frames, cut_windows, find_peaks
from .engine import InferenceEngine
from .frames import (
    AD_HDF5_DATASET,
    AD_HDF5_SPECS,
    FileFrames,
    HDF5Files,
    NumpySeqHandler,
    group_file_frames,
    image_keys,
    open_frames,
)
from .intake import FrameIntake
from .publish import SinkThread, to_all
from .refine import Refiner

__all__ = ["ReconstructionCallback", "RunReconstructor", "FrameCropper", "Rejections", "PassThroughFiller",
           "default_handler_registry"]

logger = logging.getLogger(__name__)


def default_handler_registry() -> dict:
    """Handlers for external (resource/datum) frames: ``NPY_SEQ`` of ``ophyd.sim``
    (:class:`~cdinn_stream.live.frames.NumpySeqHandler`). AreaDetector's HDF5 plugin files
    (``AD_HDF5``, ``AD_HDF5_SWMR``) need no handler: the :class:`RunReconstructor` opens them
    itself, a page of datums at a time (a handler given for them in ``handler_registry`` is used
    instead)."""
    return {"NPY_SEQ": NumpySeqHandler}


def _unfilled(values) -> bool:
    """Whether a ``filled`` entry (a bool or datum id for an event, a sequence for a page) holds ``False``."""
    return any(v is False for v in (values if isinstance(values, list | tuple) else [values]))


def _needs_filling(doc: dict) -> bool:
    """Whether an event or event page says that any of its data are unfilled references; a
    document without ``filled`` is left to event-model's own rules."""
    filled = doc.get("filled")
    if not isinstance(filled, dict):
        return True
    return any(_unfilled(values) for values in filled.values())


class PassThroughFiller(Filler):
    """event-model's ``Filler``, except that an event or event page with nothing to fill is
    passed on as it is. (The RunRouter hands it pages, events packed as pages of one.) The stock
    ``Filler`` unpacks every page into events, fills each and packs a new page even when no key is
    external: per frame, that cost the RunEngine's thread about as much as the peak search
    (``docs/design.md`` section 15)."""

    def event(self, doc):
        return super().event(doc) if _needs_filling(doc) else doc

    def event_page(self, doc):
        return super().event_page(doc) if _needs_filling(doc) else doc


class Rejections:
    """Frames and documents turned away, counted by category (the reason's text before the first
    colon: bad shape, bad dtype, empty frame, unreadable, unfilled, unknown descriptor, document)
    and logged with the run uid and seq_nums; each run's rejected seq_nums are kept until its end
    (:meth:`of_run`: the run's end summary, and so its metadata in Tiled, lists them)."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self._runs: dict[str, dict[str, list[np.ndarray]]] = {}
        self._lock = threading.Lock()  # the RunEngine's thread and the intake's both reject

    def __call__(self, run_uid: str | None, seq_nums, reason: str) -> None:
        seq = np.atleast_1d(np.asarray(seq_nums)).astype(np.int64)
        category = reason.split(":")[0]
        with self._lock:
            self.counts[category] += len(seq)
            if run_uid is not None:
                self._runs.setdefault(run_uid, {}).setdefault(category, []).append(seq)
        logger.warning("run %s seq_num %s: %s", run_uid, _seq_text(seq.tolist()), reason)

    def of_run(self, run_uid: str) -> dict[str, list[list[int]]]:
        """The run's rejected frames by category, as inclusive seq_num ranges (:func:`seq_ranges`:
        the first :data:`MAX_RANGES` of each), forgotten here."""
        with self._lock:
            found = self._runs.pop(run_uid, {})
        out = {}
        for category, parts in found.items():
            seq = np.concatenate(parts)
            ranges = seq_ranges(seq, MAX_RANGES + 1)
            if len(ranges) > MAX_RANGES:
                logger.warning("run %s: %d frames rejected (%s) in more than %d ranges: the first %d kept in its "
                               "metadata", run_uid, len(seq), category, MAX_RANGES, MAX_RANGES)
            out[category] = ranges[:MAX_RANGES]
        return out

    def document(self, name: str, run_uid: str | None, err: BaseException) -> None:
        """A document that could not be handled at all."""
        self.counts["document"] += 1
        logger.warning("cannot handle %s document (run %s): %s", name, run_uid, err)


def _seq_text(seq: list[int]) -> str:
    """seq_nums for a log line: ``7``, ``[3, 9]``, ``1..100 (100 frames)``, or the first few."""
    if len(seq) == 1:
        return str(seq[0])
    if len(seq) > 2 and seq == list(range(seq[0], seq[0] + len(seq))):
        return f"{seq[0]}..{seq[-1]} ({len(seq)} frames)"
    return str(seq) if len(seq) <= 8 else f"[{', '.join(map(str, seq[:6]))}, ...] ({len(seq)} frames)"


@dataclass(frozen=True, eq=False)
class FrameCropper:
    """Checks, cleans and crops detector frames into blocks for the engine (the crop of
    :mod:`cdinn_stream.live.crop`): ``size`` is the model's window, ``bin`` the binning of a
    ``bin * size`` window, ``mask`` the good detector pixels, ``centre`` the model's peak rule.

    ``refine_window > 1`` also crops, at the same centre, the refinement window
    (:attr:`FrameBlock.wide`): ``refine_window * size`` pixels binned ``max(bin // refine_window, 1)``.
    With ``bin == refine_window`` that is the model's own detector window unbinned: twice the
    oversampling for ER/HIO (:mod:`cdinn_stream.live.refine`).

    ``track`` (on by default): on frames at least twice the search window on each side (4x the
    crop's side by default, ``track_window``), each run's peak is searched near the last one and
    the whole frame only every ``track_every`` frames or when the peak is lost
    (:class:`~cdinn_stream.live.crop.PeakTracker`); the counts go in the run's end summary
    (``peak_search``)."""

    size: int
    bin: int = 1
    mask: np.ndarray | None = None
    centre: bool = True
    rejections: Rejections = field(default_factory=Rejections)
    refine_window: int = 1
    track: bool = True
    track_window: int | None = None
    track_every: int = 100
    trackers: dict = field(default_factory=dict, repr=False)  #: (run uid, stream) -> PeakTracker

    def __post_init__(self) -> None:
        if self.refine_window < 1:
            raise ValueError(f"refine_window must be 1 or more, not {self.refine_window}")
        if self.refine_window > 1 and (self.refine_window * self.refine_bin) % self.bin:
            raise ValueError(f"refine_window={self.refine_window} does not fit bin={self.bin}: use a refine_window "
                             "that divides bin, or bin=1")

    def tracker(self, run_uid: str, stream: str) -> PeakTracker:
        """The peak tracker of a run's stream (made on first use)."""
        key = (run_uid, stream)
        if key not in self.trackers:
            self.trackers[key] = PeakTracker(self._reach, self._search_window, check_every=self.track_every,
                                             centre=self.centre)
        return self.trackers[key]

    @property
    def _reach(self) -> int:
        """The crops' side with room for binning (a binned crop reaches up to a bin further than its half side)."""
        return self.side + 2 * max(self.bin, self.refine_bin)

    @property
    def _search_window(self) -> int:
        """The side of the region a tracked peak is searched in (even)."""
        window = self.track_window or 4 * self._reach
        return window + window % 2

    def forget(self, run_uid: str) -> dict:
        """Drop a run's trackers; their counts, summed over its streams."""
        counts: dict = {}
        for key in [k for k in list(self.trackers) if k[0] == run_uid]:  # other threads may add trackers
            for name, n in self.trackers.pop(key).counts.items():
                counts[name] = counts.get(name, 0) + n
        return counts

    @property
    def refine_bin(self) -> int:
        """Binning of the refinement window."""
        return max(self.bin // self.refine_window, 1)

    @property
    def zoom(self) -> int:
        """How many refinement-grid pixels one model pixel spans (real space)."""
        return self.refine_window * self.refine_bin // self.bin

    @property
    def side(self) -> int:
        """How far the crops reach on the detector (pixels): the model's window, or the refinement's."""
        return max(self.size * self.bin, self.refine_window * self.size * self.refine_bin)

    def block(self, run_uid: str, stream: str, frames: np.ndarray, seq_nums: np.ndarray,
              times: np.ndarray, window_origins: np.ndarray | None = None) -> FrameBlock | None:
        """A block of cropped frames, or ``None`` (the frames rejected and counted). With
        ``window_origins`` ``(n, 2)``, the frames are windows cut out of the detector's frames at
        those corners (:mod:`cdinn_stream.live.windows`): each searched whole, the mask's window
        applied, and the crops' origins and peaks given on the detector."""
        reject = self.rejections
        received = time.monotonic()
        frames = frames if isinstance(frames, FileFrames) else np.asarray(frames)  # file frames: read as cropped
        if frames.dtype.kind not in "biuf":
            reject(run_uid, seq_nums, f"bad dtype: frame dtype {frames.dtype} is not numeric")
            return None
        while frames.ndim > 3 and frames.shape[1] == 1:  # (n, 1, H, W) from ophyd-async
            frames = frames[:, 0]
        if frames.ndim != 3:
            reject(run_uid, seq_nums, f"bad shape: frames of shape {frames.shape[1:]} are not 2-D images")
            return None
        mask = self.mask
        if window_origins is not None:
            window_origins = np.asarray(window_origins, np.int64)
            frames, mask = self._windows(run_uid, seq_nums, frames, window_origins)
            if frames is None:
                return None
        elif mask is not None and mask.shape != frames.shape[1:]:
            reject(run_uid, seq_nums, f"bad shape: frame shape {frames.shape[1:]} does not match the mask {mask.shape}")
            return None
        # centre as the model does: the centre of mass for a network trained centred, else the brightest pixel
        if window_origins is not None:  # each window on its own (their corners move with the peak)
            clean = clean_frames(frames, None)
            if mask is not None:
                clean *= mask
            peaks, offsets = self._window_peaks(clean, window_origins), np.zeros((len(clean), 2), np.int64)
        elif self.track:  # near the last peak, the whole frame when due or lost (whole on small frames)
            peaks, clean, offsets = self.tracker(run_uid, stream).find(frames, self.mask)
        else:
            clean = clean_frames(frames, mask)
            peaks, offsets = find_peaks(clean, centre=self.centre), np.zeros((len(clean), 2), np.int64)
        if window_origins is not None:  # from the windows' pixels to the detector's
            peaks, offsets = peaks + window_origins, offsets + window_origins
        empty = clean.reshape(len(clean), -1).max(axis=1) <= 0
        if empty.any():
            reject(run_uid, seq_nums[empty], "empty frame: no positive counts")
            keep = ~empty
            clean, seq_nums, times = clean[keep], seq_nums[keep], times[keep]
            peaks, offsets = peaks[keep], offsets[keep]
            if not len(clean):
                return None
        local = peaks - offsets  # in the pixels searched (a window around the last peak, or the frame)
        crops = crop_frames(clean, local, self.size, bin=self.bin)
        wide = (crop_frames(clean, local, self.refine_window * self.size, bin=self.refine_bin).frames
                if self.refine_window > 1 else None)
        return FrameBlock(run_uid, stream, np.asarray(seq_nums, np.int64), np.asarray(times, np.float64),
                          crops.frames, crops.origins + offsets, peaks.astype(np.int64), np.full(len(clean), received),
                          wide)

    def _window_peaks(self, clean: np.ndarray, origins: np.ndarray) -> np.ndarray:
        """Peaks of clean windows (in their pixels) found as a tracked search finds them on the
        whole frame: in a region of the tracker's size around a first find, its corner even on the
        detector (so that the 2x2-binned search pairs the same pixels; a window wider than the
        region would be searched 4x4-binned, which can land a pixel or more away)."""
        peaks = find_peaks(clean, centre=self.centre)
        region = self._search_window
        n, h, w = clean.shape
        if min(h, w) <= region:
            return peaks
        start = np.clip(peaks - region // 2, 0, [h - region, w - region])
        odd = (start + origins) % 2 == 1
        start = np.where(odd & (start > 0), start - 1, np.where(odd, start + 1, start))
        return find_peaks(cut_windows(clean, start, (region, region)), centre=self.centre) + start

    def _windows(self, run_uid: str, seq_nums: np.ndarray, frames: np.ndarray, origins: np.ndarray
                 ) -> tuple[np.ndarray | None, np.ndarray | None]:
        """Windows checked against their corners; the mask's windows ``(n, h, w)`` (or ``None``)."""
        if origins.shape != (len(frames), 2):
            self.rejections(run_uid, seq_nums, f"bad shape: window origins of shape {origins.shape} for "
                                               f"{len(frames)} frames")
            return None, None
        if (origins < 0).any() or min(frames.shape[1:]) < 1:
            self.rejections(run_uid, seq_nums, "not cut: the frames could not be cut to windows where they were taken "
                                               "(see the publisher's log)")
            return None, None
        if self.mask is None:
            return frames, None
        side = frames.shape[1:]
        if (origins + side > self.mask.shape).any():
            self.rejections(run_uid, seq_nums, f"bad shape: windows of {side} at {origins.tolist()[:2]}... do not lie "
                                               f"on the mask's detector {self.mask.shape}")
            return None, None
        return frames, cut_windows(np.broadcast_to(self.mask, (len(frames), *self.mask.shape)), origins, side)


#: the interpreter's thread switch interval while refinement or adaptation runs beside the model (s)
SWITCH_INTERVAL = 0.0005


def _short_switch_interval() -> None:
    """Background threads (refinement, adaptation) make many small torch calls; with Python's
    default 5 ms switch interval the model's thread waits up to that long for the interpreter at
    each of its own calls. 0.5 ms brought the ZeroMQ latency p99 with every doubtful frame refined
    within 20 % of a core from 36 to 25 ms on 2 cores (19.7 ms without refinement; ``docs/design.md``
    section 18). Process-wide: said in the log."""
    if sys.getswitchinterval() > SWITCH_INTERVAL:
        logger.info("refinement or adaptation runs beside the model: the interpreter's thread switch interval "
                    "goes from %g s to %g s (sys.setswitchinterval)", sys.getswitchinterval(), SWITCH_INTERVAL)
        sys.setswitchinterval(SWITCH_INTERVAL)


class ReconstructionCallback:
    """Live CDI NN reconstruction of a detector's frames, run after run.

    Args:
        model: a :class:`~cdinn_stream.nn.reconstruct.CDIModel`; default: the shipped model.
        image_key: the detector's data key; default: the one 2-D image field of each descriptor.
        bin: bin a ``bin * model.size`` window around the peak down to the model's size.
        mask: ``(H, W)`` bool, True for good detector pixels (gaps and dead pixels False).
        sinks: where results go (``ZmqPublisherSink``, ``TiledSink``, ``EpicsSink``, ...).
        batch_size: most frames per model call.
        max_latency: seconds a frame may wait for a batch to fill.
        max_queued_frames: bound of the queue (see :mod:`cdinn_stream.live.engine` for the policy).
        handler_registry: handlers to fill resource/datum frames (default: ``NPY_SEQ``).
        refine_every: also refine every ``refine_every``-th frame (by seq_num) with NN-seeded
            ER/HIO, published as a second result type (0: only frames asked for with
            :meth:`refine`; ``None``, the default: no refinement unless ``refine_above``
            asks for it); see :mod:`cdinn_stream.live.refine`.
        refine_iterations: ER/HIO iterations of a refinement.
        refine_above: refine, without anyone asking, the frames whose chi^2 (their trust figure)
            is above this (``None``, the default: off).
        refine_budget: at most this fraction of each run's frames refined automatically (doubtful
            frames over it wait, oldest first, and are counted when their run ends).
        refine_share: at most this share of one core's time for refinement.
        refine_window: refine on a window this many times the model's, at the same centre
            (:class:`FrameCropper`; 1: the model's crop).
        adapt: live adaptation of the model to the run (:class:`~cdinn_stream.live.adapt.Adapter`
            options as a dict, or ``True`` for the defaults; ``None``/``False``: off); see
            :mod:`cdinn_stream.live.adapt`.
        close_sinks: :meth:`close` closes the sinks too (their sockets): for sinks made for this
            callback alone, as :meth:`~cdinn_stream.apps.config.PipelineConfig.build` makes them.
    """

    def __init__(self, *, model: CDIModel | None = None, image_key: str | None = None, bin: int = 1,
                 mask: np.ndarray | None = None, sinks: list[Sink] | None = None, batch_size: int = 256,
                 max_latency: float = 0.01, max_queued_frames: int = 20_000,
                 handler_registry: dict | None = None, refine_every: int | None = None,
                 refine_iterations: int = 50, refine_above: float | None = None, refine_budget: float = 0.2,
                 refine_share: float = 0.5, refine_window: int = 1, adapt: dict | bool | None = None,
                 close_sinks: bool = False):
        self.model = model if model is not None else load_model()
        self.image_key = image_key
        self.close_sinks = close_sinks
        self.rejections = Rejections()
        self.cropper = FrameCropper(self.model.size, bin, mask, self.model.centre, self.rejections, refine_window)
        threads = [SinkThread(s) for s in sinks or []]
        refiner = None
        if refine_every is not None or refine_above is not None:
            refiner = Refiner(to_all(threads), every=refine_every or 0, iterations=refine_iterations,
                              above=refine_above, budget=refine_budget, share=refine_share, zoom=self.cropper.zoom)
        self.engine = InferenceEngine(self.model, threads, refiner=refiner, batch_size=batch_size,
                                      max_latency=max_latency, max_queued_frames=max_queued_frames, crop_bin=bin)
        self.intake = FrameIntake(max_frames=max_queued_frames)
        if refiner is not None or adapt:
            _short_switch_interval()
        if adapt:
            from .adapt import Adapter

            options = {} if adapt is True else {k: v for k, v in dict(adapt).items() if v is not None}
            self.engine.adapter = Adapter(self.engine, **{"out_dir": user_models_dir(), **options})
        registry = default_handler_registry() if handler_registry is None else handler_registry
        self._router = RunRouter([self._factory], handler_registry=registry, filler_class=PassThroughFiller)

    @property
    def rejected(self) -> Counter[str]:
        """Frames (and documents) rejected, by category."""
        return self.rejections.counts

    @property
    def sinks(self) -> list[Sink]:
        """The sinks results go to, in the order given."""
        return [t.sink for t in self.engine.sink_threads]

    @property
    def size(self) -> int:
        """Side of the model's window in detector pixels (before binning)."""
        return self.model.size

    def _factory(self, name: str, start: RunStart):
        return [RunReconstructor(start, cropper=self.cropper, engine=self.engine, image_key=self.image_key,
                                 intake=self.intake)], []

    def __call__(self, name: str, doc: dict) -> None:
        try:
            self._router(name, doc)
        except Exception as err:  # never into the RunEngine
            uid = (doc.get("run_start") or doc.get("uid")) if isinstance(doc, dict) else None
            self.rejections.document(name, uid, err)

    def stats(self) -> dict:
        """Counters of the engine plus the rejected frames and documents."""
        r, a = self.engine.refiner, self.engine.adapter
        return {**self.engine.stats.summary(), "sinks": self.engine.sink_summary(), "rejected": dict(self.rejected),
                "refined": r.stats() if r is not None else None, "adapted": a.stats() if a is not None else None,
                "model_version": self.engine.model_version}

    def refine(self, run_uid: str, seq_nums) -> None:
        """Ask for an NN-seeded ER/HIO refinement of these frames of ``run_uid`` (published as
        ``cdinn.refined`` / Tiled ``refined_*``) when their network results arrive."""
        self.engine.request_refine(run_uid, seq_nums)

    def flush(self, timeout: float | None = 60.0) -> bool:
        """Wait until every queued frame and run end is published."""
        end = None if timeout is None else time.monotonic() + timeout
        if not self.intake.drain(timeout):
            return False
        return self.engine.flush(timeout=None if end is None else max(end - time.monotonic(), 0))

    def close(self, timeout: float | None = 30.0) -> bool:
        """Publish what is queued and stop the threads; with ``close_sinks``, close the sinks too.
        False (and a warning) if work was left after ``timeout`` s."""
        read = self.intake.close(timeout)
        if self.engine.adapter is not None:
            self.engine.adapter.close(timeout)
        done = self.engine.close(timeout) and read
        if self.close_sinks:
            for sink in self.sinks:
                if isinstance(sink, Closes):
                    try:
                        sink.close()
                    except Exception:
                        logger.exception("closing sink %s failed", type(sink).__name__)
        return done


class RunReconstructor(DocumentRouter):
    """One run: finds the image field, turns events into frame blocks, closes the run."""

    def __init__(self, start: RunStart, *, cropper: FrameCropper, engine: InferenceEngine,
                 image_key: str | None = None, intake: FrameIntake | None = None):
        super().__init__()
        self.uid = start["uid"]
        self.cropper = cropper
        self.reject = cropper.rejections
        self.engine = engine
        self.image_key = image_key
        self.intake = intake
        self.streams: dict[str, tuple[str, str | None]] = {}  # descriptor uid -> (stream, image key)
        #: descriptor uid -> its window origins' key and the detector's shape (frames cut to windows)
        self.window_keys: dict[str, tuple[str, tuple[int, ...]]] = {}
        self.stream_resources: dict[str, StreamResource] = {}
        self.files = HDF5Files()  # the stream_resource and AD_HDF5 files of the run, open until its end
        self.ad_resources: dict[str, tuple[str, int]] = {}  # AD_HDF5 resource uid -> (file, frames a datum)
        self.ad_datums: dict[str, tuple[str, int]] = {}  # datum id -> (resource uid, point number)
        self.frames_seen = 0
        self._later(engine.open_run, self.uid, start)

    def _later(self, job, *args, frames: int = 0, seq: np.ndarray | None = None) -> bool:
        """Run ``job(*args)`` on the intake's thread, after the run's work queued before (here,
        without an intake); frames the intake has no room for are rejected (False)."""
        if self.intake is None:
            job(*args)
        elif not self.intake.put(lambda: job(*args), frames):
            self.reject(self.uid, seq, "dropped: the frame intake is full (frames arrive faster than they are read)")
            return False
        return True

    def _image_key(self, doc: EventDescriptor) -> str | None:
        images = image_keys(doc.get("data_keys", {}), self.image_key)
        if len(images) > 1:
            logger.warning("run %s stream %s has several images %s: pass image_key=...", self.uid,
                           doc.get("name"), images)
            return None
        return images[0] if images else None

    def descriptor(self, doc: EventDescriptor) -> EventDescriptor:
        key = self._image_key(doc)
        self.streams[doc["uid"]] = (doc.get("name", "primary"), key)
        window = doc["data_keys"][key].get("cdinn_window") if key is not None else None
        if isinstance(window, dict) and window.get("origin_key"):  # frames cut to windows where they were taken
            self.window_keys[doc["uid"]] = (str(window["origin_key"]), tuple(window.get("detector_shape") or ()))
            shape = doc["data_keys"][key].get("shape") or []
            if shape and min(shape[-2:]) < self.cropper.side + 16:
                logger.warning("run %s stream %s: frames come as windows of %s pixels, little more than the crops' %d "
                               "(a crop off the window's centre is padded with zeros): publish windows of at least "
                               "%d pixels", self.uid, doc.get("name"), shape[-2:], self.cropper.side,
                               2 * self.cropper.side)
        return doc

    def event_page(self, doc: EventPage) -> EventPage:
        stream, key = self.streams.get(doc["descriptor"], (None, None))
        if stream is None:
            self.reject(self.uid, doc.get("seq_num", [-1]), "unknown descriptor: event for an unknown descriptor")
            return doc
        if key is None or key not in doc["data"]:
            return doc  # not our detector, or its frames come through stream_datum
        seq = np.asarray(doc["seq_num"])
        if _unfilled(doc.get("filled", {}).get(key)):
            data = doc["data"][key]
            if self.ad_datums and all(isinstance(d, str) and d in self.ad_datums for d in data):
                # AD_HDF5 datums: one range of frames for a page, read and cropped on the intake's thread
                self._later(self._read_and_submit, stream, lambda: self._ad_frames(data), seq,
                            np.asarray(doc["time"], float), frames=len(seq), seq=seq)
                return doc
            self.reject(self.uid, seq, "unfilled: frames are unfilled references (no handler for their spec)")
            return doc
        try:
            frames = np.asarray(doc["data"][key])
        except Exception as err:
            self.reject(self.uid, seq, f"unreadable: frames: {err}")
            return doc
        if frames.ndim < 2 or (frames.dtype == object):
            self.reject(self.uid, seq, f"bad shape: frames of shape {frames.shape} are not 2-D images")
            return doc
        origins = None
        if doc["descriptor"] in self.window_keys:
            origin_key, detector = self.window_keys[doc["descriptor"]]
            mask = self.cropper.mask
            if mask is not None and detector and mask.shape != detector:
                self.reject(self.uid, seq, f"bad shape: windows of a detector of shape {detector}, the mask's is "
                                           f"{mask.shape}")
                return doc
            try:
                origins = np.asarray(doc["data"][origin_key], np.int64).reshape(len(seq), 2)
            except Exception as err:
                self.reject(self.uid, seq, f"bad shape: the frames' window origins: {err!r}")
                return doc
            if len(detector) == 2 and frames.ndim == 3 and (origins + frames.shape[1:] > detector).any():
                self.reject(self.uid, seq, f"bad shape: windows of {frames.shape[1:]} at {origins.tolist()[:2]}... "
                                           f"reach past the detector {detector}")
                return doc
        self._submit(stream, frames, seq, np.asarray(doc["time"], float), window_origins=origins)
        return doc

    def resource(self, doc: dict) -> dict:
        if doc.get("spec") in AD_HDF5_SPECS:
            root, rel = str(doc.get("root") or ""), str(doc["resource_path"])
            path = root.rstrip("/") + "/" + rel.lstrip("/") if root else rel
            self.ad_resources[doc["uid"]] = (path, int((doc.get("resource_kwargs") or {}).get("frame_per_point", 1)))
        return doc

    def datum(self, doc: dict) -> dict:
        if doc.get("resource") in self.ad_resources:
            self.ad_datums[doc["datum_id"]] = (doc["resource"], int(doc["datum_kwargs"]["point_number"]))
        return doc

    def datum_page(self, doc: dict) -> dict:
        if doc.get("resource") in self.ad_resources:
            for datum_id, point in zip(doc["datum_id"], doc["datum_kwargs"]["point_number"], strict=True):
                self.ad_datums[datum_id] = (doc["resource"], int(point))
        return doc

    def _ad_frames(self, datum_ids: list[str]) -> list[FileFrames]:
        """(On the intake's thread.) The frames of a page of AD_HDF5 datums: one range of a file
        for each run of datums that follow one another in it."""
        parts = []
        for datum_id in datum_ids:
            resource, point = self.ad_datums.pop(datum_id)  # each datum is read once
            path, per = self.ad_resources[resource]
            parts.append(self.files.frames(path, AD_HDF5_DATASET, point * per, (point + 1) * per))
        return group_file_frames(parts)

    def stream_resource(self, doc: StreamResource) -> StreamResource:
        self.stream_resources[doc["uid"]] = doc
        return doc

    def stream_datum(self, doc: StreamDatum) -> StreamDatum:
        resource = self.stream_resources.get(doc.get("stream_resource"))
        stream, key = self.streams.get(doc.get("descriptor"), (None, None))
        if resource is None or key is None or resource.get("data_key") != key:
            return doc
        start, stop = doc["indices"]["start"], doc["indices"]["stop"]
        seq = np.arange(doc["seq_nums"]["start"], doc["seq_nums"]["stop"])

        def frames():
            return open_frames(resource.get("mimetype"), [resource["uri"]], resource.get("parameters") or {},
                               start, stop, self.files)

        self._later(self._read_and_submit, stream, frames, seq, np.full(len(seq), time.time()),
                    frames=len(seq), seq=seq)
        return doc

    def _read_and_submit(self, stream: str, frames, seq: np.ndarray, times: np.ndarray) -> None:
        """(On the intake's thread.) Open the frames (``frames()``: an array, a
        :class:`~cdinn_stream.live.frames.FileFrames` or a list of them, one after the other), crop
        them (reading what the crop needs) and submit."""
        try:
            opened = frames()
        except Exception as err:
            self.reject(self.uid, seq, f"unreadable: cannot open the frames: {err}")
            return
        done = 0
        for part in opened if isinstance(opened, list) else [opened]:
            part_seq, part_times = seq[done : done + len(part)], times[done : done + len(part)]
            done += len(part)
            try:
                self._submit(stream, part, part_seq, part_times, now=True)
            except OSError as err:
                self.reject(self.uid, part_seq, f"unreadable: cannot read the frames: {err}")
            except Exception as err:
                logger.exception("run %s: frames %s failed", self.uid, part_seq[:1])
                self.reject(self.uid, part_seq, f"failed: {type(err).__name__}: {err}")

    def _submit(self, stream: str, frames, seq: np.ndarray, times: np.ndarray, now: bool = False,
                window_origins: np.ndarray | None = None) -> None:
        if len(frames) != len(seq):
            self.reject(self.uid, seq, f"bad shape: {len(frames)} frames for {len(seq)} events")
            return
        block = self.cropper.block(self.uid, stream, frames, seq, times, window_origins)
        if block is not None and (now or self._later(self.engine.submit, block, frames=len(block), seq=block.seq_nums)):
            self.frames_seen += len(block)
            if now:
                self.engine.submit(block)

    def stop(self, doc: RunStop) -> RunStop:
        self._later(self._close, doc)
        return doc

    def _close(self, doc: RunStop) -> None:
        peak_search: dict = {}
        try:
            self.files.close()
            peak_search = self.cropper.forget(self.uid)
        finally:  # the run's end reaches the sinks whatever happened
            self.engine.close_run(self.uid, {"stop": doc, "frames": self.frames_seen, "peak_search": peak_search,
                                             "frames_rejected": self.reject.of_run(self.uid)})
