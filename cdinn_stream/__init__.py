"""cdinn-stream: real-time coherent diffraction inversion for Bragg CDI beamlines.

A neural network (CDI NN, Cherukara et al.) turns each measured diffraction pattern into the
sample's shape and phase in milliseconds. See the README for the conventions and the pipeline.

The package is layered (``docs/design.md``, "Layers"; the contracts in ``pyproject.toml`` are
checked by the tests): :mod:`~cdinn_stream.core` (physics and maths), :mod:`~cdinn_stream.nn`
(the network and inference), :mod:`~cdinn_stream.lab` (simulation of a beamline, training,
evaluation, cards), :mod:`~cdinn_stream.live` (the streaming pipeline), :mod:`~cdinn_stream.sinks`
and :mod:`~cdinn_stream.apps`. The public API below loads on first use, so ``import
cdinn_stream.sinks`` (or ``cdinn-stream listen``) does not load torch.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

__all__ = [
    "CDINN",
    "CDIModel",
    "ModelConfig",
    "PipelineConfig",
    "ReconstructionCallback",
    "Reconstruction",
    "SimulatedSet",
    "chi2",
    "er_hio",
    "load_model",
    "score",
    "simulate",
]

__version__ = "0.1.0"

# Where each public name lives (loaded on first use).
_PUBLIC = {
    "CDINN": "nn.model",
    "ModelConfig": "nn.model",
    "CDIModel": "nn.reconstruct",
    "Reconstruction": "nn.reconstruct",
    "load_model": "nn.reconstruct",
    "chi2": "core.metrics",
    "score": "core.metrics",
    "er_hio": "core.phase_retrieval",
    "SimulatedSet": "core.simulate",
    "simulate": "core.simulate",
    "ReconstructionCallback": "live.callback",
    "PipelineConfig": "apps.config",
}

# Modules that lived at the top level before the package was layered: ``import
# cdinn_stream.physics`` (and ``from cdinn_stream.reconstruct import load_model``) keep working.
_MOVED = {
    "physics": "core.physics", "crystal": "core.crystal", "simulate": "core.simulate",
    "metrics": "core.metrics", "phase_retrieval": "core.phase_retrieval", "timing": "core.timing",
    "model": "nn.model", "folding": "nn.folding", "int8": "nn.int8", "weights": "nn.weights",
    "ensemble": "nn.ensemble", "reconstruct": "nn.reconstruct",
    "losses": "lab.losses", "train": "lab.train", "evaluate": "lab.evaluate", "card": "lab.card",
    "plots": "lab.plots", "sim": "lab.sim",
    "blocks": "live.blocks", "crop": "live.crop", "engine": "live.engine", "publish": "live.publish",
    "refine": "live.refine", "callback": "live.callback",
    "cli": "apps.cli", "demo": "apps.demo", "profile": "apps.profile", "listen": "apps.listen",
    "ioc": "apps.ioc", "replay": "apps.replay",
}


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(importlib.import_module(f"{__name__}.{_PUBLIC[name]}"), name)
        globals()[name] = value
        return value
    if name in _MOVED:  # ``cdinn_stream.physics`` as an attribute, as the flat layout allowed
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'cdinn_stream' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Import ``cdinn_stream.<old>`` as the module it moved to (the same module object)."""

    def __init__(self) -> None:
        self._specs: dict = {}

    def find_spec(self, fullname, path=None, target=None):
        prefix, _, old = fullname.partition(".")
        if prefix != __name__ or old not in _MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        module = importlib.import_module(f"{__name__}.{_MOVED[spec.name.partition('.')[2]]}")
        self._specs[spec.name] = module.__spec__  # the import machinery is about to overwrite it
        return module

    def exec_module(self, module) -> None:
        module.__spec__ = self._specs.pop(module.__spec__.name)  # executed under its own name already


sys.meta_path.append(_MovedModules())
