"""Live NN-seeded refinement: a short batched ER/HIO started from the network's result.

Selected frames (every ``every``-th seq_num, and any frame asked for with
:meth:`Refiner.request`) go to a :class:`Refiner`: its own thread takes everything waiting, runs
``iterations`` of ER/HIO on the measured crops at once, starting from the network's complex
object and support (:func:`cdinn_stream.core.phase_retrieval.er_hio` with ``init``), scores both
results with the reciprocal-space chi^2 against the measured crop, and hands a
:class:`~cdinn_stream.live.blocks.RefinedBlock` to the sinks (ZeroMQ topic ``cdinn.refined``, Tiled
arrays ``refined_*``). The fast path never waits for it; a run's end does (so a run's refined
results come before its ``close_run``: the run's end passes through the refiner's queue). The
queue is bounded: past ``max_queued_frames`` frames selected frames are dropped, counted and
logged. Requests for frames that never came are reported at the run's end and forgotten.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import torch

from ..core.metrics import chi2
from ..core.phase_retrieval import er_hio
from ..core.physics import SUPPORT_THRESHOLD
from .blocks import FrameBlock, RefinedBlock, ResultBlock, RunMarker
from .worker import Worker

__all__ = ["Refiner", "refine"]

logger = logging.getLogger(__name__)


def refine(intensity: np.ndarray, amplitude: np.ndarray, phase: np.ndarray, *, iterations: int = 50
           ) -> tuple[np.ndarray, np.ndarray]:
    """``iterations`` of ER/HIO from the network's ``(n, s, s)`` amplitude and phase on the measured
    ``(n, s, s)`` intensities; returns amplitude (maximum 1) and phase (0 outside the support)."""
    init = torch.polar(torch.as_tensor(amplitude, dtype=torch.float32), torch.as_tensor(phase, dtype=torch.float32))
    support = torch.as_tensor(amplitude > SUPPORT_THRESHOLD)
    obj = er_hio(torch.as_tensor(intensity, dtype=torch.float32), init=init, support=support, iterations=iterations,
                 average=min(10, iterations))
    amp = obj.abs()
    amp = amp / amp.flatten(1).amax(dim=1).clamp_min(1e-12)[:, None, None]
    ph = torch.where(amp > SUPPORT_THRESHOLD, obj.angle(), torch.zeros_like(amp))
    return amp.numpy().astype(np.float32), ph.numpy().astype(np.float32)


class Refiner(Worker):
    """Selected frames -> batched NN-seeded ER/HIO in a thread -> ``publish(RefinedBlock)``; run
    markers pass through after the frames queued before them (``publish(RunMarker)``)."""

    def __init__(self, publish: Callable[[RefinedBlock | RunMarker], None], *, every: int = 0,
                 iterations: int = 50, max_queued_frames: int = 1024):
        super().__init__("cdinn-refine")
        self.publish = publish
        self.every = every
        self.iterations = iterations
        self.max_queued_frames = max_queued_frames
        self.frames_refined = 0
        self.frames_dropped = 0
        self._requested: dict[str, set[int]] = {}  # run uid -> seq_nums asked for
        self._queued = 0
        self._start()

    def request(self, run_uid: str, seq_nums) -> None:
        """Refine these frames of ``run_uid`` when their network results arrive."""
        with self._cond:
            self._requested.setdefault(run_uid, set()).update(int(s) for s in np.atleast_1d(seq_nums))

    def forward(self, marker: RunMarker) -> None:
        """Pass a run marker on to the sinks after the frames queued before it."""
        with self._cond:
            self._queue.append(marker)
            self._cond.notify_all()

    def offer(self, result: ResultBlock) -> None:
        """Queue the frames of ``result`` that are selected (never blocks)."""
        seq = result.frames.seq_nums
        keep = (seq % self.every == 0) if self.every else np.zeros(len(seq), bool)
        with self._cond:
            asked = self._requested.get(result.run_uid)
            if asked:
                hit = np.isin(seq, np.fromiter(asked, np.int64, len(asked)))
                asked.difference_update(seq[hit].tolist())
                keep |= hit
            if not keep.any():
                return
            n = int(keep.sum())
            if self._queued + n > self.max_queued_frames:
                self.frames_dropped += n
                logger.warning("refinement queue full: not refining %d frames of run %s (seq_nums %s)", n,
                               result.run_uid, seq[keep].tolist())
                return
            idx = np.flatnonzero(keep)
            f = result.frames
            sub = FrameBlock(f.run_uid, f.stream, *(a[idx] for a in f.arrays()))
            self._queue.append(ResultBlock(sub, result.amplitude[idx], result.phase[idx], result.latency[idx]))
            self._queued += n
            self._cond.notify_all()

    def drain(self, run_uid: str | None = None, timeout: float | None = None) -> bool:
        """Wait until the queued frames (of ``run_uid``, or all) are refined and published."""
        if run_uid is None:
            return super().drain(timeout)
        return self.wait_while(lambda: any(item.run_uid == run_uid for item in (*self._queue, *self._working)),
                               timeout)

    def _take(self) -> list:
        self._queued = 0
        return super()._take()

    def _handle(self, items: list) -> None:
        batch: list[ResultBlock] = []
        for item in items + [None]:
            if isinstance(item, ResultBlock):
                batch.append(item)
                continue
            if batch:  # everything before a marker (or the end) at once
                self._refine_safely(batch)
                batch = []
            if isinstance(item, RunMarker):
                self._end_of_run(item)

    def _end_of_run(self, marker: RunMarker) -> None:
        with self._cond:
            missing = self._requested.pop(marker.run_uid, set())
        if missing:
            logger.warning("run %s ended before frames %s asked for refinement arrived (not refined)",
                           marker.run_uid, sorted(missing))
        self.publish(marker)

    def _refine_safely(self, batch: list[ResultBlock]) -> None:
        try:
            self._refine(batch)
        except Exception:
            logger.exception("refinement failed for runs %s", sorted({r.run_uid for r in batch}))

    def _refine(self, batch: list[ResultBlock]) -> None:
        intensity = np.concatenate([r.frames.frames for r in batch])
        nn_amp = np.concatenate([r.amplitude for r in batch])
        nn_phase = np.concatenate([r.phase for r in batch])
        amp, phase = refine(intensity, nn_amp, nn_phase, iterations=self.iterations)
        before = chi2(nn_amp, nn_phase, intensity).numpy()
        after = chi2(amp, phase, intensity).numpy()
        i = 0
        for r in batch:
            n = len(r.frames)
            self.publish(RefinedBlock(r.frames, amp[i : i + n], phase[i : i + n], before[i : i + n],
                                      after[i : i + n], self.iterations))
            self.frames_refined += n
            i += n
