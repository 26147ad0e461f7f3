"""EPICS sink: the latest reconstruction and pipeline figures, written with pyepics.

PVs (served by ``cdinn-stream ioc --prefix P``, see :mod:`cdinn_stream.apps.ioc`): ``P:AMPLITUDE``
and ``P:PHASE`` (waveforms of ``h*w`` values, row-major), ``P:SHAPE`` (``[h, w]``),
``P:SUPPORT_SIZE`` (pixels), ``P:PHASE_RMS`` (rad: the standard deviation of the phase inside the
support, about its circular mean), ``P:FRAME_RATE`` (frames/s), ``P:FRAMES`` (count), ``P:SEQ_NUM``,
``P:CHI2`` (the latest frame's trust figure), ``P:CHI2_MEDIAN`` (median of the run's last
:data:`CHI2_WINDOW` frames), ``P:MODEL_VERSION``, ``P:RUN_UID`` and ``P:STATUS``; and the
latest frame's observables (:data:`cdinn_stream.core.observables.OBSERVABLES`), one PV each, named
in :data:`OBSERVABLE_PVS`: ``P:PEAK_ROW``, ``P:PEAK_COL``, ``P:INTENSITY``, ``P:SUPPORT_AREA``,
``P:CENTROID_ROW``, ``P:CENTROID_COL``, ``P:PHASE_MEAN``, ``P:STRAIN_RMS``, ``P:CORRELATION``
(what feedback plans read: :mod:`cdinn_stream.apps.plans`). ``P:SEQ_NUM`` is written last, once the
frame's other values are in, and set to 0 before ``P:RUN_UID`` changes at a run's start (or when
the IOC comes back mid-run): a reader that sees a run's frame ``n`` there and then reads the values
gets that frame's or a later one's (a later write may land between its reads). One pipeline and
one stream per prefix: two writers, or two streams of a run, would mix their frames on the PVs.

Channel Access finds an IOC by UDP broadcast, which usually does not reach an IOC bound to
127.0.0.1 (``cdinn-stream ioc``'s default): point the client at it before the process first uses
EPICS, with ``EPICS_CA_ADDR_LIST=127.0.0.1 EPICS_CA_AUTO_ADDR_LIST=NO EPICS_CA_SERVER_PORT=<the IOC's port>``
(``cdinn-stream ioc`` prints the line to export when it starts).

A write counts as delivered only when the IOC has confirmed every put of it (put with completion
callback; the write waits up to ``timeout`` s for them all): ``frames_delivered``.
Frames of a write that did not reach the IOC count in ``frames_undelivered``, which the sink's
thread (:class:`~cdinn_stream.live.publish.SinkThread`) reports as dropped, the write as an error.
Without an IOC the sink warns once, saying how to point Channel Access at it, and goes on (it
tries to reconnect every ``retry`` seconds).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import time
from collections import deque

import numpy as np

from ..core.observables import OBSERVABLES
from ..live.blocks import ResultBlock

__all__ = ["EpicsSink", "PV_NAMES", "OBSERVABLE_PVS", "CA_HINT", "CHI2_WINDOW"]

logger = logging.getLogger(__name__)

#: observable -> the PV (after the prefix) of its latest value (``chi2`` is ``CHI2``, below)
OBSERVABLE_PVS = {name: name.upper() for name in OBSERVABLES if name != "chi2"}

PV_NAMES = ("AMPLITUDE", "PHASE", "SHAPE", "SUPPORT_SIZE", "PHASE_RMS", "FRAME_RATE", "FRAMES", "SEQ_NUM",
            "CHI2", "CHI2_MEDIAN", "MODEL_VERSION", "RUN_UID", "STATUS", *OBSERVABLE_PVS.values())

#: frames of the run over which ``P:CHI2_MEDIAN`` is the median
CHI2_WINDOW = 1000

#: how to point Channel Access at the IOC (in the sink's warning)
CA_HINT = ("Channel Access finds IOCs by UDP broadcast, which usually does not reach an IOC on 127.0.0.1: "
           "before this process first uses EPICS, set EPICS_CA_ADDR_LIST=<the IOC's address, 127.0.0.1 for "
           "`cdinn-stream ioc`> EPICS_CA_AUTO_ADDR_LIST=NO EPICS_CA_SERVER_PORT=<its port, 5064 by default> "
           "(`cdinn-stream ioc` prints the line to export); here they are ")


def _ca_settings() -> str:
    return ", ".join(f"{v}={os.environ.get(v, '(unset)')}" for v in
                     ("EPICS_CA_ADDR_LIST", "EPICS_CA_AUTO_ADDR_LIST", "EPICS_CA_SERVER_PORT"))


class EpicsSink:
    """Writes the latest result of each batch to the IOC's PVs (see the module docstring).

    Counters: ``writes`` (writes the IOC confirmed), ``frames_delivered`` (frames of those writes)
    and ``frames_undelivered`` (frames of writes that did not reach the IOC)."""

    def __init__(self, prefix: str = "CDINN:", *, timeout: float = 1.0, retry: float = 10.0):
        if importlib.util.find_spec("epics") is None:
            raise ImportError("EpicsSink needs pyepics: pip install 'cdinn-stream[epics]'")
        self.prefix = prefix
        self.timeout = timeout
        self.retry = retry
        self._pvs: dict | None = None
        self._sent: list = []  # PVs put since the last _confirm
        self._warned = False
        self._next_try = 0.0
        self._frames = 0
        self._run_uid: str | None = None  # the run being written
        self._announced: str | None = None  # the run the IOC was told of (RUN_UID)
        self._chi2: deque[float] = deque(maxlen=CHI2_WINDOW)
        self._rate_t0: float | None = None
        self._rate_n = 0
        self.writes = 0
        self.frames_delivered = 0
        self.frames_undelivered = 0

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
            logger.warning("no EPICS IOC answers for %s*: going on without EPICS feedback (results count as "
                           "dropped in the sink's stats until it answers). %s%s", self.prefix, CA_HINT,
                           _ca_settings())
            self._warned = True
        return False

    def _put(self, name: str, value) -> None:
        """Send a put that the IOC confirms (:meth:`_confirm` waits for it)."""
        pv = self._pvs[name]
        if not pv.connected:
            self._pvs = None
            raise ConnectionError(f"{self.prefix}{name} disconnected")
        self._sent.append(pv)
        if pv.put(value, use_complete=True) is None:
            raise ConnectionError(f"{self.prefix}{name} disconnected")

    def _confirm(self) -> None:
        """Wait until the IOC has confirmed every put sent since the last call (``timeout`` s at most)."""
        import epics

        sent, self._sent = self._sent, []
        end = time.monotonic() + self.timeout
        while not all(pv.put_complete for pv in sent):
            if time.monotonic() > end:
                late = ", ".join(pv.pvname for pv in sent if not pv.put_complete)
                raise ConnectionError(f"the IOC did not confirm the puts to {late} within {self.timeout} s")
            epics.ca.pend_event(1e-3)  # runs callbacks where CA does not do so by itself

    def open_run(self, run_uid: str, start: dict) -> None:
        self._frames = 0
        self._chi2.clear()
        self._run_uid, self._announced = run_uid, None
        if self._connect():
            self._safe(self._announce)

    def _announce(self) -> None:
        """The current run to the IOC: ``SEQ_NUM`` 0 first, so that a reader that sees the new
        ``RUN_UID`` sees no frame of the old run as this run's (again after the IOC comes back)."""
        self._put("SEQ_NUM", 0)
        self._put("FRAMES", 0)
        self._confirm()
        self._put("RUN_UID", self._run_uid)
        self._put("STATUS", "running")
        self._confirm()
        self._announced = self._run_uid

    def write(self, result: ResultBlock) -> None:
        now = time.monotonic()
        n = len(result.amplitude)
        self._frames += n
        if self._rate_t0 is None:  # from when these frames entered the pipeline: a rate even for one write
            received = np.asarray(result.frames.received, float)
            self._rate_t0, self._rate_n = (float(received.min()) if received.size else now), 0
        self._rate_n += n
        self._chi2.extend(np.asarray(result.chi2, float)[-CHI2_WINDOW:].tolist())
        if not self._connect():
            self.frames_undelivered += n
            return
        amp, phase = result.amplitude[-1], result.phase[-1]
        support = amp > 0.1
        spread = 0.0  # standard deviation of the phase inside the support, about its circular mean
        if support.any():  # modulo 2 pi: the phase is wrapped to [-pi, pi)
            inside = phase[support].astype(np.float64)
            deviation = np.angle(np.exp(1j * (inside - np.angle(np.exp(1j * inside).sum()))))
            spread = float(np.sqrt(np.mean(deviation**2)))
        elapsed = now - self._rate_t0
        rate = self._rate_n / elapsed if elapsed > 0 else 0.0
        if elapsed > 2.0:
            self._rate_t0, self._rate_n = now, 0

        def put_all():
            if self._announced != self._run_uid:  # the IOC was away when the run opened, or restarted
                self._announce()
            self._put("AMPLITUDE", amp.ravel())
            self._put("PHASE", phase.ravel())
            self._put("SHAPE", np.array(amp.shape, np.int32))
            self._put("SUPPORT_SIZE", int(support.sum()))
            self._put("PHASE_RMS", spread)
            self._put("FRAME_RATE", rate)
            self._put("FRAMES", self._frames)
            self._put("CHI2", float(result.chi2[-1]))
            self._put("CHI2_MEDIAN", float(np.median(self._chi2)))
            self._put("MODEL_VERSION", int(result.model_version))
            for name, values in result.observables.items():
                if name in OBSERVABLE_PVS:
                    self._put(OBSERVABLE_PVS[name], float(values[-1]))
            self._confirm()
            # SEQ_NUM last, once the frame's values are in: a reader that sees it sees them (feedback plans)
            self._put("SEQ_NUM", int(result.frames.seq_nums[-1]))
            self._confirm()

        if self._safe(put_all):
            self.writes += 1
            self.frames_delivered += n
        else:
            self.frames_undelivered += n

    def close_run(self, run_uid: str, summary: dict) -> None:
        if self._connect():
            status = f"done {summary.get('stop', {}).get('exit_status', '')}".strip()
            self._safe(lambda: (self._put("STATUS", status), self._confirm()))

    def _safe(self, fn) -> bool:
        try:
            fn()
            return True
        except Exception as err:
            self._pvs, self._sent, self._announced = None, [], None  # tell it the run again when it is back
            if not self._warned:
                logger.warning("EPICS IOC %s went away (%s): going on without EPICS feedback (results count as "
                               "dropped in the sink's stats until it is back)", self.prefix, err)
                self._warned = True
            self._next_try = time.monotonic() + self.retry
            return False
