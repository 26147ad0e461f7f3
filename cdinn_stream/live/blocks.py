"""What travels through the pipeline: frame blocks, run markers, results, and the sink protocol."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

__all__ = ["FrameBlock", "RunMarker", "ResultBlock", "RefinedBlock", "Sink", "Idles", "Spills", "WritesRefined",
           "CountsUndelivered", "Closes", "seq_ranges", "range_seq_nums", "MAX_RANGES"]


#: ranges :func:`seq_ranges` keeps at most (the first ones): a run's metadata stays small
MAX_RANGES = 10_000


def seq_ranges(seq_nums, limit: int = MAX_RANGES) -> list[list[int]]:
    """seq_nums as inclusive ``[first, last]`` ranges, in order and each once (for a run's
    metadata: ``[[1, 5000]]``, not 5000 numbers); the first ``limit`` ranges at most."""
    seq = np.unique(np.asarray(seq_nums, np.int64))
    if not len(seq):
        return []
    breaks = np.flatnonzero(np.diff(seq) != 1)
    starts, ends = np.r_[0, breaks + 1][:limit], np.r_[breaks, len(seq) - 1][:limit]
    return [[int(seq[a]), int(seq[b])] for a, b in zip(starts, ends, strict=True)]


def range_seq_nums(ranges) -> np.ndarray:
    """The seq_nums of :func:`seq_ranges`' ranges."""
    parts = [np.arange(int(a), int(b) + 1) for a, b in ranges or []]
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


@dataclass
class FrameBlock:
    """Cropped frames of one run and stream, ready for the model.

    Attributes:
        run_uid: uid of the run's start document.
        stream: stream name (e.g. ``"primary"``).
        seq_nums: ``(n,)`` event sequence numbers.
        times: ``(n,)`` event timestamps (s since the epoch).
        frames: ``(n, size, size)`` float32 intensities, peak at ``size // 2``.
        origins: ``(n, 2)`` crop origin (row, column) in the detector frame.
        peaks: ``(n, 2)`` Bragg peak (row, column) in the detector frame.
        received: ``(n,)`` ``time.monotonic()`` when the frames entered the pipeline.
        wide: ``(n, m, m)`` float32 crops of the refinement window at the same centre (``m`` a
            multiple of ``size``; :class:`~cdinn_stream.live.callback.FrameCropper`'s
            ``refine_window``), or ``None`` when refinement uses the model's window.
    """

    run_uid: str
    stream: str
    seq_nums: np.ndarray
    times: np.ndarray
    frames: np.ndarray
    origins: np.ndarray
    peaks: np.ndarray
    received: np.ndarray
    wide: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.seq_nums)

    def split(self, n: int) -> tuple[FrameBlock, FrameBlock]:
        """The first ``n`` frames and the rest."""
        return self.take(slice(None, n)), self.take(slice(n, None))

    def take(self, index) -> FrameBlock:
        """The frames at ``index`` (a slice, or integer positions)."""
        return FrameBlock(self.run_uid, self.stream, *(None if a is None else a[index] for a in self.arrays()))

    @staticmethod
    def concat(blocks: list[FrameBlock]) -> FrameBlock:
        """One block from consecutive blocks of the same run and stream."""
        if len(blocks) == 1:
            return blocks[0]
        arrays = zip(*(b.arrays() for b in blocks), strict=True)
        return FrameBlock(blocks[0].run_uid, blocks[0].stream,
                          *(None if any(x is None for x in a) else np.concatenate(a) for a in arrays))

    def arrays(self) -> tuple[np.ndarray | None, ...]:
        """The per-frame arrays, in field order (for splitting and joining blocks)."""
        return self.seq_nums, self.times, self.frames, self.origins, self.peaks, self.received, self.wide


@dataclass
class RunMarker:
    """Start or end of a run in the queue; sinks get ``open_run`` / ``close_run`` in order."""

    kind: str  # "open" or "close"
    run_uid: str
    document: dict


@dataclass
class ResultBlock:
    """Reconstructions of a :class:`FrameBlock`, in the same order.

    Attributes:
        frames: the input block (identity, crop origins, peaks).
        amplitude: ``(n, size, size)`` float32 in [0, 1].
        phase: ``(n, size, size)`` float32 radians at every pixel (meaningful where amplitude > 0.1).
        latency: ``(n,)`` seconds from entering the pipeline to the model's output.
        chi2: ``(n,)`` the trust figure: chi^2 of the reconstruction's ``|FT|^2`` against the
            measured crop (the paper's metric, best scale; :func:`~cdinn_stream.core.metrics.fourier_chi2`).
        model_version: which weights made it: 0 for the model the pipeline started with, ``k``
            after the ``k``-th hot swap (:meth:`~cdinn_stream.live.engine.InferenceEngine.swap_model`).
        model: the name of those weights (a model card's name).
        observables: ``(n,)`` float32 arrays by name, :data:`cdinn_stream.core.observables.OBSERVABLES`
            but ``chi2`` (empty when they were not computed).
    """

    frames: FrameBlock
    amplitude: np.ndarray
    phase: np.ndarray
    latency: np.ndarray
    chi2: np.ndarray
    model_version: int = 0
    model: str = ""
    observables: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def run_uid(self) -> str:
        return self.frames.run_uid


class Sink(Protocol):
    """Where results go (ZeroMQ, Tiled, EPICS, a list in a test). Each sink is called from its own
    thread (:class:`~cdinn_stream.live.publish.SinkThread`), never from two at once."""

    def open_run(self, run_uid: str, start: dict) -> None:
        """A run begins; ``start`` is its start document."""

    def write(self, result: ResultBlock) -> None:
        """Results of some frames of a run, in frame order."""

    def close_run(self, run_uid: str, summary: dict) -> None:
        """Every frame of the run has been written; ``summary`` holds the stop document and counts."""


@runtime_checkable
class Idles(Protocol):
    """A sink that does something while no results come (called about once a second)."""

    def idle(self) -> None: ...


@runtime_checkable
class Spills(Protocol):
    """A sink that can park results cheaply (local disk) while it is behind and write them back
    later. The sink thread sets the sink's ``behind`` attribute to a function saying whether its
    backlog is past the parking threshold, so that the sink's write-back can stop early."""

    def spill(self, result: ResultBlock) -> None: ...


@runtime_checkable
class WritesRefined(Protocol):
    """A sink that stores refined results (:class:`RefinedBlock`) too."""

    def write_refined(self, block: RefinedBlock) -> None: ...


@runtime_checkable
class Closes(Protocol):
    """A sink holding a resource (a socket) to release when the pipeline that owns it closes."""

    def close(self) -> None: ...


@runtime_checkable
class CountsUndelivered(Protocol):
    """A sink whose ``write`` can take frames it cannot deliver (the EPICS sink without its IOC):
    it counts them, and the sink thread counts them as dropped, not written."""

    frames_undelivered: int


@dataclass
class RefinedBlock:
    """NN-seeded ER/HIO refinements of some frames of one run (the pipeline's second result type).

    Attributes:
        frames: identity and measured crops of the refined frames (a subset of a run's frames).
        amplitude: ``(n, m, m)`` float32, scaled to a maximum of 1, on the refinement grid (``m``:
            the model's size, or the refinement window's, :attr:`FrameBlock.wide`).
        phase: ``(n, m, m)`` float32 radians, 0 outside the support.
        chi2_nn: ``(n,)`` chi^2 of the network's result against the pattern refined on (the
            measured crop, or the wider one).
        chi2_refined: ``(n,)`` chi^2 of the refined result against the same pattern.
        iterations: ER/HIO iterations run from the network's result.
        model_version: the version of the weights whose result was refined (``ResultBlock.model_version``).
    """

    frames: FrameBlock
    amplitude: np.ndarray
    phase: np.ndarray
    chi2_nn: np.ndarray
    chi2_refined: np.ndarray
    iterations: int
    model_version: int = 0

    @property
    def run_uid(self) -> str:
        return self.frames.run_uid
