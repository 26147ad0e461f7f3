"""cdinn-stream: real-time coherent diffraction inversion for Bragg CDI beamlines.

A neural network (CDI NN, Cherukara et al.) turns each measured diffraction pattern into the
sample's shape and phase in milliseconds. See the README for the conventions and the pipeline.
"""

from .metrics import chi2, score
from .model import CDINN, ModelConfig
from .phase_retrieval import er_hio
from .reconstruct import CDIModel, Reconstruction, load_model
from .simulate import SimulatedSet, simulate

__all__ = [
    "CDINN",
    "CDIModel",
    "ModelConfig",
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


def __getattr__(name: str):
    # The callback (event-model, the sinks) loads on first use: training, evaluation and the
    # model need only numpy, scipy and torch.
    if name == "ReconstructionCallback":
        from .callback import ReconstructionCallback

        return ReconstructionCallback
    raise AttributeError(f"module 'cdinn_stream' has no attribute {name!r}")
