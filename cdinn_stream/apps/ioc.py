"""The cdinn-stream EPICS IOC (caproto): PVs for beamline feedback.

``cdinn-stream ioc --prefix CDINN:`` serves, for frames of up to ``max_size x max_size``:

========================  =================================================================
PV                        meaning
========================  =================================================================
``P:AMPLITUDE``           latest amplitude, row-major waveform (``P:SHAPE`` gives h, w)
``P:PHASE``               latest phase (rad), row-major waveform
``P:SHAPE``               ``[h, w]`` of the two waveforms
``P:SUPPORT_SIZE``        pixels in the latest support (amplitude > 0.1)
``P:PHASE_RMS``           RMS phase inside the support (rad)
``P:FRAME_RATE``          reconstructed frames per second
``P:FRAMES``              frames reconstructed in the current run
``P:SEQ_NUM``             seq_num of the latest frame
``P:RUN_UID``             uid of the current run
``P:STATUS``              ``idle``, ``running`` or ``done <exit_status>``
========================  =================================================================

The server binds 127.0.0.1 unless ``--interfaces`` says otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading

import numpy as np
from caproto import ChannelType
from caproto.server import PVGroup, pvproperty

__all__ = ["ReconstructionIOC", "run_ioc", "IOCThread"]


def _quiet_beacons() -> None:
    """caproto logs a traceback each time a beacon finds no listener on 127.0.0.1:5065."""
    logging.getLogger("caproto.ctx").addFilter(lambda r: not r.getMessage().startswith("Failed to send beacon"))


def make_ioc_class(max_size: int = 128) -> type[PVGroup]:
    """A PVGroup class whose waveforms hold ``max_size**2`` values."""
    n = max_size * max_size

    class ReconstructionIOC(PVGroup):
        """PVs of the latest reconstruction (see the module docstring)."""

        AMPLITUDE = pvproperty(value=np.zeros(n).tolist(), dtype=ChannelType.FLOAT, max_length=n,
                               doc="latest amplitude, row-major")
        PHASE = pvproperty(value=np.zeros(n).tolist(), dtype=ChannelType.FLOAT, max_length=n,
                           doc="latest phase in radians, row-major")
        SHAPE = pvproperty(value=[0, 0], dtype=ChannelType.LONG, max_length=2, doc="h, w of the waveforms")
        SUPPORT_SIZE = pvproperty(value=0, dtype=int, doc="pixels in the support")
        PHASE_RMS = pvproperty(value=0.0, dtype=float, precision=4, units="rad", doc="RMS phase in the support")
        FRAME_RATE = pvproperty(value=0.0, dtype=float, precision=1, units="Hz", doc="frames per second")
        FRAMES = pvproperty(value=0, dtype=int, doc="frames reconstructed in this run")
        SEQ_NUM = pvproperty(value=0, dtype=int, doc="seq_num of the latest frame")
        RUN_UID = pvproperty(value="", dtype=ChannelType.STRING, doc="current run uid")
        STATUS = pvproperty(value="idle", dtype=ChannelType.STRING, doc="pipeline status")

    return ReconstructionIOC


ReconstructionIOC = make_ioc_class()


def run_ioc(prefix: str = "CDINN:", *, interfaces: tuple[str, ...] = ("127.0.0.1",), max_size: int = 128) -> None:
    """Serve the PVs until interrupted (blocking)."""
    from caproto.server import run

    _quiet_beacons()
    ioc = make_ioc_class(max_size)(prefix=prefix)
    run(ioc.pvdb, interfaces=list(interfaces), log_pv_names=True)


class IOCThread:
    """The IOC on its own asyncio loop in a daemon thread (for demos and tests)."""

    def __init__(self, prefix: str = "CDINN:", *, interfaces: tuple[str, ...] = ("127.0.0.1",), max_size: int = 128):
        from caproto.asyncio.server import start_server

        _quiet_beacons()
        self.prefix = prefix
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        ioc = make_ioc_class(max_size)(prefix=prefix)

        async def _startup(async_lib):
            self._started.set()

        self._task = self._loop.create_task(start_server(ioc.pvdb, interfaces=list(interfaces),
                                                         startup_hook=_startup))
        self._thread = threading.Thread(target=self._run, name="cdinn-ioc", daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        with contextlib.suppress(asyncio.CancelledError):
            self._loop.run_until_complete(self._task)

    def start(self, timeout: float = 10.0) -> IOCThread:
        self._thread.start()
        if not self._started.wait(timeout):
            raise RuntimeError("the IOC did not start")
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._loop.call_soon_threadsafe(self._task.cancel)
        self._thread.join(timeout)
