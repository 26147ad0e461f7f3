"""One pipeline configuration: what the live callback needs, where its results go, and one ``build``.

The command line (``serve``, ``replay``), the beamline profile and the demo all build their
pipeline here, so a setting means the same everywhere::

    from cdinn_stream import PipelineConfig

    config = PipelineConfig(zmq_out="tcp://127.0.0.1:5578")   # or PipelineConfig.from_env()
    callback = config.build()                                  # a ReconstructionCallback with its sinks
    RE.subscribe(callback)

:meth:`PipelineConfig.from_env` reads the ``CDINN_*`` and ``TILED_*`` variables below (a profile
keeps no secret in its files). Tiled clients are made by :func:`connect_tiled` only, which turns
an unreachable server or a refused key into one line saying what to do.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from ..live.blocks import Closes
from ..nn.options import DEFAULT_MODEL, PRECISIONS
from ..sinks.tiled import connect_tiled

__all__ = ["PipelineConfig", "connect_tiled", "ENVIRONMENT"]

#: environment variable -> field of :class:`PipelineConfig`
ENVIRONMENT = {
    "CDINN_MODEL": "model",
    "CDINN_DEVICE": "device",
    "CDINN_PRECISION": "precision",
    "CDINN_VIEWS": "views",
    "CDINN_BATCH_SIZE": "batch_size",
    "CDINN_MAX_LATENCY": "max_latency",
    "CDINN_BIN": "bin",
    "CDINN_ZMQ_OUT": "zmq_out",
    "TILED_URL": "tiled_uri",
    "TILED_API_KEY": "tiled_api_key",
    "CDINN_TILED_PARENT": "tiled_parent",
    "CDINN_EPICS_PREFIX": "epics_prefix",
    "CDINN_SPOOL": "spool_dir",
    "CDINN_REFINE_EVERY": "refine_every",
    "CDINN_REFINE_ITERATIONS": "refine_iterations",
    "CDINN_REFINE_ABOVE": "refine_above",
    "CDINN_REFINE_BUDGET": "refine_budget",
    "CDINN_REFINE_SHARE": "refine_share",
    "CDINN_REFINE_WINDOW": "refine_window",
    "CDINN_ADAPT": "adapt",
    "CDINN_ADAPT_DIR": "adapt_dir",
}


def _flag(text: str) -> bool:
    """``1/true/yes/on`` or ``0/false/no/off`` (any case)."""
    value = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False,
             "off": False}.get(text.strip().lower())
    if value is None:
        raise ValueError(text)
    return value


#: fields read from the environment as numbers (the others are text)
_NUMBERS = {"views": int, "batch_size": int, "bin": int, "refine_every": int, "refine_iterations": int,
            "max_latency": float, "refine_above": float, "refine_budget": float, "refine_share": float,
            "refine_window": int, "adapt": _flag}

#: other ``CDINN_*`` variables the package reads (not pipeline settings)
OTHER_VARIABLES = {"CDINN_MODELS", "CDINN_MALLOC_TUNING", "CDINN_COMPILE"}  # model search path; CPU allocator
# (nn.reconstruct); 0: the observables not compiled (core.observe)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PipelineConfig:
    """Settings of the live pipeline (every field has a default; ``None`` leaves a sink out).

    Attributes:
        model: shipped model name, a model on the search path, or a ``.pt`` path.
        device: ``"cpu"`` or ``"cuda"`` (``None``: CUDA when available).
        precision: one of ``PRECISIONS`` (``"auto"``: int8 for an int8 model, else bf16 where native).
        views: symmetric copies of each pattern the network sees (1-8).
        batch_size: frames per model call at most.
        max_latency: seconds a frame waits for a batch to fill.
        bin: crop a ``bin * model size`` window around the Bragg peak and bin it to the model's
            size (the crop's side in detector pixels is ``bin`` times the model's).
        zmq_out: publish results on this ZeroMQ address (e.g. ``tcp://127.0.0.1:5578``).
        tiled_uri: write results to this Tiled server, one container per run.
        tiled_api_key: its API key (from ``TILED_API_KEY``; never shown in ``repr``).
        tiled_parent: the Tiled container holding the per-run containers.
        epics_prefix: write the PVs of ``cdinn-stream ioc`` with this prefix (e.g. ``CDINN:``).
        spool_dir: where Tiled results wait while the server is away (default: ``$CDINN_SPOOL``
            or ``~/.cache/cdinn-stream/spool``).
        refine_every: refine every n-th frame with NN-seeded ER/HIO (0: only frames asked for with
            ``callback.refine``; ``None``: no refiner thread unless ``refine_above`` is set).
        refine_iterations: ER/HIO iterations of a refinement.
        refine_above: refine automatically the frames whose chi^2 (trust figure) is above this
            (``None``: off).
        refine_budget: at most this fraction of each run's frames refined automatically.
        refine_share: at most this share of one core's time spent refining.
        refine_window: refine on a window this many times the model's (with ``bin`` equal to it:
            the model's detector window unbinned, twice the oversampling).
        adapt: adapt the model to each run live and hot-swap the better weights
            (:mod:`cdinn_stream.live.adapt`; off by default).
        adapt_dir: where adapted weights and their cards go (default: the user's model folder).
    """

    model: str = DEFAULT_MODEL
    device: str | None = None
    precision: str = "auto"
    views: int = 1
    batch_size: int = 256
    max_latency: float = 0.01
    bin: int = 1
    zmq_out: str | None = None
    tiled_uri: str | None = None
    tiled_api_key: str | None = field(default=None, repr=False)
    tiled_parent: str = "cdinn"
    epics_prefix: str | None = None
    spool_dir: str | None = None
    refine_every: int | None = None
    refine_iterations: int = 50
    refine_above: float | None = None
    refine_budget: float = 0.2
    refine_share: float = 0.5
    refine_window: int = 1
    adapt: bool = False
    adapt_dir: str | None = None

    def __post_init__(self) -> None:
        if self.device is not None and not re.fullmatch(r"cpu|cuda(:\d+)?", self.device):
            raise ValueError(f"device must be cpu, cuda or cuda:N, not {self.device!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, not {self.precision!r}")
        if not 1 <= self.views <= 8:
            raise ValueError(f"views must be 1..8, not {self.views}")
        for name in ("batch_size", "bin"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, not {getattr(self, name)}")
        if self.max_latency < 0 or (self.refine_every or 0) < 0 or self.refine_iterations < 0:
            raise ValueError("max_latency, refine_every and refine_iterations must not be negative")
        if not 0 <= self.refine_budget <= 1 or not 0 < self.refine_share <= 1:
            raise ValueError(f"refine_budget must be in [0, 1] and refine_share in (0, 1], not {self.refine_budget} "
                             f"and {self.refine_share}")
        if self.refine_window < 1 or (self.refine_above is not None and self.refine_above < 0):
            raise ValueError("refine_window must be at least 1 and refine_above not negative")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ, **overrides) -> PipelineConfig:
        """Settings from the environment (:data:`ENVIRONMENT`), then ``overrides``."""
        unknown = sorted(k for k in environ
                         if k.startswith("CDINN_") and k not in ENVIRONMENT and k not in OTHER_VARIABLES)
        if unknown:
            logger.warning("ignoring unknown setting(s) %s (the pipeline reads %s)", unknown, sorted(ENVIRONMENT))
        values: dict = {}
        for var, name in ENVIRONMENT.items():
            text = environ.get(var)
            if text is None or text == "":
                continue
            number = _NUMBERS.get(name)
            try:
                values[name] = number(text) if number else text
            except ValueError:
                kind = {int: "an integer", float: "a number"}.get(number, "a flag (1/0, true/false)")
                raise ValueError(f"${var}={text!r} is not {kind}") from None
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def replace(self, **changes) -> PipelineConfig:
        """A copy with ``changes`` (``None`` values are ignored)."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    def load_model(self):
        """The model these settings name (:func:`~cdinn_stream.nn.reconstruct.load_model`)."""
        from ..nn.reconstruct import load_model

        return load_model(self.model, device=self.device, precision=self.precision, views=self.views)

    def tiled_client(self):
        """A Tiled client for ``tiled_uri`` (``None`` without one)."""
        return connect_tiled(self.tiled_uri, self.tiled_api_key) if self.tiled_uri else None

    def build_sinks(self, *, model_card: dict | None = None, tiled_client=None) -> list:
        """The sinks these settings name: ZeroMQ, Tiled, EPICS, in that order."""
        from ..sinks import EpicsSink, TiledSink, ZmqPublisherSink

        sinks: list = []
        try:
            if self.zmq_out:
                sinks.append(ZmqPublisherSink(self.zmq_out))
            client = tiled_client if tiled_client is not None else self.tiled_client()
            if client is not None:
                sinks.append(TiledSink(client, parent=self.tiled_parent, model_card=model_card,
                                       spool_dir=self.spool_dir))
            if self.epics_prefix:
                sinks.append(EpicsSink(self.epics_prefix))
        except BaseException:
            for sink in sinks:  # a socket bound for nothing would hold its address
                if isinstance(sink, Closes):
                    sink.close()
            raise
        return sinks

    def build(self, *, model=None, tiled_client=None, mask=None, image_key: str | None = None,
              handler_registry: dict | None = None, extra_sinks: Sequence = ()):
        """The :class:`~cdinn_stream.live.callback.ReconstructionCallback` with its sinks (closing
        the callback closes them).

        ``model`` (a loaded :class:`~cdinn_stream.nn.reconstruct.CDIModel`) and ``tiled_client``
        replace the ones these settings would make; ``mask``, ``image_key`` and
        ``handler_registry`` go to the callback; ``extra_sinks`` are added to the configured ones
        (a :class:`~cdinn_stream.apps.liveview.LiveReconstructionView`, a sink of your own)."""
        from ..live.callback import ReconstructionCallback

        model = model if model is not None else self.load_model()
        sinks = [*self.build_sinks(model_card=model.card, tiled_client=tiled_client), *extra_sinks]
        return ReconstructionCallback(model=model, sinks=sinks, bin=self.bin, mask=mask, image_key=image_key,
                                      batch_size=self.batch_size, max_latency=self.max_latency,
                                      handler_registry=handler_registry, refine_every=self.refine_every,
                                      refine_iterations=self.refine_iterations, refine_above=self.refine_above,
                                      refine_budget=self.refine_budget, refine_share=self.refine_share,
                                      refine_window=self.refine_window,
                                      adapt={"out_dir": self.adapt_dir} if self.adapt else None, close_sinks=True)
