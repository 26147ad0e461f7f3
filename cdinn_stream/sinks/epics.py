"""EPICS sink: the latest reconstruction and pipeline figures, written with pyepics.

PVs (served by ``cdinn-stream ioc --prefix P``, see :mod:`cdinn_stream.apps.ioc`): ``P:AMPLITUDE``
and ``P:PHASE`` (waveforms of ``h*w`` values, row-major), ``P:SHAPE`` (``[h, w]``),
``P:SUPPORT_SIZE`` (pixels), ``P:PHASE_RMS`` (rad, inside the support, about the circular mean), ``P:FRAME_RATE``
(frames/s), ``P:FRAMES`` (count), ``P:SEQ_NUM``, ``P:RUN_UID`` and ``P:STATUS``.

Without an IOC the sink warns once and goes on (it tries to reconnect every ``retry`` seconds).
"""

from __future__ import annotations

import logging
import time

import numpy as np

from ..live.blocks import ResultBlock

__all__ = ["EpicsSink", "PV_NAMES"]

logger = logging.getLogger(__name__)

PV_NAMES = ("AMPLITUDE", "PHASE", "SHAPE", "SUPPORT_SIZE", "PHASE_RMS", "FRAME_RATE", "FRAMES", "SEQ_NUM",
            "RUN_UID", "STATUS")


class EpicsSink:
    """Writes the latest result of each batch to the IOC's PVs (see the module docstring)."""

    def __init__(self, prefix: str = "CDINN:", *, timeout: float = 1.0, retry: float = 10.0):
        self.prefix = prefix
        self.timeout = timeout
        self.retry = retry
        self._pvs: dict | None = None
        self._warned = False
        self._next_try = 0.0
        self._frames = 0
        self._rate_t0: float | None = None
        self._rate_n = 0
        self.writes = 0

    def _connect(self) -> bool:
        if self._pvs is not None:
            return True
        if time.monotonic() < self._next_try:
            return False
        import epics

        pvs = {n: epics.PV(self.prefix + n, connection_timeout=self.timeout) for n in PV_NAMES}
        if all(pv.wait_for_connection(timeout=self.timeout) for pv in pvs.values()):
            self._pvs = pvs
            if self._warned:
                logger.warning("EPICS IOC %s is back", self.prefix)
            self._warned = False
            return True
        for pv in pvs.values():
            pv.disconnect()
        self._next_try = time.monotonic() + self.retry
        if not self._warned:
            logger.warning("no EPICS IOC answers for %s*: going on without EPICS feedback", self.prefix)
            self._warned = True
        return False

    def _put(self, name: str, value) -> None:
        pv = self._pvs[name]
        if not pv.connected:
            self._pvs = None
            raise ConnectionError(f"{self.prefix}{name} disconnected")
        pv.put(value, wait=False)

    def open_run(self, run_uid: str, start: dict) -> None:
        self._frames = 0
        if self._connect():
            self._safe(lambda: (self._put("RUN_UID", run_uid), self._put("STATUS", "running")))

    def write(self, result: ResultBlock) -> None:
        now = time.monotonic()
        n = len(result.amplitude)
        self._frames += n
        if self._rate_t0 is None:
            self._rate_t0, self._rate_n = now, 0
        self._rate_n += n
        if not self._connect():
            return
        amp, phase = result.amplitude[-1], result.phase[-1]
        support = amp > 0.1
        rms = 0.0
        if support.any():  # about the circular mean, modulo 2 pi: the phase is wrapped to [-pi, pi)
            inside = phase[support].astype(np.float64)
            spread = np.angle(np.exp(1j * (inside - np.angle(np.exp(1j * inside).sum()))))
            rms = float(np.sqrt(np.mean(spread**2)))
        elapsed = now - self._rate_t0
        rate = self._rate_n / elapsed if elapsed > 0 else 0.0
        if elapsed > 2.0:
            self._rate_t0, self._rate_n = now, 0

        def put_all():
            self._put("AMPLITUDE", amp.ravel())
            self._put("PHASE", phase.ravel())
            self._put("SHAPE", np.array(amp.shape, np.int32))
            self._put("SUPPORT_SIZE", int(support.sum()))
            self._put("PHASE_RMS", rms)
            self._put("FRAME_RATE", rate)
            self._put("FRAMES", self._frames)
            self._put("SEQ_NUM", int(result.frames.seq_nums[-1]))

        if self._safe(put_all):
            self.writes += 1

    def close_run(self, run_uid: str, summary: dict) -> None:
        if self._connect():
            self._safe(lambda: self._put("STATUS", f"done {summary.get('stop', {}).get('exit_status', '')}".strip()))

    def _safe(self, fn) -> bool:
        try:
            fn()
            return True
        except Exception as err:
            self._pvs = None
            if not self._warned:
                logger.warning("EPICS IOC %s went away (%s): going on without EPICS feedback", self.prefix, err)
                self._warned = True
            self._next_try = time.monotonic() + self.retry
            return False
