"""One bounded worker: a queue under a condition, served by one daemon thread.

The inference engine, each sink's thread and the refiner are all this shape: producers queue
work under the lock and return, one thread takes a round of it (under the lock) and handles it
(outside the lock), and callers can wait for the queue to empty (:meth:`Worker.drain`) and stop
the thread (:meth:`Worker.close`). Each subclass says what a round is (:meth:`Worker._take`),
what handling it means (:meth:`Worker._handle`) and where its bound lies (in its ``put``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable

__all__ = ["Worker"]

logger = logging.getLogger(__name__)

#: how often a waiting thread looks at its clock and the other thread's life (seconds)
POLL = 0.05


class Worker:
    """A queue, its condition and the one thread that serves it.

    Subclasses set their own state, then call :meth:`_start`; they implement :meth:`_take`
    (with the lock held and the queue not empty: pop what one round handles, as a list) and
    :meth:`_handle` (without the lock). With ``idle_interval`` set, :meth:`_idle` is called
    (without the lock) after that many seconds of an empty queue, and again after each as many.
    """

    #: seconds of an empty queue between calls of :meth:`_idle` (``None``: never)
    idle_interval: float | None = None

    def __init__(self, name: str):
        self.name = name
        self._cond = threading.Condition()
        self._queue: deque = deque()
        self._working: list = []  # the round being handled
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)

    def _start(self) -> None:
        self._thread.start()

    # -- callers ---------------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        """Whether the thread runs."""
        return self._thread.is_alive()

    @property
    def busy(self) -> bool:
        """Whether the thread is handling a round now."""
        return bool(self._working)

    def wait_while(self, busy: Callable[[], bool], timeout: float | None = None) -> bool:
        """Wait (on the condition) while ``busy()``; False if ``timeout`` s pass or the thread died."""
        end = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while busy():
                left = None if end is None else end - time.monotonic()
                if (left is not None and left <= 0) or not self._thread.is_alive():
                    return False
                self._cond.wait(POLL if left is None else min(left, POLL))
        return True

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until everything queued so far is handled."""
        return self.wait_while(lambda: bool(self._queue or self._working), timeout)

    def close(self, timeout: float | None = 30.0) -> bool:
        """Handle what is queued, then stop the thread; False if work was left after ``timeout`` s."""
        done = self.drain(timeout)
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)
        return done

    # -- the thread ------------------------------------------------------------------------
    def _take(self) -> list:
        """Pop one round of work (lock held, queue not empty); default: everything queued."""
        items = list(self._queue)
        self._queue.clear()
        return items

    def _handle(self, items: list) -> None:
        """Handle one round (lock not held); each subclass says what handling means."""
        raise NotImplementedError(f"{type(self).__name__} must say how it handles a round")

    def _idle(self) -> None:
        """Called after ``idle_interval`` s of an empty queue (lock not held)."""

    def _next(self) -> list | None:
        """The next round, ``[]`` when idle time is due, ``None`` once closed and empty."""
        with self._cond:
            quiet_since = time.monotonic()
            while not self._queue:
                if self._closed:
                    return None
                self._cond.wait(0.1)
                if (self.idle_interval is not None and not self._queue
                        and time.monotonic() - quiet_since >= self.idle_interval):
                    return []
            self._working = self._take()
            return self._working

    def _loop(self) -> None:
        while (items := self._next()) is not None:
            if not items:
                try:
                    self._idle()
                except Exception:
                    logger.exception("%s failed while idle", self.name)
                continue
            try:
                self._handle(items)
            except Exception:
                logger.exception("%s failed on %d items", self.name, len(items))
            finally:
                with self._cond:
                    self._working = []
                    self._cond.notify_all()
