"""The frame intake: reads frames from files and crops them, off the RunEngine's thread.

The callback runs on the RunEngine's thread (or a dispatcher's), where a slow file read would
hold up the scan. :class:`FrameIntake` is one thread between the callback and the
:class:`~cdinn_stream.live.engine.InferenceEngine`: the callback queues each run's work on it in
document order (the run's opening, blocks cropped from inline frames, reads of frames in files,
the run's end) and returns; the intake reads (only the Bragg peak's window of a frame, when the
peak is tracked: :class:`~cdinn_stream.live.frames.FileFrames`), crops and hands the blocks and
markers to the engine in that order.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from .worker import Worker

__all__ = ["FrameIntake"]

logger = logging.getLogger(__name__)


class FrameIntake(Worker):
    """One thread that runs queued jobs in order (see the module docstring).

    Args:
        max_frames: frames waiting at most; :meth:`put` waits up to ``block_timeout`` s for room,
            then refuses (the caller rejects and counts the frames). Run markers (``frames=0``)
            are never refused.
    """

    def __init__(self, *, max_frames: int = 20_000, block_timeout: float = 1.0):
        super().__init__("cdinn-intake")
        self.max_frames = max_frames
        self.block_timeout = block_timeout
        self._queued = 0
        self._start()

    def put(self, job: Callable[[], None], frames: int = 0) -> bool:
        """Queue ``job`` (``frames`` of them); False when there was no room in time."""
        deadline = time.monotonic() + self.block_timeout
        with self._cond:
            if self._closed:
                raise RuntimeError("the frame intake is closed")
            while frames and self._queued + frames > self.max_frames and self._queued > 0:
                left = deadline - time.monotonic()
                if left <= 0 or not self.alive:
                    return False
                self._cond.wait(min(left, 0.05))
            self._queue.append((job, frames))
            self._queued += frames
            self._cond.notify_all()
        return True

    def _handle(self, items: list) -> None:
        for job, frames in items:
            try:
                job()
            except Exception:
                logger.exception("frame intake: a job failed")
            finally:
                with self._cond:
                    self._queued -= frames
                    self._cond.notify_all()
