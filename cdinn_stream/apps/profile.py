"""Factories for beamline IPython profiles (``profiles/``): the profile only imports and calls.

The pipeline is built by :class:`~cdinn_stream.apps.config.PipelineConfig` from the environment
(:meth:`~cdinn_stream.apps.config.PipelineConfig.from_env`), so that a setting means what it means
for ``cdinn-stream serve`` and no secret lives in a profile: ``CDINN_MODEL`` (model name or path),
``CDINN_VIEWS`` (symmetry views per pattern, 1-8), ``CDINN_ZMQ_OUT`` (ZeroMQ publisher address),
``CDINN_EPICS_PREFIX`` (PVs of ``cdinn-stream ioc``), ``TILED_URL`` and ``TILED_API_KEY`` (raw data
via ``TiledWriter`` and results via :class:`~cdinn_stream.sinks.TiledSink`), and the other
variables of :data:`~cdinn_stream.apps.config.ENVIRONMENT`.

Running the profile needs IPython: ``pip install 'cdinn-stream[profile]'``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["SimulatedBeamline", "setup_simulated_beamline"]


@dataclass
class SimulatedBeamline:
    """What the simulation profile puts in the namespace."""

    RE: object
    detector: object
    peak: object
    strain: object
    callback: object


def setup_simulated_beamline(*, frame_shape: tuple[int, int] = (256, 256), seed: int = 0,
                             environ: Mapping[str, str] = os.environ) -> SimulatedBeamline:
    """A RunEngine, the simulated BCDI detector and motors, and the reconstruction callback
    (subscribed) built by ``PipelineConfig.from_env(environ)``, with ``TiledWriter`` for raw data
    when ``TILED_URL`` is set."""
    from bluesky import RunEngine

    from ..lab.sim import BCDIFrameSource, OperandoCrystal, make_detector, make_motors
    from .config import PipelineConfig

    config = PipelineConfig.from_env(environ)
    client = config.tiled_client()  # connect_tiled: one line saying what to do if the server is not there
    model = config.load_model()
    RE = RunEngine({})
    if client is not None:
        from bluesky_tiled_plugins import TiledWriter

        RE.subscribe(TiledWriter(client))
    callback = config.build(model=model, tiled_client=client)
    RE.subscribe(callback)
    peak, strain = make_motors(frame_shape[1] / 2)
    source = BCDIFrameSource(OperandoCrystal(model.size, seed=seed), frame_shape=frame_shape, peak_motor=peak,
                             strain_motor=strain, seed=seed)
    return SimulatedBeamline(RE, make_detector(source), peak, strain, callback)
