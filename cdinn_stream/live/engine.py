"""The inference engine: a bounded queue, a worker thread that batches, infers and publishes.

Producers (the callback, in the RunEngine's thread) call :meth:`InferenceEngine.submit` with a
:class:`FrameBlock` -- the cropped frames of one event page with their identity -- and return at
once. A single worker thread gathers blocks until it has ``batch_size`` frames or the oldest
frame has waited ``max_latency`` seconds, runs the model once on the batch (pinned host memory
and a non-blocking copy when the model is on a GPU, ``torch.inference_mode``), and hands each
run's results, in frame order, to every sink's thread (:mod:`cdinn_stream.live.publish`): a slow sink
holds up neither the model nor the other sinks.

Back-pressure: the queue holds at most ``max_queued_frames`` frames. When it is full,
``submit`` waits up to ``block_timeout`` seconds for room (the RunEngine slows down a little
rather than data being lost); if there is still no room the block is dropped, counted in
``frames_dropped`` and logged as a warning with the run uid and seq_nums. Nothing is dropped
silently. Counters: ``frames_in``, ``frames_out``, ``frames_dropped``, ``frames_failed``; each sink
has its own (:meth:`InferenceEngine.sink_summary`).

Run boundaries travel through the same queue (:meth:`InferenceEngine.open_run`,
:meth:`InferenceEngine.close_run`), so a sink sees ``open_run``, then the run's results in order,
then ``close_run`` -- each from its own sink thread, and without the producer waiting for the model.

Every result carries its trust figure, chi^2 of the reconstruction against the measured crop
(:func:`~cdinn_stream.core.metrics.fourier_chi2`, batched on the model's device right after the
network), its observables (:mod:`cdinn_stream.core.observables`: peak position, intensity,
support, strain, change against the run's first frame; computed on the same device from the
same complex objects as chi^2), and the version of the weights that made it: :meth:`InferenceEngine.swap_model` puts
new weights in between two batches (live adaptation, :mod:`cdinn_stream.live.adapt`), and each
run's end summary lists the versions its frames used (``model_versions``).

An exception in the model or a sink is logged with its run uid and seq_nums and counted; the
worker goes on. A failing batch on a GPU is retried in halves, then on the CPU (frames are not
lost to an out-of-memory error).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..core.metrics import centred_planes, fourier_chi2
from ..core.observables import OBSERVABLES
from ..core.observe import frame_observables, reference_objects, warm_up
from ..core.physics import normalized_amplitude
from ..core.timing import LatencyWindow, latency_ms
from .blocks import FrameBlock, ResultBlock, RunMarker, Sink
from .publish import SinkThread, to_all
from .refine import Refiner
from .worker import Worker

if TYPE_CHECKING:  # the engine runs any model with predict_tensor; the type is for readers
    from ..nn.reconstruct import CDIModel

__all__ = ["FrameBlock", "ResultBlock", "Sink", "InferenceEngine", "EngineStats"]

logger = logging.getLogger(__name__)

#: frames after which the engine has the observables compiled (seconds of CPU, paid back over a
#: few hundred thousand frames; a process making fewer runs them eagerly: cdinn_stream.core.observe)
COMPILE_AFTER = 20_000


@dataclass
class EngineStats:
    """Counters of an :class:`InferenceEngine` (frames unless said)."""

    frames_in: int = 0
    frames_out: int = 0
    frames_dropped: int = 0
    frames_failed: int = 0
    batches: int = 0
    latencies: LatencyWindow = field(default_factory=LatencyWindow, repr=False)

    def summary(self) -> dict:
        """Counters and latency percentiles (milliseconds, frame in to model output)."""
        return {"frames_in": self.frames_in, "frames_out": self.frames_out, "frames_dropped": self.frames_dropped,
                "frames_failed": self.frames_failed, "batches": self.batches, **latency_ms(self.latencies)}


class InferenceEngine(Worker):
    """Bounded queue + one worker thread: batch, infer, publish (see the module docstring)."""

    #: seconds a run's start waits for the refiner to publish the end of the run before it (the
    #: refiner skips its rest while a run marker waits, so this is its queued work, bounded)
    MARKER_WAIT = 30.0

    def __init__(self, model: CDIModel, sink_threads: list[SinkThread] | None = None, *,
                 refiner: Refiner | None = None, batch_size: int = 256, max_latency: float = 0.01,
                 max_queued_frames: int = 20_000, block_timeout: float = 1.0, crop_bin: int = 1):
        super().__init__("cdinn-inference")
        self.crop_bin = crop_bin  # binning of the crops (for the peak position in detector pixels)
        self._references: dict[tuple[str, str], torch.Tensor] = {}  # each open run's streams' first objects
        self.model = model
        self.sink_threads = list(sink_threads or [])
        self.refiner = refiner
        self.publish = to_all(self.sink_threads)
        self.batch_size = batch_size
        self.max_latency = max_latency
        self.max_queued_frames = max_queued_frames
        self.block_timeout = block_timeout
        self.stats = EngineStats()
        self._queued = 0
        self._pending: dict[str, int] = {}  # frames submitted but not finished, per run
        self._pin = self.model.device.type == "cuda"
        self._threads = torch.get_num_threads()  # set again in the worker's thread (others change theirs)
        #: the weights' versions: index = ``ResultBlock.model_version``; each a dict with ``version``,
        #: ``name`` and what :meth:`swap_model` was told (where the weights were saved, the run adapted on)
        self.model_versions: list[dict] = [{"version": 0, "name": getattr(model, "name", "")}]
        self._next_model: CDIModel | None = None
        self._run_versions: dict[str, set[int]] = {}
        self.adapter = None  # set by the callback when live adaptation is on (it is offered every result)
        #: called with each block whose inference failed (its frames counted in ``frames_failed``, no
        #: result made): a pool worker gives its messages back instead of acknowledging them
        self.on_failed: Callable[[FrameBlock], None] | None = None
        #: the thread compiling the observables, once COMPILE_AFTER frames are made (True: none needed)
        self._compiling_ahead: threading.Thread | bool = False
        self._start()

    def current_model(self) -> tuple[CDIModel, int]:
        """The model in use from the next batch on (a swapped one not yet taken included) and its version."""
        with self._cond:
            return (self._next_model or self.model), len(self.model_versions) - 1

    @property
    def model_version(self) -> int:
        """The version of the weights in use (0: those the engine was built with)."""
        return len(self.model_versions) - 1 if self._next_model is None else len(self.model_versions) - 2

    def swap_model(self, model: CDIModel, **info) -> int:
        """Use ``model`` from the next batch on (the batch in progress finishes with the old one;
        no frame waits). ``info`` (e.g. ``path``, ``adapted_on``, ``chi2_median``) is recorded in
        :attr:`model_versions` and in the end summaries of the runs that use it. Returns its version."""
        with self._cond:
            if self._next_model is not None:  # a swap not yet taken is replaced
                self.model_versions.pop()
            self.model_versions.append({"version": len(self.model_versions), "name": getattr(model, "name", ""),
                                        **info})
            self._next_model = model
            self._cond.notify_all()
            return len(self.model_versions) - 1

    # -- producer side -------------------------------------------------------------------
    def submit(self, block: FrameBlock) -> bool:
        """Queue a block; returns False (and counts and logs the drop) if there is no room."""
        n = len(block)
        if n == 0:
            return True
        deadline = time.monotonic() + self.block_timeout
        with self._cond:
            if self._closed:
                raise RuntimeError("the inference engine is closed")
            self.stats.frames_in += n
            while self._queued + n > self.max_queued_frames and self._queued > 0:
                if self._closed:
                    raise RuntimeError("the inference engine is closed")
                left = deadline - time.monotonic()
                if left <= 0:
                    self.stats.frames_dropped += n
                    logger.warning("queue full (%d frames): dropped %d frames of run %s, seq_nums %s..%s",
                                   self._queued, n, block.run_uid, block.seq_nums[0], block.seq_nums[-1])
                    return False
                self._cond.wait(left)
            self._queue.append(block)
            self._queued += n
            self._pending[block.run_uid] = self._pending.get(block.run_uid, 0) + n
            self._cond.notify_all()
        return True

    def open_run(self, run_uid: str, start: dict) -> None:
        """Queue the start of a run (sinks' ``open_run``), behind anything queued before."""
        self._put_marker(RunMarker("open", run_uid, start))

    def close_run(self, run_uid: str, summary: dict) -> None:
        """Queue the end of a run: sinks' ``close_run`` comes after the run's last result."""
        self._put_marker(RunMarker("close", run_uid, summary))

    def _put_marker(self, marker: RunMarker) -> None:
        with self._cond:
            if self._closed:
                raise RuntimeError("the inference engine is closed")
            self._queue.append(marker)
            self._pending[marker.run_uid] = self._pending.get(marker.run_uid, 0) + 1
            self._cond.notify_all()

    def flush(self, run_uid: str | None = None, timeout: float | None = None) -> bool:
        """Wait until every frame submitted so far (of ``run_uid``, or of all runs) is inferred and
        handed to every sink."""
        end = None if timeout is None else time.monotonic() + timeout

        def left() -> float | None:
            return None if end is None else max(end - time.monotonic(), 0)

        if not self.wait_while(lambda: (self._pending.get(run_uid, 0) if run_uid else sum(self._pending.values())) > 0,
                               timeout):
            return False
        if self.refiner is not None and not self.refiner.drain(run_uid, left()):
            return False
        return all(t.drain(left()) for t in self.sink_threads)

    def request_refine(self, run_uid: str, seq_nums) -> None:
        """Refine these frames (NN-seeded ER/HIO) when their network results arrive."""
        if self.refiner is None:
            raise ValueError("refinement is off in this pipeline: build it with refine_every=0 (on request) or "
                             "refine_every=N (every N-th frame)")
        self.refiner.request(run_uid, seq_nums)

    @property
    def queued_frames(self) -> int:
        """Frames waiting for the model."""
        return self._queued

    def sink_summary(self) -> dict:
        """Per-sink counters and latency (frame in to the end of the sink's write), by sink class
        (``TiledSink``; a second sink of the same class is ``TiledSink#2``)."""
        summary: dict = {}
        for t in self.sink_threads:
            name, k = t.name, 1
            while name in summary:
                k += 1
                name = f"{t.name}#{k}"
            summary[name] = {**t.stats.summary(), "queued_frames": t.queued_frames}
        return summary

    def close(self, timeout: float | None = 30.0) -> bool:
        """Publish what is queued, then stop the worker, the refiner and the sink threads (a
        warning says what was left)."""
        done = self.flush(timeout=timeout)
        if not done:
            logger.warning("closing with work left after %s s: %d frames queued for the model, %s for the sinks",
                           timeout, self._queued, {t.name: t.queued_frames for t in self.sink_threads})
        super().close(timeout)
        if self.refiner is not None:
            self.refiner.close(timeout)
        for t in self.sink_threads:
            t.close(timeout)
        return done

    # -- worker side ---------------------------------------------------------------------
    def _take(self) -> list:
        """A run marker alone, or frame blocks: up to ``batch_size`` frames, waiting at most until
        the oldest has waited ``max_latency`` (lock held)."""
        if isinstance(self._queue[0], RunMarker):
            return [self._queue.popleft()]
        oldest = self._queue[0].received[0]
        while (self._queued < self.batch_size and not self._closed
               and not any(isinstance(item, RunMarker) for item in self._queue)):
            left = oldest + self.max_latency - time.monotonic()
            if left <= 0:
                break
            self._cond.wait(left)
        blocks, count = [], 0
        while self._queue and count < self.batch_size and isinstance(self._queue[0], FrameBlock):
            block = self._queue.popleft()
            if count + len(block) > self.batch_size:
                block, rest = block.split(self.batch_size - count)
                self._queue.appendleft(rest)
            blocks.append(block)
            count += len(block)
        self._queued -= count
        self._cond.notify_all()
        return blocks

    def _infer(self, frames: np.ndarray, origins: np.ndarray, runs: list[tuple[str, str]]
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """Amplitude, phase, chi^2 and observables of ``(n, size, size)`` measured crops whose
        detector origins are ``origins`` and runs ``runs`` (``(run uid, stream)`` a frame)."""
        try:
            with torch.inference_mode():  # all of it (the observables' compiled code is made for inference tensors)
                raw = torch.from_numpy(frames)
                if self._pin:
                    raw = raw.pin_memory()
                raw = raw.to(self.model.device, non_blocking=True)
                x = normalized_amplitude(raw)
                amp, phase = (t.float() for t in self.model.predict_tensor(x))  # once, for all that follows
                planes = centred_planes(amp, phase)  # shared by the trust figure and the observables
                chi2 = fourier_chi2(amp, phase, x, planes=planes)
                obs = self._observables(amp, phase, raw, origins, runs, planes)
                return amp.cpu().numpy(), phase.cpu().numpy(), chi2.cpu().numpy(), obs
        except (torch.cuda.OutOfMemoryError, RuntimeError) as err:
            if len(frames) > 1:
                logger.warning("model failed on %d frames (%s); retrying in halves", len(frames), err)
                h = len(frames) // 2
                halves = self._infer(frames[:h], origins[:h], runs[:h]), self._infer(frames[h:], origins[h:], runs[h:])
                (a0, p0, c0, o0), (a1, p1, c1, o1) = halves
                return (np.concatenate([a0, a1]), np.concatenate([p0, p1]), np.concatenate([c0, c1]),
                        {k: np.concatenate([o0[k], o1[k]]) for k in o0})
            if self.model.device.type != "cpu":
                logger.warning("model failed on %s (%s); falling back to the CPU", self.model.device, err)
                self.model = self.model.on_cpu()
                self._pin = False
                self._references = {k: v.cpu() for k, v in self._references.items()}
                return self._infer(frames, origins, runs)
            raise

    def _observables(self, amp: torch.Tensor, phase: torch.Tensor, raw: torch.Tensor, origins: np.ndarray,
                     runs: list[tuple[str, str]], planes: tuple[torch.Tensor, torch.Tensor]) -> dict[str, np.ndarray]:
        """The frames' observables (NaN, and an error logged, if they cannot be had: the
        reconstructions still go out, and the model is not retried for it)."""
        try:
            obs = frame_observables(amp, phase, raw, torch.from_numpy(origins), bin=self.crop_bin,
                                    reference=self._reference(amp, phase, runs), planes=planes)
            return {k: v.cpu().numpy() for k, v in obs.items()}
        except Exception:
            logger.exception("observables failed for %d frames (runs %s): NaN", len(runs), sorted(set(runs)))
            return {k: np.full(len(runs), np.nan, np.float32) for k in OBSERVABLES if k != "chi2"}

    def _reference(self, amp: torch.Tensor, phase: torch.Tensor, runs: list[tuple[str, str]]) -> torch.Tensor:
        """Each frame's run and stream's first object (:func:`reference_objects`), kept from its
        first frame until the run's end: ``(1, 2, N, N)`` for a batch of one stream, ``(n, 2, N, N)`` otherwise."""
        uids = list(dict.fromkeys(runs))
        for uid in uids:
            if uid not in self._references:
                first = runs.index(uid)
                self._references[uid] = reference_objects(amp[first : first + 1], phase[first : first + 1])
        if len(uids) == 1:
            return self._references[uids[0]]
        bank = torch.cat([self._references[u] for u in uids])
        where = {u: i for i, u in enumerate(uids)}
        return bank[torch.tensor([where[u] for u in runs], device=bank.device)]

    def _handle(self, items: list) -> None:
        if isinstance(items[0], RunMarker):
            self._marker(items[0])
            return
        blocks: list[FrameBlock] = items
        failed = True
        try:  # whatever happens, the blocks are finished: flush() must never wait for them forever
            if torch.get_num_threads() != self._threads:
                torch.set_num_threads(self._threads)
            version, name = self._take_new_model()
            frames = np.concatenate([b.frames for b in blocks]).astype(np.float32, copy=False)
            origins = np.concatenate([b.origins for b in blocks]).reshape(-1, 2)
            runs = [(b.run_uid, b.stream) for b in blocks for _ in range(len(b))]  # each frame's run and stream
            try:
                amp, phase, chi2, obs = self._infer(frames, origins, runs)
            except Exception:
                logger.exception("inference failed for %d frames (runs %s)", len(frames),
                                 sorted({b.run_uid for b in blocks}))
                return
            done = time.monotonic()
            self.stats.batches += 1
            i = 0
            for b in self._by_run(blocks):
                n = len(b)
                result = ResultBlock(b, amp[i : i + n], phase[i : i + n], done - b.received, chi2[i : i + n],
                                     version, name, {k: v[i : i + n] for k, v in obs.items()})
                i += n
                self.stats.latencies.extend(result.latency)
                self._run_versions.setdefault(b.run_uid, set()).add(version)
                self.publish(result)
                for taker in (self.refiner, self.adapter):
                    if taker is not None:
                        try:
                            taker.offer(result)
                        except Exception:  # published already: the frames are not lost, only not taken
                            logger.exception("%s could not take frames %s..%s of run %s", type(taker).__name__,
                                             b.seq_nums[0], b.seq_nums[-1], b.run_uid)
            failed = False
        finally:
            self._finish(blocks, failed=failed)

    @staticmethod
    def _by_run(blocks: list[FrameBlock]) -> list[FrameBlock]:
        """Merge consecutive blocks of the same run and stream: one sink write per run per batch."""
        groups: list[list[FrameBlock]] = []
        for b in blocks:
            if groups and (groups[-1][0].run_uid, groups[-1][0].stream) == (b.run_uid, b.stream):
                groups[-1].append(b)
            else:
                groups.append([b])
        return [FrameBlock.concat(g) for g in groups]

    def _take_new_model(self) -> tuple[int, str]:
        """Put a swapped model in (between batches); the version and name of the model in use."""
        with self._cond:
            model, self._next_model = self._next_model, None
            version = len(self.model_versions) - 1 if model is not None else self.model_version
            name = self.model_versions[version]["name"]
        if model is not None:
            self.model = model
            self._pin = model.device.type == "cuda"
            logger.info("model version %d (%s) in use from this batch on", version, name)
        return version, name

    def _marker(self, marker: RunMarker) -> None:
        if marker.kind == "close":
            for key in [k for k in self._references if k[0] == marker.run_uid]:
                del self._references[key]
            used = sorted(self._run_versions.pop(marker.run_uid, {self.model_version}))
            marker.document["model_versions"] = [self.model_versions[v] for v in used]
        if self.adapter is not None:
            self.adapter.marker(marker)
        if marker.kind == "open" and self.refiner is not None:  # sinks see the last run's end first
            if not self.refiner.drain(timeout=self.MARKER_WAIT):
                logger.warning("run %s opens while the refiner is still on the runs before it (%s s)",
                               marker.run_uid, self.MARKER_WAIT)
        if marker.kind == "close" and self.refiner is not None:
            self.refiner.forward(marker)  # after the run's refinements; the model does not wait
        else:
            self.publish(marker)
        with self._cond:
            self._pending[marker.run_uid] -= 1
            if self._pending[marker.run_uid] == 0:
                del self._pending[marker.run_uid]
            self._cond.notify_all()

    def _finish(self, blocks: list[FrameBlock], failed: bool = False) -> None:
        if failed and self.on_failed is not None:
            for b in blocks:
                try:
                    self.on_failed(b)
                except Exception:
                    logger.exception("on_failed could not take frames %s..%s of run %s", b.seq_nums[0],
                                     b.seq_nums[-1], b.run_uid)
        with self._cond:
            for b in blocks:
                if failed:
                    self.stats.frames_failed += len(b)
                else:
                    self.stats.frames_out += len(b)
                self._pending[b.run_uid] -= len(b)
                if self._pending[b.run_uid] == 0:
                    del self._pending[b.run_uid]
            if self.stats.frames_out >= COMPILE_AFTER and not self._compiling_ahead:
                self._compiling_ahead = warm_up(self.model.size, self.model.device) or True  # a process making
                # many frames pays the seconds of compiling
            self._cond.notify_all()
