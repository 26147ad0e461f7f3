"""The cdinn-stream EPICS IOC (caproto): PVs for beamline feedback.

``cdinn-stream ioc --prefix CDINN:`` serves, for frames of up to ``max_size x max_size``:

========================  =================================================================
PV                        meaning
========================  =================================================================
``P:AMPLITUDE``           latest amplitude, row-major waveform (``P:SHAPE`` gives h, w)
``P:PHASE``               latest phase (rad), row-major waveform
``P:SHAPE``               ``[h, w]`` of the two waveforms
``P:SUPPORT_SIZE``        pixels in the latest support (amplitude > 0.1)
``P:PHASE_RMS``           standard deviation of the phase inside the support, about its
                          circular mean (rad)
``P:FRAME_RATE``          reconstructed frames per second
``P:FRAMES``              frames reconstructed in the current run
``P:SEQ_NUM``             seq_num of the latest frame
``P:CHI2``                trust figure of the latest frame: chi^2 of its reconstruction against
                          the measured crop (the paper's metric; lower is better)
``P:CHI2_MEDIAN``         median chi^2 of the current run's last 1,000 frames
``P:MODEL_VERSION``       version of the weights in use (0 until a live adaptation swaps)
``P:RUN_UID``             uid of the current run
``P:STATUS``              ``idle``, ``running`` or ``done <exit_status>``
``P:PEAK_ROW`` ...        the latest frame's observables, one PV each (``P:PEAK_ROW``,
                          ``P:PEAK_COL``, ``P:INTENSITY``, ``P:SUPPORT_AREA``, ``P:CENTROID_ROW``,
                          ``P:CENTROID_COL``, ``P:PHASE_MEAN``, ``P:STRAIN_RMS``,
                          ``P:CORRELATION``; :data:`cdinn_stream.core.observables.OBSERVABLES`
                          says what each is, in which unit)
========================  =================================================================

The server binds 127.0.0.1 unless ``--interfaces`` says otherwise, and answers searches on UDP port
``--port`` (default ``$EPICS_CA_SERVER_PORT``, else 5064). Channel Access clients find IOCs by UDP
broadcast, which usually does not reach an IOC bound to 127.0.0.1: a client (``EpicsSink``, ``caget``,
``--epics-prefix``) needs, before its process first uses EPICS, the settings that
:func:`client_environment` gives and ``cdinn-stream ioc`` prints when it starts, e.g.::

    export EPICS_CA_ADDR_LIST=127.0.0.1 EPICS_CA_AUTO_ADDR_LIST=NO EPICS_CA_SERVER_PORT=5064

Needs caproto: ``pip install 'cdinn-stream[epics]'``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading

import numpy as np

try:
    from caproto import ChannelType
    from caproto.server import PVGroup, pvproperty
except ImportError as err:
    raise ImportError(f"the cdinn-stream IOC needs caproto ({err}): pip install 'cdinn-stream[epics]'") from err

from ..core.observables import OBSERVABLES
from ..sinks.epics import OBSERVABLE_PVS

__all__ = ["ReconstructionIOC", "run_ioc", "IOCThread", "client_environment", "server_port"]

#: the observables' units as EPICS engineering units (at most 8 characters)
EPICS_UNITS = {"detector pixel": "px", "object pixel": "px", "counts": "counts", "rad": "rad", "": ""}

DEFAULT_PORT = 5064  # Channel Access's


def server_port(port: int | None = None) -> int:
    """The UDP port the IOC answers searches on: ``port``, else ``$EPICS_CA_SERVER_PORT``, else 5064."""
    return int(port) if port else int(os.environ.get("EPICS_CA_SERVER_PORT") or DEFAULT_PORT)


def client_environment(interfaces: tuple[str, ...] = ("127.0.0.1",), port: int | None = None) -> str:
    """The Channel Access settings a client needs to find this IOC, as ``VAR=value`` words
    (for ``export``): its addresses (``127.0.0.1`` for an IOC on every interface: from another
    machine, use this machine's address), no broadcast, and its port."""
    addresses = " ".join(dict.fromkeys("127.0.0.1" if a in ("0.0.0.0", "") else a for a in interfaces))
    if " " in addresses:
        addresses = f'"{addresses}"'
    return f"EPICS_CA_ADDR_LIST={addresses} EPICS_CA_AUTO_ADDR_LIST=NO EPICS_CA_SERVER_PORT={server_port(port)}"


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
        PHASE_RMS = pvproperty(value=0.0, dtype=float, precision=4, units="rad",
                               doc="standard deviation of the phase in the support, about its circular mean")
        FRAME_RATE = pvproperty(value=0.0, dtype=float, precision=1, units="Hz", doc="frames per second")
        FRAMES = pvproperty(value=0, dtype=int, doc="frames reconstructed in this run")
        SEQ_NUM = pvproperty(value=0, dtype=int, doc="seq_num of the latest frame")
        CHI2 = pvproperty(value=0.0, dtype=float, precision=5, doc="chi^2 of the latest frame")
        CHI2_MEDIAN = pvproperty(value=0.0, dtype=float, precision=5,
                                 doc="median chi^2 of the run's last 1,000 frames")
        MODEL_VERSION = pvproperty(value=0, dtype=int, doc="version of the weights in use")
        RUN_UID = pvproperty(value="", dtype=ChannelType.STRING, doc="current run uid")
        STATUS = pvproperty(value="idle", dtype=ChannelType.STRING, doc="pipeline status")

    observables = {pv: pvproperty(value=0.0, dtype=float, precision=4, units=EPICS_UNITS[OBSERVABLES[name][0]],
                                  doc=OBSERVABLES[name][1][:80])
                   for name, pv in OBSERVABLE_PVS.items()}
    return type("ReconstructionIOC", (ReconstructionIOC,), observables)


ReconstructionIOC = make_ioc_class()


def run_ioc(prefix: str = "CDINN:", *, interfaces: tuple[str, ...] = ("127.0.0.1",), max_size: int = 128,
            port: int | None = None) -> None:
    """Serve the PVs until interrupted (blocking); on UDP port ``port`` (default: :func:`server_port`)."""
    from caproto.server import run

    os.environ["EPICS_CA_SERVER_PORT"] = str(server_port(port))  # caproto's server reads it when it starts
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
