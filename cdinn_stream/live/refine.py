"""Live NN-seeded refinement: a short batched ER/HIO started from the network's result.

Which frames are refined:

* every ``every``-th seq_num, and any frame asked for with :meth:`Refiner.request`;
* automatically, the doubtful ones (``above``): frames whose trust figure (chi^2 of the
  network's result against the measured crop, :attr:`ResultBlock.chi2`) exceeds ``above``,
  within a ``budget``: at most that fraction of each run's frames (a run earns ``budget``
  refinements per frame it sends through the model and spends one per refinement, so a doubtful
  stretch can use what a good stretch saved). Doubtful frames over the budget wait, oldest
  first, for the budget to grow; those still waiting when their run ends are counted in
  ``frames_over_budget`` and reported, not refined.

The :class:`Refiner`'s own thread takes what is waiting (at most ``max_batch`` frames a round),
runs ``iterations`` of ER/HIO on them at once, starting from the network's complex object and
support (:func:`cdinn_stream.core.phase_retrieval.er_hio` with ``init``), scores the result with
chi^2 against the measured crop, and hands a :class:`~cdinn_stream.live.blocks.RefinedBlock` to
the sinks (ZeroMQ topic ``cdinn.refined``, Tiled arrays ``refined_*``). It computes on one torch
thread (restored after each round; the engine sets its own count in its thread), and ``share``
bounds its time: after a
round of ``t`` seconds it rests ``t * (1 / share - 1)`` seconds (0.5: at
most half of one core's time on average), so refinement never starves the model of the CPU.

Refinement on a wider window (``FrameCropper(refine_window=2)``): where the detector oversamples
the pattern more than the model needs (frames binned for the model), the crop of the refinement
window (:attr:`FrameBlock.wide`, the same centre, ``refine_window * size`` pixels binned
``bin // refine_window``) gives ER/HIO the oversampling it needs: the network's object is
zoomed by ``zoom`` (1 when the window only adds field of view) and zero-padded onto that grid
(:func:`seed_on_grid`), and the refined result comes on it.

The fast path never waits for any of this; a run's end does (so a run's refined results come
before its ``close_run``: the run's end passes through the refiner's queue). The queue is
bounded: past ``max_queued_frames`` frames selected frames are dropped, counted and logged.
Requests for frames that never came are reported at the run's end and forgotten.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable

import numpy as np
import torch

from ..core.metrics import chi2
from ..core.phase_retrieval import er_hio
from ..core.physics import SUPPORT_THRESHOLD
from .blocks import FrameBlock, RefinedBlock, ResultBlock, RunMarker
from .worker import Worker

__all__ = ["Refiner", "refine", "seed_on_grid"]

logger = logging.getLogger(__name__)


def seed_on_grid(amplitude: np.ndarray, phase: np.ndarray, size: int, zoom: int = 1) -> torch.Tensor:
    """The network's objects ``(n, s, s)`` as complex starting points on a ``(n, size, size)``
    grid: zoomed ``zoom`` times (bilinear, on the real and imaginary parts) and zero-padded,
    centred (``s // 2`` lands near ``size // 2``)."""
    obj = torch.polar(torch.as_tensor(amplitude, dtype=torch.float32), torch.as_tensor(phase, dtype=torch.float32))
    if zoom > 1:
        parts = torch.view_as_real(obj).permute(0, 3, 1, 2)  # (n, 2, s, s)
        parts = torch.nn.functional.interpolate(parts, scale_factor=zoom, mode="bilinear", align_corners=False)
        obj = torch.view_as_complex(parts.permute(0, 2, 3, 1).contiguous())
    s = obj.shape[-1]
    if s > size:
        raise ValueError(f"a {s}x{s} seed does not fit a {size}x{size} refinement grid")
    before = size // 2 - s // 2
    return torch.nn.functional.pad(obj, (before, size - s - before, before, size - s - before))


def refine(intensity: np.ndarray, amplitude: np.ndarray, phase: np.ndarray, *, iterations: int = 50,
           zoom: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """``iterations`` of ER/HIO from the network's ``(n, s, s)`` amplitude and phase on measured
    ``(n, m, m)`` intensities (``m >= s * zoom``: the model's crop, or a wider one with the seed
    zoomed ``zoom`` times, :func:`seed_on_grid`); returns ``(n, m, m)`` amplitude (maximum 1) and
    phase (0 outside the support)."""
    m = intensity.shape[-1]
    init = seed_on_grid(amplitude, phase, m, zoom)
    support = init.abs() > SUPPORT_THRESHOLD * init.abs().flatten(1).amax(dim=1).clamp_min(1e-12)[:, None, None]
    obj = er_hio(torch.as_tensor(intensity, dtype=torch.float32), init=init, support=support, iterations=iterations,
                 average=min(10, iterations))
    amp = obj.abs()
    amp = amp / amp.flatten(1).amax(dim=1).clamp_min(1e-12)[:, None, None]
    ph = torch.where(amp > SUPPORT_THRESHOLD, obj.angle(), torch.zeros_like(amp))
    return amp.numpy().astype(np.float32), ph.numpy().astype(np.float32)


class Refiner(Worker):
    """Selected frames -> batched NN-seeded ER/HIO in a thread -> ``publish(RefinedBlock)``; run
    markers pass through after the frames queued before them (``publish(RunMarker)``). See the
    module docstring for the selection, the budget and the CPU share."""

    def __init__(self, publish: Callable[[RefinedBlock | RunMarker], None], *, every: int = 0,
                 iterations: int = 50, above: float | None = None, budget: float = 0.2, share: float = 0.5,
                 zoom: int = 1, max_queued_frames: int = 1024, max_batch: int = 256):
        super().__init__("cdinn-refine")
        if not 0 < share <= 1:
            raise ValueError(f"share must be in (0, 1], not {share}")
        if not 0 <= budget <= 1:
            raise ValueError(f"budget must be a fraction of frames in [0, 1], not {budget}")
        self.publish = publish
        self.every = every
        self.iterations = iterations
        self.above = above
        self.budget = budget
        self.share = share
        self.zoom = zoom
        self.max_queued_frames = max_queued_frames
        self.max_batch = max_batch
        self.frames_refined = 0
        self.frames_dropped = 0
        self.frames_doubtful = 0  # frames over ``above``
        self.frames_over_budget = 0  # doubtful frames whose run ended before the budget reached them
        self.busy_seconds = 0.0
        self._requested: dict[str, set[int]] = {}  # run uid -> seq_nums asked for
        self._budget_count: dict[str, list[int]] = {}  # run uid -> [frames seen, refinements queued, over the line]
        self._waiting: dict[str, deque[ResultBlock]] = {}  # run uid -> doubtful frames over the budget
        self._queued = 0
        self._rest_until = 0.0
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
            if keep.any():
                self._enqueue(result, np.flatnonzero(keep))
            if self.above is not None:
                self._automatic(result, ~keep)

    def _automatic(self, result: ResultBlock, free: np.ndarray) -> None:
        """Doubtful frames (lock held): into the run's waiting line (at most ``max_queued_frames``
        frames; past that the newest count as over budget at once), then as many of the oldest as
        the run's budget and the queue's room allow into the queue."""
        run = result.run_uid
        counts = self._budget_count.setdefault(run, [0, 0, 0])
        counts[0] += len(result.frames)
        doubtful = np.flatnonzero(free & (np.asarray(result.chi2) > self.above))
        self.frames_doubtful += len(doubtful)
        waiting = self._waiting.setdefault(run, deque())
        room = self.max_queued_frames - sum(len(r.frames) for r in waiting)
        if len(doubtful) > room:
            self.frames_over_budget += len(doubtful) - max(room, 0)
            counts[2] += len(doubtful) - max(room, 0)
            doubtful = doubtful[: max(room, 0)]
        if len(doubtful):
            waiting.append(_subset(result, doubtful))
        credit = int(np.floor(self.budget * counts[0] + 1e-9)) - counts[1]  # whole refinements, no float drift
        while waiting and credit >= 1 and self._queued < self.max_queued_frames:
            head = waiting[0]
            n = min(len(head.frames), credit, self.max_queued_frames - self._queued)
            if n < len(head.frames):
                waiting[0] = _subset(head, np.arange(n, len(head.frames)))
                head = _subset(head, np.arange(n))
            else:
                waiting.popleft()
            self._enqueue(head, np.arange(n))
            credit -= n
            counts[1] += n

    def _enqueue(self, result: ResultBlock, idx: np.ndarray) -> bool:
        """Queue frames ``idx`` of ``result`` (lock held); False (counted, logged) when full."""
        n = len(idx)
        if self._queued + n > self.max_queued_frames:
            self.frames_dropped += n
            logger.warning("refinement queue full: not refining %d frames of run %s (seq_nums %s)", n,
                           result.run_uid, result.frames.seq_nums[idx].tolist())
            return False
        self._queue.append(_subset(result, idx))
        self._queued += n
        self._cond.notify_all()
        return True

    def drain(self, run_uid: str | None = None, timeout: float | None = None) -> bool:
        """Wait until the queued frames (of ``run_uid``, or all) are refined and published."""
        if run_uid is None:
            return super().drain(timeout)
        return self.wait_while(lambda: any(item.run_uid == run_uid for item in (*self._queue, *self._working)),
                               timeout)

    def stats(self) -> dict:
        """Counters: frames refined, dropped (queue full), doubtful (over ``above``), over budget,
        and the seconds the thread spent refining."""
        return {"frames": self.frames_refined, "dropped": self.frames_dropped, "doubtful": self.frames_doubtful,
                "over_budget": self.frames_over_budget, "busy_s": round(self.busy_seconds, 3)}

    def _take(self) -> list:
        items, frames = [], 0  # frames up to max_batch a round (a marker ends the round)
        while self._queue and frames < self.max_batch:
            item = self._queue.popleft()
            items.append(item)
            if isinstance(item, RunMarker):
                break
            frames += len(item.frames)
        self._queued -= frames
        return items

    def _handle(self, items: list) -> None:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # one thread for ER/HIO; the engine sets its own count in its thread
        try:
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
        finally:
            torch.set_num_threads(threads)

    def _end_of_run(self, marker: RunMarker) -> None:
        with self._cond:
            missing = self._requested.pop(marker.run_uid, set())
            waiting = self._waiting.pop(marker.run_uid, deque())
            left = sum(len(r.frames) for r in waiting)
            self.frames_over_budget += left
            over = left + self._budget_count.pop(marker.run_uid, [0, 0, 0])[2]
        if missing:
            logger.warning("run %s ended before frames %s asked for refinement arrived (not refined)",
                           marker.run_uid, sorted(missing))
        if over:
            logger.info("run %s: %d doubtful frames (chi2 > %g) were over the refinement budget (%g of the "
                        "frames) and were not refined", marker.run_uid, over, self.above, self.budget)
        if marker.kind == "close":
            marker.document["refined"] = {"over_budget": over}
        self.publish(marker)

    def _refine_safely(self, batch: list[ResultBlock]) -> None:
        self._rest()
        t0 = time.monotonic()
        try:
            self._refine(batch)
        except Exception:
            logger.exception("refinement failed for runs %s", sorted({r.run_uid for r in batch}))
        spent = time.monotonic() - t0
        self.busy_seconds += spent
        self._rest_until = time.monotonic() + spent * (1 / self.share - 1)

    def _rest(self) -> None:
        """Wait out the rest owed by the last round (the CPU share), unless the refiner closes or a
        run's end waits in the queue (its refinements go out now, and the run's end after them)."""
        with self._cond:
            while (not self._closed and (left := self._rest_until - time.monotonic()) > 0
                   and not any(isinstance(item, RunMarker) for item in self._queue)):
                self._cond.wait(left)

    def _refine(self, batch: list[ResultBlock]) -> None:
        wide = all(r.frames.wide is not None for r in batch)
        intensity = np.concatenate([r.frames.wide if wide else r.frames.frames for r in batch])
        nn_amp = np.concatenate([r.amplitude for r in batch])
        nn_phase = np.concatenate([r.phase for r in batch])
        zoom = self.zoom if wide else 1
        amp, phase = refine(intensity, nn_amp, nn_phase, iterations=self.iterations, zoom=zoom)
        after = chi2(amp, phase, intensity).numpy()
        if wide:  # the network's result scored on the same (wider) pattern as the refined one
            seed = seed_on_grid(nn_amp, nn_phase, intensity.shape[-1], zoom)
            before = chi2(seed.abs(), seed.angle(), intensity).numpy()
        else:
            before = np.concatenate([np.asarray(r.chi2, np.float64) for r in batch])
        i = 0
        for group in _consecutive(batch):  # one refined block per run and stream: one sink write each
            frames = FrameBlock.concat([r.frames for r in group])
            n = len(frames)
            self.publish(RefinedBlock(frames, amp[i : i + n], phase[i : i + n], before[i : i + n],
                                      after[i : i + n], self.iterations, group[0].model_version))
            self.frames_refined += n
            i += n


def _consecutive(batch: list[ResultBlock]) -> list[list[ResultBlock]]:
    """Consecutive results of the same run, stream and model version, grouped."""
    groups: list[list[ResultBlock]] = []
    for r in batch:
        key = (r.run_uid, r.frames.stream, r.model_version)
        if groups and (groups[-1][0].run_uid, groups[-1][0].frames.stream, groups[-1][0].model_version) == key:
            groups[-1].append(r)
        else:
            groups.append([r])
    return groups


def _subset(result: ResultBlock, idx: np.ndarray) -> ResultBlock:
    """Frames ``idx`` of a result."""
    return ResultBlock(result.frames.take(idx), result.amplitude[idx], result.phase[idx], result.latency[idx],
                       np.asarray(result.chi2)[idx], result.model_version, result.model,
                       {k: v[idx] for k, v in result.observables.items()})
