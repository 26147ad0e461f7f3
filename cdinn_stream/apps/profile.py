"""Factories for beamline IPython profiles (``profiles/``): the profile only imports and calls.

Settings come from the environment so that no secret lives in a profile:
``TILED_URL`` and ``TILED_API_KEY`` (raw data via ``TiledWriter`` and results via
:class:`~cdinn_stream.sinks.TiledSink`), ``CDINN_ZMQ_OUT`` (ZeroMQ publisher address),
``CDINN_EPICS_PREFIX`` (PVs of ``cdinn-stream ioc``), ``CDINN_MODEL`` (model name or path) and
``CDINN_VIEWS`` (symmetry views per pattern, 1-8; default 1).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

__all__ = ["SimulatedBeamline", "setup_simulated_beamline", "sinks_from_environment"]


@dataclass
class SimulatedBeamline:
    """What the simulation profile puts in the namespace."""

    RE: object
    detector: object
    peak: object
    strain: object
    callback: object


def sinks_from_environment(model_card: dict | None = None, environ=os.environ) -> tuple[list, object | None]:
    """Sinks configured by environment variables, and the Tiled client (or None)."""
    from ..sinks import EpicsSink, TiledSink, ZmqPublisherSink

    sinks: list = []
    client = None
    if environ.get("TILED_URL"):
        from tiled.client import from_uri

        client = from_uri(environ["TILED_URL"], api_key=environ.get("TILED_API_KEY"))
        sinks.append(TiledSink(client, model_card=model_card))
    if environ.get("CDINN_ZMQ_OUT"):
        sinks.append(ZmqPublisherSink(environ["CDINN_ZMQ_OUT"]))
    if environ.get("CDINN_EPICS_PREFIX"):
        sinks.append(EpicsSink(environ["CDINN_EPICS_PREFIX"]))
    return sinks, client


def setup_simulated_beamline(*, frame_shape: tuple[int, int] = (256, 256), seed: int = 0) -> SimulatedBeamline:
    """A RunEngine, the simulated BCDI detector and motors, and the reconstruction callback
    (subscribed), with ``TiledWriter`` for raw data when ``TILED_URL`` is set."""
    from bluesky import RunEngine

    from ..lab.sim import BCDIFrameSource, OperandoCrystal, make_detector, make_motors
    from ..live.callback import ReconstructionCallback
    from ..nn.reconstruct import load_model

    model = load_model(os.environ.get("CDINN_MODEL", "cdinn-32"), views=int(os.environ.get("CDINN_VIEWS", "1")))
    sinks, client = sinks_from_environment(model.card)
    RE = RunEngine({})
    if client is not None:
        from bluesky_tiled_plugins import TiledWriter

        RE.subscribe(TiledWriter(client))
    callback = ReconstructionCallback(model=model, sinks=sinks)
    RE.subscribe(callback)
    peak, strain = make_motors(frame_shape[1] / 2)
    source = BCDIFrameSource(OperandoCrystal(model.size, seed=seed), frame_shape=frame_shape, peak_motor=peak,
                             strain_motor=strain, seed=seed)
    return SimulatedBeamline(RE, make_detector(source), peak, strain, callback)
